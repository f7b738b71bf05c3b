"""Stopping: SIGINT/SIGTERM end a job within seconds with one line that says how to go on, and no
Ray process outlives a run. Each job runs in its own interpreter, as a user's would."""

from __future__ import annotations

import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from helpers import encode, photo, write_labelled_set

from aidetect_batch import schema
from aidetect_batch.detectors.checkpoints import build_model, save_checkpoint

IMAGES = 120
STOP_WITHIN_S = 20


@pytest.fixture(scope="module")
def slow_scan(tmp_path_factory) -> dict:
    """A corpus and an untrained ResNet50: a scan of about 15 s on 2 CPUs, long enough to interrupt."""
    root = tmp_path_factory.mktemp("interrupt")
    photos = root / "photos"
    photos.mkdir()
    for i in range(IMAGES):
        (photos / f"{i:04d}.jpg").write_bytes(encode(photo(256, 256, seed=i % 17), "JPEG", quality=90))
    checkpoint = str(root / "resnet50.pt")
    save_checkpoint(checkpoint, build_model("resnet50", 1), "resnet50", info={"untrained": True})
    return {"root": root, "photos": str(photos), "checkpoint": checkpoint}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "aidetect_batch", *args]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _committed_rows(out: str) -> int:
    files = glob.glob(os.path.join(out, schema.SCORES_DIR, "part-*.parquet"))
    return sum(pq.read_metadata(f).num_rows for f in files)


def _interrupt(args: list[str], out: str, signum: int, *, after_rows: int) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``aidetect-batch ARGS`` and send ``signum`` once more than ``after_rows`` rows are committed."""
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 240
    while _committed_rows(out) <= after_rows and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, "the scan ended before it could be interrupted"
    proc.send_signal(signum)
    sent = time.monotonic()
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), time.monotonic() - sent


def _check_stopped(done: subprocess.CompletedProcess, elapsed: float, out: str, signum: int) -> list[str]:
    """The stop's exit code, line and kept rows; returns the command the line says continues the scan."""
    name = signal.Signals(signum).name
    assert done.returncode == 128 + signum, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert elapsed < STOP_WITHIN_S, f"stopping took {elapsed:.1f}s"
    lines = [line for line in done.stderr.splitlines() if f"scan stopped by {name}" in line]
    assert len(lines) == 1, done.stderr[-3000:]
    kept = _committed_rows(out)
    assert 0 < kept < IMAGES
    assert f"kept {kept} scored row(s) of {IMAGES}" in lines[0]
    return shlex.split(lines[0].split("Continue with: ", 1)[1])


@pytest.mark.slow
def test_sigint_then_sigterm_stop_a_scan_and_the_printed_command_continues_it(slow_scan, tmp_path):
    """SIGINT stops the first run and SIGTERM the resumed one, each after it committed a shard: exit codes 130
    and 143, one line each naming what was kept and the command that continues, and the last resume ends
    with every input scored exactly once. (One scan for both signals, for CI's time budget.)"""
    out = str(tmp_path / "out")
    args = ["scan", slow_scan["photos"], "--checkpoint", slow_scan["checkpoint"], "--out", out]
    args += ["--commit-every", "0", "--batch-size", "8"]
    done, elapsed = _interrupt(args, out, signal.SIGINT, after_rows=0)
    command = _check_stopped(done, elapsed, out, signal.SIGINT)
    assert command == ["aidetect-batch", *args, "--resume"]
    kept = _committed_rows(out)
    done, elapsed = _interrupt(command[1:], out, signal.SIGTERM, after_rows=kept)
    assert _check_stopped(done, elapsed, out, signal.SIGTERM) == command, "the same command goes on again"
    assert _committed_rows(out) > kept
    resumed = subprocess.run(_cli(*command[1:]), capture_output=True, text=True, env=_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    table = pq.read_table(os.path.join(out, schema.SCORES_DIR))
    expected = sorted(os.path.join(slow_scan["photos"], f"{i:04d}.jpg") for i in range(IMAGES))
    assert sorted(table.column(schema.PATH).to_pylist()) == expected


def _ray_orphans() -> set[int]:
    """Ray worker processes whose parent is gone (re-parented to PID 1)."""
    found = set()
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            with open(stat.replace("stat", "cmdline"), "rb") as handle:
                cmdline = handle.read()
        except OSError:
            continue
        if fields[1] == "1" and cmdline.startswith(b"ray::"):
            found.add(int(stat.split("/")[2]))
    return found


@pytest.mark.slow
def test_no_ray_process_outlives_an_in_process_training_run(tmp_path):
    """``run_train`` and then ``ray.shutdown()`` in one interpreter: afterwards no Ray worker is left."""
    write_labelled_set(str(tmp_path / "data"), per_class=8, side=32)
    script = (
        "import ray\n"
        "from aidetect_batch.train.config import TrainConfig\n"
        "from aidetect_batch.train.trainer import run_train\n"
        f"run_train(TrainConfig(dataset={str(tmp_path / 'data')!r}, out={str(tmp_path / 'run')!r}, "
        "arch='cifake_cnn', epochs=1, batch_size=8))\n"
        "ray.shutdown()\n"
    )
    before = _ray_orphans()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    deadline = time.monotonic() + 15
    while (left := _ray_orphans() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"Ray processes outlived the run: {left}"


@pytest.mark.slow
def test_sigint_stops_training_and_names_the_kept_checkpoints(tmp_path):
    """Ray Train's own SIGINT handler would abort the run and exit 1 without a word; ours keeps the
    finished epochs and prints the --resume command."""
    write_labelled_set(str(tmp_path / "data"), per_class=40, side=32)
    out = str(tmp_path / "run")
    args = ["train", str(tmp_path / "data"), "--out", out, "--arch", "cifake_cnn", "--epochs", "50"]
    args += ["--batch-size", "8"]
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 240
    checkpoints = os.path.join(out, schema.TRAIN_STATE_DIR, "run", "checkpoint_*")
    while not glob.glob(checkpoints) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, "training ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert time.monotonic() - sent < STOP_WITHIN_S and "Traceback" not in stderr
    line = next(line for line in stderr.splitlines() if "train stopped by SIGINT" in line)
    assert os.path.join(out, schema.TRAIN_STATE_DIR) in line
    assert shlex.split(line.split("Continue with: ", 1)[1]) == ["aidetect-batch", *args, "--resume"]
    with open(os.path.join(out, schema.RUN_FILE)) as handle:
        assert json.load(handle)["status"] == "stopped"
