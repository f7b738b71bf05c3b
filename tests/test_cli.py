"""CLI behaviour: errors are caught before Ray starts, with exit code 2 and a clear message."""

import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from aidetect_batch import schema
from aidetect_batch.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.fixture(autouse=True)
def no_ray_start(monkeypatch):
    """Every error below must happen before Ray starts."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("ray.init must not be reached")

    monkeypatch.setattr(ray, "init", refuse)


def test_non_empty_out_is_refused(capsys, corpus, tiny_checkpoint, tmp_path):
    (tmp_path / "old.txt").write_text("previous results")
    code, err = run_main(capsys, "scan", corpus["root"], "--checkpoint", tiny_checkpoint, "--out", str(tmp_path))
    assert code == 2
    assert "is not empty" in err and "--overwrite" in err


def test_overwrite_never_deletes_foreign_files(capsys, corpus, tiny_checkpoint, tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    code, err = run_main(
        capsys, "scan", corpus["root"], "--checkpoint", tiny_checkpoint, "--out", str(tmp_path), "--overwrite"
    )
    assert code == 2 and "refuses to clear" in err
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_missing_source(capsys, tiny_checkpoint, tmp_path):
    code, err = run_main(
        capsys, "scan", str(tmp_path / "nope"), "--checkpoint", tiny_checkpoint, "--out", str(tmp_path / "o")
    )
    assert code == 2 and "does not exist" in err


def test_missing_checkpoint_says_how_to_get_one(capsys, corpus, tmp_path):
    code, err = run_main(capsys, "scan", corpus["root"], "--out", str(tmp_path / "o"))
    assert code == 2 and "--checkpoint is required" in err and "CNNDetection" in err
    code, err = run_main(capsys, "scan", corpus["root"], "--checkpoint", str(tmp_path / "x.pt"), "--out", str(tmp_path))
    assert code == 2 and "does not exist" in err


def test_unreadable_checkpoint(capsys, corpus, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    code, err = run_main(capsys, "scan", corpus["root"], "--checkpoint", str(bad), "--out", str(tmp_path / "o"))
    assert code == 2 and "not a PyTorch checkpoint" in err


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--threshold", "1.5"], "--threshold must be in [0, 1]"),
        (["--actors", "3,2"], "1 <= MIN <= MAX"),
        (["--actors", "x"], "--actors takes N or MIN,MAX"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--storage-option", "novalue"], "key=value"),
    ],
)
def test_bad_arguments(capsys, corpus, tiny_checkpoint, tmp_path, flags, needle):
    argv = ["scan", corpus["root"], "--checkpoint", tiny_checkpoint, "--out", str(tmp_path / "o"), *flags]
    code, err = run_main(capsys, *argv)
    assert code == 2 and needle in err


def test_argparse_rejects_unknown_choices(corpus, tiny_checkpoint, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["scan", corpus["root"], "--checkpoint", tiny_checkpoint, "--out", str(tmp_path), "--preprocess", "x"])
    assert exc.value.code == 2


@pytest.mark.slow
def test_demo_and_job_entry_point_end_to_end(tmp_path):
    """README command 1 (the demo), then jobs/scan.py on the demo corpus, as subprocesses with their own Ray."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    console_script = shutil.which("aidetect-batch")
    command = [console_script] if console_script else [sys.executable, "-m", "aidetect_batch"]
    demo = subprocess.run(
        [*command, "demo", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "UNTRAINED" in demo.stderr
    closing = [line for line in demo.stdout.splitlines() if line.startswith("scanned ")]
    assert closing and "scanned 12 files: ok 8, failed 4" in closing[0] and "img/s" in closing[0]
    scores = pq.read_table(tmp_path / "results" / schema.SCORES_DIR)
    assert scores.num_rows == 12

    job = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "jobs", "scan.py"),
            str(tmp_path / "corpus"),
            "--checkpoint",
            str(tmp_path / "untrained-resnet50.pt"),
            "--out",
            str(tmp_path / "job"),
            "--preprocess",
            "center-crop",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=str(tmp_path),
    )
    assert job.returncode == 0, job.stderr[-3000:]
    assert "scanned 11 files: ok 7, failed 4" in job.stdout, "no_extension is skipped without --all-files"
