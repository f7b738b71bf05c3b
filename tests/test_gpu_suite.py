"""The GPU benchmark suite: it refuses a machine without CUDA, and its code runs on the CPU with a tiny
model, so the suite is known to work before a GPU is lent for it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from aidetect_batch.bench import measure
from aidetect_batch.bench.gpu import NO_CUDA, GpuSuiteOptions, gpu_lines, run_gpu_suite


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_refuses_to_run_without_cuda(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "aidetect_batch", "benchmark", "--suite", "gpu", "--json", str(tmp_path / "g.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert NO_CUDA in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "g.json").exists()


def test_steady_rate_leaves_start_up_and_tail_out():
    """10 s of start-up, then 100 rows/s for 10 s, then a slow last block: the steady rate is 100."""
    deliveries = [(10.0 + t, 100 * t) for t in range(1, 11)] + [(25.0, 1100)]
    assert measure.steady_rate(deliveries) == pytest.approx(100.0)
    assert measure.pass_rates(deliveries, pass_rows=100) == pytest.approx([100.0] * 6)


@pytest.mark.slow
def test_the_suite_runs_its_scans_on_cpu(ray_cluster):
    options = GpuSuiteOptions(
        arch="resnet_tiny",
        batch_size=16,
        photos=6,
        photo_sizes=((320, 240),),
        pilot_rows=48,
        steady_s=1.0,
        budget_s=300,
        max_rows=240,
        ceiling_batches=2,
        compile=False,
        require_cuda=False,
    )
    result = run_gpu_suite(options)
    rows = result["corpus"]["rows"]
    assert rows % options.photos == 0 and rows >= 3 * options.photos
    assert set(result["scans"]) == {"cpu_decode", "gpu_decode"}
    for scan in result["scans"].values():
        assert scan["images"] == rows
        assert scan["steady_images_per_s"] > 0 and scan["steady_share_of_ceiling"] > 0
        assert scan["first_result_seconds"] <= scan["wall_seconds"]
    assert any(line.startswith("gpu_decode") for line in gpu_lines(result))
