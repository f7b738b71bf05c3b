"""S3 end to end against moto's server mode on 127.0.0.1: a real HTTP S3 API, not a mock of s3fs."""

import json
import math
import os

import pyarrow.parquet as pq
import pytest

from aidetect_batch import schema
from aidetect_batch.config import parse_storage_options
from aidetect_batch.inputs.sources import DEFAULT_EXTENSIONS, SourceError, list_sources
from aidetect_batch.scan.config import ScanConfig
from aidetect_batch.scan.runner import run_scan

UPLOAD = [
    "jpeg/photo.jpg",
    "png/rgb.png",
    "other/photo.webp",
    "broken/truncated.jpg",
    "broken/zero.jpg",
    "broken/text.jpg",
]


@pytest.fixture(scope="module")
def s3(s3_server, corpus, tiny_checkpoint):
    import s3fs

    fs = s3fs.S3FileSystem()
    for bucket in ("dump", "models", "results"):
        fs.mkdir(bucket)
    for relative in UPLOAD:
        fs.put_file(os.path.join(corpus["root"], relative), f"dump/2026/{relative}")
    fs.pipe_file("dump/2026/emptydir/", b"")
    fs.pipe_file("dump/2026/.hidden.jpg", b"x")
    fs.put_file(tiny_checkpoint, "models/tiny.pt")
    return fs


def test_scan_reads_and_writes_s3_via_aws_endpoint_url(ray_after_moto, s3, corpus):
    assert "AWS_ENDPOINT_URL" in os.environ
    cfg = ScanConfig(sources=("s3://dump/2026",), out="s3://results/run1", checkpoint="s3://models/tiny.pt")
    result = run_scan(cfg)
    table = pq.read_table("results/run1/scores", filesystem=s3)
    rows = {r[schema.PATH]: r for r in table.to_pylist()}
    assert set(rows) == {f"s3://dump/2026/{r}" for r in UPLOAD}
    for relative in UPLOAD:
        row = rows[f"s3://dump/2026/{relative}"]
        expected = corpus["default"][os.path.join(corpus["root"], relative)].value
        assert row[schema.STATUS] == expected
        assert (0 <= row[schema.SCORE] <= 1) if expected == "ok" else math.isnan(row[schema.SCORE])
        assert row[schema.SOURCE] == "s3://dump/2026"
    assert result.summary.total == len(UPLOAD)
    run = json.loads(s3.cat_file("results/run1/_run.json"))
    assert run["status"] == "complete"
    assert s3.exists("results/run1/report/summary.json") and s3.exists("results/run1/report/histogram.png")
    page = s3.cat_file("results/run1/report/index.html").decode()
    assert page.count('class="thumb" src="data:image/jpeg;base64,') == 2 * result.summary.ok, "thumbnails from S3"
    prefixes = {p["prefix"] for p in result.summary.prefixes}
    assert prefixes == {"jpeg", "png", "other", "broken"}


def test_existing_s3_output_is_refused_before_work(ray_after_moto, s3):
    s3.pipe_file("results/taken/_run.json", b"{}")
    from aidetect_batch.errors import ConfigError

    cfg = ScanConfig(sources=("s3://dump/2026",), out="s3://results/taken", checkpoint="s3://models/tiny.pt")
    with pytest.raises(ConfigError, match="not empty"):
        run_scan(cfg)


def test_storage_options_reach_s3fs(s3_server, s3, monkeypatch):
    """An S3-compatible store named by --storage-option endpoint_url=... rather than the environment."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    options = parse_storage_options([f"endpoint_url={s3_server}", "use_listings_cache=false"])
    assert options == {"client_kwargs": {"endpoint_url": s3_server}, "use_listings_cache": False}
    table = list_sources(("s3://dump/2026/png",), DEFAULT_EXTENSIONS, storage_options=options)
    assert table.column(schema.PATH).to_pylist() == ["s3://dump/2026/png/rgb.png"]


def test_missing_s3_prefix_is_a_source_error(s3):
    with pytest.raises(SourceError, match="does not exist"):
        list_sources(("s3://dump/nothing-here",), DEFAULT_EXTENSIONS)


@pytest.mark.slow
def test_train_on_s3_dataset_writes_a_checkpoint_to_s3_that_scan_and_evaluate_load(ray_after_moto, s3, tmp_path):
    from helpers import write_labelled_set

    from aidetect_batch.detectors.checkpoints import parse_checkpoint, read_checkpoint_bytes
    from aidetect_batch.train.config import EvalConfig, TrainConfig
    from aidetect_batch.train.evaluation import run_evaluate
    from aidetect_batch.train.trainer import run_train

    local = str(tmp_path / "labelled")
    labels = write_labelled_set(local, per_class=12, side=32, layout="groups")
    s3.mkdir("datasets")
    for path in labels:
        s3.put_file(path, "datasets/faces-v1/" + os.path.relpath(path, local))
    result = run_train(
        TrainConfig(
            dataset="s3://datasets/faces-v1",
            out="s3://models/runs/r1",
            arch="cifake_cnn",
            init="none",
            preprocess="center-crop",
            augment=(),
            epochs=1,
            batch_size=8,
        )
    )
    assert result.checkpoint == "s3://models/runs/r1/model.pt"
    assert s3.exists("models/runs/r1/splits.parquet") and s3.exists("models/runs/r1/history.png")
    assert s3.glob("models/runs/r1/ray_train/run/checkpoint_*/state.pt")
    ckpt = parse_checkpoint(read_checkpoint_bytes(result.checkpoint))
    assert ckpt.arch == "cifake_cnn" and ckpt.info["dataset"] == "s3://datasets/faces-v1"
    splits = pq.read_table(s3.open("models/runs/r1/splits.parquet", "rb")).to_pylist()
    assert {r[schema.PATH] for r in splits} == {"s3://datasets/faces-v1/" + os.path.relpath(p, local) for p in labels}
    assert {r[schema.GROUP] for r in splits} == {"faces", "scenes"}
    evaluated = run_evaluate(
        EvalConfig(dataset="s3://models/runs/r1/splits.parquet", checkpoint=result.checkpoint, out="s3://results/eval")
    )
    assert evaluated.metrics["split"] == "test" and evaluated.metrics["scored"] == evaluated.metrics["files"] > 0
    assert s3.exists("results/eval/metrics.json") and s3.exists("results/eval/plots/roc.png")
