"""CLI behaviour: errors are caught before Ray starts, with exit code 2 and a clear message."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import write_labelled_set

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


@pytest.fixture
def small_labelled(tmp_path):
    root = str(tmp_path / "labelled")
    write_labelled_set(root, per_class=3, side=32)
    return root


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--augment", "sharpen"], "--augment: unknown ['sharpen']"),
        (["--arch", "cifake_cnn", "--init", "imagenet"], "no ImageNet weights for cifake_cnn"),
        (["--split", "0.5,0.5"], "--split takes three fractions"),
        (["--split", "0.9,0,0.1"], "a train and a validation share above 0"),
        (["--threshold-rule", "fpr:2"], "fpr:X needs 0 <= X < 1"),
        (["--resume"], "holds no training run to continue"),
        (["--epochs", "0"], "--epochs must be at least 1"),
    ],
)
def test_bad_train_arguments(capsys, small_labelled, tmp_path, flags, needle):
    code, err = run_main(capsys, "train", small_labelled, "--out", str(tmp_path / "run"), *flags)
    assert code == 2 and needle in err


def test_train_refuses_a_missing_or_unlabelled_dataset(capsys, tmp_path):
    code, err = run_main(capsys, "train", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--init", "none")
    assert code == 2 and "does not exist" in err
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "real_1.png").write_bytes(b"x")
    code, err = run_main(capsys, "train", str(tmp_path / "flat"), "--out", str(tmp_path / "o"), "--init", "none")
    assert code == 2 and "no labelled images" in err


@pytest.mark.parametrize("flags", [(), ("--listing-prefix", "/local/dir")])
def test_listing_benchmark_needs_an_s3_prefix(capsys, flags):
    code, err = run_main(capsys, "benchmark", "--suite", "listing", *flags)
    assert code == 2 and "--listing-prefix s3://" in err


def test_init_imagenet_offline_fails_with_a_clear_message(capsys, monkeypatch, small_labelled, tmp_path):
    """No network: every socket connection is refused, as on an air-gapped machine."""
    import socket

    def offline(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket.socket, "connect", offline)
    monkeypatch.setattr(socket, "create_connection", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    code, err = run_main(
        capsys, "train", small_labelled, "--out", str(tmp_path / "o"), "--arch", "mobilenet_v2", "--init", "imagenet"
    )
    assert code == 2
    assert "--init imagenet could not download" in err and "offline" in err
    assert "https://download.pytorch.org/models/mobilenet_v2" in err and "--init none" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--perturb", "jpeg:500"], "JPEG quality is an integer"),
        (["--target-fpr", "1.5"], "--target-fpr must be in [0, 1)"),
    ],
)
def test_bad_evaluate_arguments(capsys, small_labelled, tiny_checkpoint, tmp_path, flags, needle):
    argv = ["evaluate", small_labelled, "--checkpoint", tiny_checkpoint, "--out", str(tmp_path / "e"), *flags]
    code, err = run_main(capsys, *argv)
    assert code == 2 and needle in err


def readme_blocks(section: str) -> list[str]:
    """The ```python blocks of one README section, exactly as a reader would paste them."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start : end if end > 0 else None], re.S)


def check_querying_examples(demo, capsys) -> None:
    """The README's "Querying results" examples, run as written: pandas and DuckDB agree, and with the data."""
    pandas_block, duckdb_block, evaluation_block = readme_blocks("Querying results")
    spaces = []
    for block in (pandas_block, duckdb_block, evaluation_block):
        spaces.append({})
        exec(compile(block, "README.md", "exec"), spaces[-1])  # noqa: S102 - the README's own examples
    printed = capsys.readouterr().out
    pdx, ddb = spaces[0], spaces[1]
    scores = pq.read_table(demo / "scan" / schema.SCORES_DIR).to_pandas()
    ok = scores[scores.status == "ok"]

    for top in (pdx["top"], ddb["top"]):
        assert set(top.columns) >= {"folder", "path", "score"}
        for folder, group in top.groupby("folder"):
            here = ok[ok.path.str.rsplit("/", n=1).str[0] == folder].score
            assert sorted(group.score, reverse=True) == sorted(here, reverse=True)[:3], folder
        assert set(top.folder) == set(ok.path.str.rsplit("/", n=1).str[0])
    assert len(pdx["top"]) == len(ddb["top"])

    for failures in (pdx["failures"], ddb["failures"]):
        assert failures.files.sum() == int((scores.status != "ok").sum()) == 7
        assert set(failures.status) == {"empty", "undecodable", "truncated", "too_large"}
        assert failures.files.is_monotonic_decreasing
    key = ["status", "error", "files", "example"]
    assert sorted(map(tuple, pdx["failures"][key].values)) == sorted(map(tuple, ddb["failures"][key].values))

    manifest = pq.read_table(demo / "train" / "splits.parquet").to_pandas()
    for by_split in (pdx["by_split"], ddb["by_split"]):
        assert set(by_split.split) == {"train", "val", "test"}
        assert by_split.files.sum() == len(set(manifest.path) & set(ok.path))
        mean = by_split.set_index(["split", "true_label"]).mean_score
        assert (mean.xs("ai", level="true_label") > mean.xs("real", level="true_label")).all()
    merged = pdx["by_split"].merge(ddb["by_split"], on=["split", "true_label"], suffixes=("_pd", "_db"))
    assert len(merged) == 6 and (merged.files_pd == merged.files_db).all()
    assert np.allclose(merged.mean_score_pd, merged.mean_score_db, atol=1e-6)
    assert np.allclose(merged.flagged_ai_pd, merged.flagged_ai_db)
    assert "too_large" in printed and "mean_score" in printed
    assert spaces[2]["wrong"].status.eq("ok").all()


@pytest.mark.slow
def test_demo_and_job_entry_points_end_to_end(tmp_path, monkeypatch, capsys):
    """README command 1 (the demo: train, evaluate, scan), its querying examples, then jobs/*.py, as a user would."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    console_script = shutil.which("aidetect-batch")
    command = [console_script] if console_script else [sys.executable, "-m", "aidetect_batch"]
    demo = subprocess.run(
        [*command, "demo"],
        capture_output=True,
        text=True,
        timeout=480,
        env=env,
        cwd=str(tmp_path),
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "DEMO NUMBERS ARE NOT REAL-WORLD ACCURACY" in demo.stderr
    assert "ROC-AUC" in demo.stdout and "target_fpr" in demo.stdout
    closing = [line for line in demo.stdout.splitlines() if line.startswith("scanned ")]
    assert closing and "scanned 615 files: ok 608, failed 7" in closing[0] and "img/s" in closing[0]
    out = tmp_path / "aidetect-demo"
    metrics = json.load(open(out / "evaluation" / schema.METRICS_FILE))
    assert metrics["split"] == "test" and metrics["overall"]["roc_auc"] > 0.8
    assert [r["perturbation"] for r in metrics["robustness"]][0] == "none"
    assert pq.read_table(out / "scan" / schema.SCORES_DIR).num_rows == 615
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    check_querying_examples(out, capsys)
    checkpoint = str(out / "train" / schema.MODEL_FILE)

    def job(name, *args):
        return subprocess.run(
            [sys.executable, os.path.join(REPO, "jobs", name), *args],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            cwd=str(tmp_path),
        )

    scanned = job("scan.py", str(out / "corpus" / "dump"), "--checkpoint", checkpoint, "--out", str(tmp_path / "j"))
    assert scanned.returncode == 0, scanned.stderr[-3000:]
    assert "scanned 11 files: ok 7, failed 4" in scanned.stdout, "no_extension is skipped without --all-files"
    jobs = (("train.py", "--freeze-backbone"), ("evaluate.py", "--perturb"), ("prune.py", "--structured"))
    for name, flag in (*jobs, ("reposts.py", "--min-quality")):
        helped = job(name, "--help")
        assert helped.returncode == 0 and flag in helped.stdout, name


def test_the_parser_and_an_argument_error_load_neither_torch_nor_ray():
    """Bad arguments fail in a second: building the parser must not import a job's heavy modules."""
    script = (
        "import sys\n"
        "from aidetect_batch.cli import main\n"
        "code = main(['scan', 'x', '--out', 'o', '--checkpoint', 'c', '--batch-size', '0'])\n"
        "heavy = [m for m in ('torch', 'ray', 'torchvision') if m in sys.modules]\n"
        "sys.exit(0 if code == 2 and not heavy else f'exit {code}, loaded {heavy}')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
