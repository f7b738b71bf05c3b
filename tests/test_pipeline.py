import collections
import json
import math
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchvision.transforms as T
from helpers import PROVENANCE, encode, photo, tiny_model
from PIL import Image

from aidetect_batch import schema
from aidetect_batch.detectors.checkpoints import parse_checkpoint, read_checkpoint_bytes
from aidetect_batch.errors import ConfigError
from aidetect_batch.scan.classifier import ClassifierPlan
from aidetect_batch.scan.config import ScanConfig
from aidetect_batch.scan.runner import plan_classifier, run_scan


def read_scores(out: str):
    return pq.read_table(os.path.join(out, schema.SCORES_DIR)).to_pylist()


def reference_scores(checkpoint: str, paths: list[str], policy: str) -> dict[str, float]:
    """Score files by calling the model directly on torchvision-transformed tensors."""
    model = parse_checkpoint(read_checkpoint_bytes(checkpoint)).build()
    tensor = T.Compose([T.CenterCrop(224), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def transform(img: Image.Image) -> torch.Tensor:
        # resize scales down only: an image whose short side is 256 or less is cropped as it is (issue 16)
        return tensor(T.Resize(256)(img) if policy == "resize" and min(img.size) > 256 else img)

    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.inference_mode():
        return dict(zip(paths, torch.sigmoid(model(batch)[:, 0]).tolist(), strict=True))


@pytest.fixture(scope="module")
def corpus_scan(ray_cluster, corpus, tiny_checkpoint, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("scan") / "out")
    cfg = ScanConfig(
        sources=(corpus["root"],),
        out=out,
        checkpoint=tiny_checkpoint,
        all_files=True,
        batch_size=8,
        decode_batch_size=4,
    )
    return run_scan(cfg), cfg


def test_every_input_yields_exactly_one_row(corpus_scan, corpus):
    result, cfg = corpus_scan
    rows = read_scores(cfg.out)
    paths = [r[schema.PATH] for r in rows]
    assert len(paths) == len(set(paths))
    assert set(paths) == set(corpus["all_files"])


def test_statuses_and_scores(corpus_scan, corpus):
    _, cfg = corpus_scan
    for row in read_scores(cfg.out):
        expected = corpus["all_files"][row[schema.PATH]].value
        assert row[schema.STATUS] == expected, (row[schema.PATH], row[schema.ERROR])
        assert row[schema.PREPROCESS] == "resize"
        if expected == "ok":
            assert 0.0 <= row[schema.SCORE] <= 1.0
            assert row[schema.LABEL] == ("ai" if row[schema.SCORE] >= 0.5 else "real")
            assert row[schema.ERROR] is None and row[schema.WIDTH] > 0 and row[schema.FORMAT]
            assert len(row[schema.SHA256]) == 64
        else:
            assert math.isnan(row[schema.SCORE]) and row[schema.LABEL] is None and row[schema.ERROR]
        assert row[schema.MODEL_ID] == result_model_id(cfg)


def test_provenance_sits_beside_the_score(corpus_scan, corpus):
    _, cfg = corpus_scan
    expected = {os.path.join(corpus["root"], relative): kind for relative, _, kind in PROVENANCE}
    rows = read_scores(cfg.out)
    for row in rows:
        assert row[schema.PROVENANCE] == expected.get(row[schema.PATH]), row[schema.PATH]
        assert (row[schema.PROVENANCE_DETAIL] is None) == (row[schema.PROVENANCE] is None)
    marked = [r for r in rows if r[schema.PROVENANCE] in schema.DEFINITE_AI]
    assert marked and all(r[schema.STATUS] == "ok" and 0.0 <= r[schema.SCORE] <= 1.0 for r in marked)


def test_report_counts_provenance_and_lists_the_definite_files(corpus_scan, corpus):
    result, cfg = corpus_scan
    expected = collections.Counter(kind for _, _, kind in PROVENANCE if kind)
    counts = {row["provenance"]: row["files"] for row in result.summary.provenance}
    assert {k: v for k, v in counts.items() if k != "none"} == expected
    assert counts["none"] == len(corpus["all_files"]) - sum(expected.values())
    assert [r["provenance"] for r in result.summary.provenance][:-1] == sorted(
        expected, key=schema.PROVENANCE_KINDS.index
    )
    table = pq.read_table(os.path.join(cfg.out, schema.REPORT_DIR, "provenance.parquet")).to_pylist()
    assert table == result.summary.provenance
    with open(os.path.join(cfg.out, schema.REPORT_DIR, schema.SUMMARY_FILE)) as handle:
        assert json.load(handle)["provenance"] == result.summary.provenance
    with open(os.path.join(cfg.out, schema.REPORT_DIR, "index.html"), encoding="utf-8") as handle:
        page = handle.read()
    section = page[page.index("<h3>Files with definite AI provenance") : page.index("Most likely AI")]
    definite = [relative for relative, _, kind in PROVENANCE if kind in schema.DEFINITE_AI]
    assert f"({len(definite)}; all of them)" in section
    assert all(os.path.join(corpus["root"], relative) in section for relative in definite)
    assert "c2pa_tampered" not in section and "TestDiffusion" in section


def test_the_readme_query_combines_the_model_and_provenance(corpus_scan):
    duckdb = pytest.importorskip("duckdb")
    _, cfg = corpus_scan
    with open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8") as handle:
        (line,) = [x for x in handle.read().splitlines() if x.startswith("SELECT path, score, label, provenance")]
    found = duckdb.sql(line.replace("'OUT/", f"'{cfg.out}/")).fetchall()
    rows = read_scores(cfg.out)
    expected = [r[schema.PATH] for r in rows if r[schema.LABEL] == "ai" or r[schema.PROVENANCE] in schema.DEFINITE_AI]
    assert [r[0] for r in found] == sorted(expected)
    listed = line.split("provenance IN (")[1].split(")")[0]
    assert listed == ", ".join(f"'{kind}'" for kind in schema.DEFINITE_AI), "the README names the schema's kinds"


def result_model_id(cfg):
    return parse_checkpoint(read_checkpoint_bytes(cfg.checkpoint)).model_id


def test_golden_resize_scores_match_direct_model(corpus_scan, corpus, tiny_checkpoint):
    _, cfg = corpus_scan
    rows = {r[schema.PATH]: r for r in read_scores(cfg.out)}
    # Modes whose conversion to RGB is PIL's plain convert(); 16-bit and palette alpha are covered in test_decode.
    pngs = [p for p in corpus["default"] if p.endswith(("rgb.png", "rgba.png", "gray_alpha.png", "one_pixel.png"))]
    assert len(pngs) == 4
    expected = reference_scores(tiny_checkpoint, pngs, "resize")
    got = [rows[p][schema.SCORE] for p in pngs]
    assert np.ptp(got) > 1e-3, "scores should differ between images for a meaningful comparison"
    np.testing.assert_allclose(got, [expected[p] for p in pngs], atol=1e-4)


def test_golden_center_crop_scores_match_direct_model(ray_cluster, corpus, tiny_checkpoint, tmp_path):
    png_dir = os.path.join(corpus["root"], "png")
    cfg = ScanConfig(sources=(png_dir,), out=str(tmp_path / "cc"), checkpoint=tiny_checkpoint, preprocess="center-crop")
    run_scan(cfg)
    rows = {r[schema.PATH]: r for r in read_scores(cfg.out)}
    pngs = [p for p in rows if p.endswith(("rgb.png", "rgba.png", "gray_alpha.png", "one_pixel.png"))]
    assert {r[schema.PREPROCESS] for r in rows.values()} == {"center-crop"}
    expected = reference_scores(tiny_checkpoint, pngs, "center-crop")
    np.testing.assert_allclose([rows[p][schema.SCORE] for p in pngs], [expected[p] for p in pngs], atol=1e-4)


def test_report_and_run_record(corpus_scan, corpus):
    result, cfg = corpus_scan
    summary = result.summary
    assert summary.total == len(corpus["all_files"])
    expected_failed = sum(1 for s in corpus["all_files"].values() if s.value != "ok")
    assert summary.failed == expected_failed
    assert summary.status_counts["too_large"] == 2
    assert sum(summary.histogram["all"]) == summary.ok
    assert summary.label_counts["ai"] + summary.label_counts["real"] == summary.ok
    prefixes = {p["prefix"]: p for p in summary.prefixes}
    assert prefixes["broken"]["failed"] == prefixes["broken"]["files"]
    assert sum(p["files"] for p in prefixes.values()) == summary.total
    report_dir = os.path.join(cfg.out, schema.REPORT_DIR)
    for name in ("status", "labels", "formats", "histogram", "prefixes", "errors"):
        assert pq.read_table(os.path.join(report_dir, f"{name}.parquet")).num_rows > 0
    with open(os.path.join(report_dir, "histogram.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(cfg.out, schema.RUN_FILE)) as handle:
        run = json.load(handle)
    assert run["status"] == "complete" and run["inputs"] == summary.total
    assert run["resolved"]["preprocess"] == "resize" and run["model_id"] == result_model_id(cfg)
    assert run["versions"]["torch"] and run["cluster_resources"]["CPU"] == 2
    assert summary.facts.images_per_s > 0
    assert 0 < summary.facts.first_result_seconds < summary.facts.wall_seconds
    assert run["attempts"][-1]["first_result_seconds"] == summary.facts.first_result_seconds


def test_plan_uses_gpus_when_present_and_leaves_cpus_for_decode(tiny_checkpoint):
    cfg = ScanConfig(sources=("x",), out="o", checkpoint=tiny_checkpoint)
    assert plan_classifier(cfg, {"CPU": 16, "GPU": 4}) == ClassifierPlan(
        device="cuda",
        actors=(1, 4),
        num_gpus=1,
        num_cpus=1,
        cpu_threads=None,
        decode_tasks=12,
        decode_cpus_per_actor=3.0,
    )
    cpu = plan_classifier(cfg, {"CPU": 2})
    assert cpu.device == "cpu" and cpu.actors == (1, 1) and cpu.num_cpus == 1
    assert cpu.decode_tasks == 1
    wide = plan_classifier(cfg, {"CPU": 64, "GPU": 8, "memory": 1e12})
    assert wide.decode_tasks == 56 and wide.decode_cpus_per_actor == 7.0
    fixed = ScanConfig(sources=("x",), out="o", checkpoint=tiny_checkpoint, decode_tasks=100)
    assert plan_classifier(fixed, {"CPU": 16, "GPU": 2}).decode_tasks == 100
    with pytest.raises(ConfigError, match="decode-tasks"):
        ScanConfig(sources=("x",), out="o", checkpoint=tiny_checkpoint, decode_tasks=0)
    with pytest.raises(ConfigError, match="no CPU for decoding"):
        plan_classifier(ScanConfig(sources=("x",), out="o", checkpoint=tiny_checkpoint, actors=(2, 2)), {"CPU": 2})


def test_block_size_spreads_small_scans_and_caps_large_ones():
    from aidetect_batch.scan.runner import block_size

    assert block_size(600, 2) == 37
    assert block_size(10, 2) == 16
    assert block_size(10_000_000, 64) == 256


def test_block_size_divides_or_multiplies_the_classifier_batch():
    from aidetect_batch.scan.runner import block_size

    assert block_size(600, 2, batch_size=64) == 32
    assert block_size(600, 2, batch_size=16) == 32
    assert block_size(10, 2, batch_size=64) == 16
    assert block_size(10_000_000, 64, batch_size=64) == 256
    assert block_size(10_000_000, 64, batch_size=100) == 200
    assert block_size(10_000_000, 64, batch_size=512) == 256
    assert block_size(600, 2, batch_size=7) == 35
    assert block_size(100, 2, batch_size=24) == 12
    assert block_size(300, 2, batch_size=20) == 10


@pytest.mark.slow  # a whole Ray scan: moved out of the default suite to keep it under 10 minutes (--runslow)
def test_classifier_actors_run_whole_batches(ray_cluster, tmp_path):
    """Rows scored in one forward pass share its per-image time, so equal ``t_infer_ms`` values count
    a batch's rows. 300 files on 2 CPUs made 18-row blocks before, run as batches of 16 + 2."""
    from aidetect_batch.detectors.checkpoints import save_checkpoint

    checkpoint = str(tmp_path / "small_input.pt")
    save_checkpoint(checkpoint, tiny_model(), "resnet_tiny", preprocess="center-crop", input_size=32)
    root = tmp_path / "photos"
    root.mkdir()
    jpeg = encode(photo(40, 40, seed=2), "JPEG", quality=90)
    for i in range(300):
        (root / f"{i:03d}.jpg").write_bytes(jpeg)
    out = run_scan(ScanConfig(sources=(str(root),), out=str(tmp_path / "out"), checkpoint=checkpoint, batch_size=16))
    assert out.run["shard_rows"] == 16
    rows = pq.read_table(out.files).to_pylist()
    assert len(rows) == 300 and {r[schema.STATUS] for r in rows} == {"ok"}
    batches = sorted(collections.Counter(r[schema.T_INFER_MS] for r in rows).values())
    assert batches == [12] + [16] * 18, batches


def test_each_finished_block_reaches_the_driver_before_the_next_is_done(ray_cluster):
    """Ray Data's default prefetch held block k back until block k+1 was done (a whole Classifier task)."""
    from ray.data import ActorPoolStrategy

    from aidetect_batch.scan.runner import delivered

    class _Stamped:
        """Takes a second per batch and stamps the time it finished on its rows (defined here so
        Ray pickles it by value: workers cannot import test modules)."""

        def __call__(self, batch: pa.Table) -> pa.Table:
            time.sleep(1.0)
            return batch.append_column("done", pa.array([time.time()] * batch.num_rows))

    blocks = [pa.table({"id": np.arange(k * 8, k * 8 + 8)}) for k in range(4)]
    ds = ray_cluster.data.from_arrow(blocks).map_batches(
        _Stamped, batch_size=8, batch_format="pyarrow", compute=ActorPoolStrategy(size=1)
    )
    arrivals = [(batch.column("done")[0].as_py(), time.time()) for batch in delivered(ds)]
    assert len(arrivals) == 4
    done = sorted(d for d, _ in arrivals)
    for (finished, received), next_finished in zip(sorted(arrivals)[:-1], done[1:], strict=True):
        assert finished <= received < next_finished


@pytest.mark.slow  # a whole Ray scan: moved out of the default suite to keep it under 10 minutes (--runslow)
def test_checkpoint_metadata_sets_policy_threshold_and_normalisation(ray_cluster, corpus, tmp_path):
    from helpers import tiny_model

    from aidetect_batch.detectors.checkpoints import save_checkpoint

    model = tiny_model(seed=3)
    ckpt = str(tmp_path / "meta.pt")
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    save_checkpoint(ckpt, model, "resnet_tiny", preprocess="center-crop", threshold=0.99, mean=mean, std=std)
    png_dir = os.path.join(corpus["root"], "png")
    result = run_scan(ScanConfig(sources=(png_dir,), out=str(tmp_path / "a"), checkpoint=ckpt))
    rows = {r[schema.PATH]: r for r in read_scores(str(tmp_path / "a"))}
    assert result.run["resolved"]["preprocess"] == "center-crop" and result.run["resolved"]["threshold"] == 0.99
    ok = [r for r in rows.values() if r[schema.STATUS] == "ok"]
    assert {r[schema.PREPROCESS] for r in ok} == {"center-crop"}
    assert all(r[schema.LABEL] == ("ai" if r[schema.SCORE] >= 0.99 else "real") for r in ok)

    path = os.path.join(png_dir, "rgb.png")
    transform = T.Compose([T.CenterCrop(224), T.ToTensor(), T.Normalize(mean, std)])
    with torch.inference_mode():
        expected = torch.sigmoid(model(transform(Image.open(path).convert("RGB"))[None])[0, 0]).item()
    assert abs(rows[path][schema.SCORE] - expected) < 1e-4

    override = ScanConfig(sources=(path,), out=str(tmp_path / "b"), checkpoint=ckpt, threshold=0.0)
    assert run_scan(override).summary.label_counts["ai"] == 1


def test_file_vanished_after_listing_becomes_an_unreadable_row(corpus, tmp_path):
    from aidetect_batch.scan.cpu_stage import PrepareOptions, prepare_batch

    good = os.path.join(corpus["root"], "png", "rgb.png")
    gone = str(tmp_path / "deleted-after-listing.jpg")
    batch = pa.table({schema.PATH: [good, gone], schema.SOURCE: ["/", "/"]})
    table = prepare_batch(batch, PrepareOptions(policy="resize", max_pixels=10**8))
    rows = table.drop_columns([schema.IMAGE]).to_pylist()
    assert [r[schema.STATUS] for r in rows] == ["ok", "unreadable"]
    assert "FileNotFoundError" in rows[1][schema.ERROR] and rows[1][schema.FILE_SIZE] is None
    assert table.schema.field(schema.WIDTH).type == schema.SCORES_SCHEMA.field(schema.WIDTH).type
    images = table.column(schema.IMAGE).combine_chunks().to_numpy()
    assert images.shape == (2, 224, 224, 3) and images[0].any() and not images[1].any()
