"""The GPU code path on a machine without CUDA: a logical GPU makes Ray schedule the
Classifier with num_gpus=1, and the actor must fall back to CPU with the same scores."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import own_ray

from aidetect_batch import schema
from aidetect_batch.scan.config import ScanConfig
from aidetect_batch.scan.runner import run_scan
from tests.test_pipeline import reference_scores


@pytest.fixture(scope="module")
def ray_with_a_gpu():
    with own_ray(num_gpus=1) as ray:
        yield ray


def test_gpu_plan_falls_back_to_cpu_with_identical_scores(ray_with_a_gpu, corpus, tiny_checkpoint, tmp_path):
    import torch

    assert not torch.cuda.is_available(), "this test is about machines without CUDA"
    png_dir = os.path.join(corpus["root"], "png")
    cfg = ScanConfig(sources=(png_dir,), out=str(tmp_path / "out"), checkpoint=tiny_checkpoint, precision="bf16")
    result = run_scan(cfg)
    plan = result.run["resolved"]["classifier"]
    assert plan["device"] == "cuda" and plan["num_gpus"] == 1
    rows = {r[schema.PATH]: r for r in pq.read_table(os.path.join(cfg.out, schema.SCORES_DIR)).to_pylist()}
    pngs = [p for p in rows if p.endswith(("rgb.png", "rgba.png", "one_pixel.png"))]
    expected = reference_scores(tiny_checkpoint, pngs, "resize")
    np.testing.assert_allclose([rows[p][schema.SCORE] for p in pngs], [expected[p] for p in pngs], atol=1e-4)
    with open(os.path.join(cfg.out, schema.RUN_FILE)) as handle:
        assert json.load(handle)["cluster_resources"]["GPU"] == 1
