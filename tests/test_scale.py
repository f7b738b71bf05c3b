"""Scale features of the scan: manifests, --sample/--limit, --dedup, crash-safe --resume and --gpu-decode's CPU path."""

import glob
import json
import os
import time
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from helpers import encode, photo, scan_killed_after_commits

from aidetect_batch import schema
from aidetect_batch.errors import ConfigError
from aidetect_batch.inputs import manifest
from aidetect_batch.scan.classifier import Classifier
from aidetect_batch.scan.config import ScanConfig
from aidetect_batch.scan.cpu_stage import PrepareOptions, prepare_batch
from aidetect_batch.scan.runner import run_scan
from aidetect_batch.scan.sink import committed_shards


def scores(out: str) -> pa.Table:
    return pq.read_table(os.path.join(out, schema.SCORES_DIR))


def write_photos(root: str, n: int, side: int = 96, fmt: str = "JPEG") -> list[str]:
    os.makedirs(root, exist_ok=True)
    paths = []
    for i in range(n):
        path = os.path.join(root, f"img_{i:04d}.{'jpg' if fmt == 'JPEG' else 'png'}")
        with open(path, "wb") as handle:
            handle.write(encode(photo(side, side, seed=i % 50 + 1), fmt, **({"quality": 90} if fmt == "JPEG" else {})))
        paths.append(path)
    return paths


def test_manifest_formats_resolve_relative_paths_and_keep_columns(tmp_path):
    root = tmp_path / "m"
    root.mkdir()
    (root / "list.txt").write_text("a/x.jpg\n\n  /abs/y.png  \ns3://bucket/k.jpg\n")
    text = manifest.read_manifest(str(root / "list.txt"))
    assert text.column(schema.PATH).to_pylist() == [str(root / "a/x.jpg"), "/abs/y.png", "s3://bucket/k.jpg"]
    table = pa.table({"path": ["a.jpg", "/b.jpg"], "post_id": [7, 8], "user": ["u1", None]})
    pacsv.write_csv(table, str(root / "m.csv"))
    pq.write_table(table, str(root / "m.parquet"))
    for name in ("m.csv", "m.parquet"):
        got = manifest.read_manifest(str(root / name))
        assert got.column_names == ["path", "source", "post_id", "user"]
        assert got.column("post_id").to_pylist() == [7, 8] and got.column("user").to_pylist() == ["u1", None]
        assert got.column("path").to_pylist() == [str(root / "a.jpg"), "/b.jpg"]
    pq.write_table(pa.table({"file": ["a.jpg"]}), str(root / "bad.parquet"))
    with pytest.raises(manifest.SourceError, match="no 'path' column"):
        manifest.read_manifest(str(root / "bad.parquet"))
    with pytest.raises(manifest.SourceError, match="does not exist"):
        manifest.read_manifest(str(root / "missing.csv"))


def test_sample_and_limit_are_seeded_by_position():
    table = pa.table({"path": [f"/d/{i}.jpg" for i in range(20_000)]})
    tenth = manifest.select(table, sample=0.1, seed=3)
    assert 1_800 < tenth.num_rows < 2_200
    assert manifest.select(table, sample=0.1, seed=3).equals(tenth), "the same seed picks the same rows"
    assert not manifest.select(table, sample=0.1, seed=4).equals(tenth)
    assert (
        manifest.select(table, sample=0.1, limit=5, seed=3).column("path").to_pylist()
        == (tenth.column("path").to_pylist()[:5])
    )
    assert manifest.select(table, limit=3).column("path").to_pylist() == ["/d/0.jpg", "/d/1.jpg", "/d/2.jpg"]
    assert manifest.fingerprint(table) == manifest.fingerprint(pa.concat_tables([table.slice(0, 7), table.slice(7)]))
    assert manifest.fingerprint(table) != manifest.fingerprint(table.slice(1))


@pytest.mark.slow  # a whole Ray scan: moved out of the default suite to keep it under 10 minutes (--runslow)
def test_manifest_scan_carries_columns_and_records_missing_files(ray_cluster, tiny_checkpoint, tmp_path):
    paths = write_photos(str(tmp_path / "imgs"), 6)
    manifest = pa.table(
        {
            "path": [os.path.relpath(p, tmp_path) for p in paths] + [str(tmp_path / "gone.jpg")],
            "post_id": pa.array(range(100, 107), pa.int64()),
            "posted_at": pa.array(np.arange(7) * 86_400_000, pa.timestamp("ms")),
        }
    )
    pq.write_table(manifest, str(tmp_path / "manifest.parquet"))
    cfg = ScanConfig(
        sources=(), manifest=str(tmp_path / "manifest.parquet"), out=str(tmp_path / "out"), checkpoint=tiny_checkpoint
    )
    result = run_scan(cfg)
    table = scores(cfg.out)
    assert table.schema.field("posted_at").type == pa.timestamp("ms")
    rows = {r["post_id"]: r for r in table.to_pylist()}
    assert sorted(rows) == list(range(100, 107))
    assert rows[106][schema.STATUS] == "unreadable" and "gone.jpg" in rows[106][schema.PATH]
    assert all(rows[i][schema.STATUS] == "ok" and rows[i][schema.PATH] == paths[i - 100] for i in range(100, 106))
    assert result.summary.status_counts["unreadable"] == 1
    limited = run_scan(
        ScanConfig(sources=(str(tmp_path / "imgs"),), out=str(tmp_path / "lim"), checkpoint=tiny_checkpoint, limit=2)
    )
    assert scores(limited.out).num_rows == 2


def test_dedup_scores_each_distinct_file_once(ray_cluster, tiny_checkpoint, tmp_path):
    root = tmp_path / "dump"
    root.mkdir()
    a, b = encode(photo(80, 80, seed=1), "JPEG"), encode(photo(80, 80, seed=2), "PNG")
    for name, data in {
        "a1.jpg": a,
        "a2.jpg": a,
        "x/a3.jpg": a,
        "b1.png": b,
        "b2.png": b,
        "c.jpg": encode(photo(80, 80, seed=3), "JPEG"),
    }.items():
        os.makedirs(os.path.dirname(root / name), exist_ok=True)
        (root / name).write_bytes(data)
    result = run_scan(
        ScanConfig(sources=(str(root),), out=str(tmp_path / "out"), checkpoint=tiny_checkpoint, dedup=True)
    )
    rows = {r[schema.PATH]: r for r in scores(result.out).to_pylist()}
    assert len(rows) == 6
    dupes = [r for r in rows.values() if r[schema.STATUS] == "duplicate"]
    assert len(dupes) == 3 and result.summary.duplicates == 3 and result.summary.failed == 0
    for row in dupes:
        original = rows[row[schema.DUPLICATE_OF]]
        assert original[schema.STATUS] == "ok" and original[schema.SHA256] == row[schema.SHA256]
        assert row[schema.SCORE] != row[schema.SCORE], "a copy is not scored again"
    assert sum(r[schema.STATUS] == "ok" for r in rows.values()) == 3


def test_resume_refuses_other_settings_and_skips_finished_work(ray_cluster, tiny_checkpoint, tmp_path):
    write_photos(str(tmp_path / "imgs"), 5)
    cfg = ScanConfig(sources=(str(tmp_path / "imgs"),), out=str(tmp_path / "out"), checkpoint=tiny_checkpoint)
    run_scan(cfg)
    before = {f: os.path.getmtime(f) for f in glob.glob(os.path.join(cfg.out, schema.SCORES_DIR, "*.parquet"))}
    again = run_scan(replace(cfg, resume=True))
    assert again.run["attempts"][-1]["rows_scored"] == 0 and again.run["attempts"][-1]["rows_kept"] == 5
    assert {f: os.path.getmtime(f) for f in before} == before and scores(cfg.out).num_rows == 5
    with pytest.raises(ConfigError, match="preprocess: was 'resize', now 'center-crop'"):
        run_scan(replace(cfg, resume=True, preprocess="center-crop"))
    with pytest.raises(ConfigError, match="inputs: was"):
        run_scan(replace(cfg, resume=True, limit=3))
    with pytest.raises(ConfigError, match="holds no scan to resume"):
        run_scan(replace(cfg, resume=True, out=str(tmp_path / "none")))


@pytest.mark.slow  # two whole scans (25 s); test_gpu_fallback scans the GPU plan on CPU, and the batched
# decode test below checks the --gpu-decode path's statuses and scores without Ray.
def test_gpu_decode_falls_back_to_the_cpu_path_without_cuda(ray_cluster, corpus, tiny_checkpoint, tmp_path):
    # --gpu-decode decodes one image per row, so it leaves videos unsupported and animations their first frame:
    # both paths are compared on that footing.
    base = ScanConfig(sources=(corpus["root"],), out=str(tmp_path / "cpu"), checkpoint=tiny_checkpoint, video_frames=0)
    plain = run_scan(base)
    moved = run_scan(replace(base, out=str(tmp_path / "gpu"), gpu_decode=True))
    keys = [schema.STATUS, schema.FORMAT, schema.WIDTH, schema.HEIGHT, schema.ERROR, schema.SCORE]

    def by_path(result):
        return {r[schema.PATH]: tuple(r[k] for k in keys) for r in scores(result.out).to_pylist()}

    a, b = by_path(plain), by_path(moved)
    assert a.keys() == b.keys()
    for path in a:
        assert a[path][:5] == b[path][:5], path
        assert (a[path][5] != a[path][5] and b[path][5] != b[path][5]) or abs(a[path][5] - b[path][5]) < 1e-5


def test_batched_torchvision_jpeg_decode_matches_the_pil_path(tiny_checkpoint, tmp_path):
    """The nvJPEG code path, run with torchvision's CPU decoder: same statuses, scores within tolerance,
    with JPEGs decoded by torchvision and a PNG decoded per file in the same batch."""
    paths = write_photos(str(tmp_path / "j"), 6, side=300)
    paths.insert(2, write_photos(str(tmp_path / "p"), 1, side=260, fmt="PNG")[0])
    (tmp_path / "j" / "cut.jpg").write_bytes(open(paths[0], "rb").read()[:2000])
    paths.append(str(tmp_path / "j" / "cut.jpg"))
    listing = pa.table({schema.PATH: paths, schema.SOURCE: [str(tmp_path)] * len(paths)})
    with open(tiny_checkpoint, "rb") as handle:
        ckpt = handle.read()
    opts = PrepareOptions(policy="resize", max_pixels=10**8, size=224, decode_later=True)
    raw = prepare_batch(listing, opts)
    torch_table = Classifier(ckpt, device="cpu", decode_options=opts, torch_decode=True)(raw)
    assert schema.DATA not in torch_table.column_names and schema.IMAGE not in torch_table.column_names
    torch_path = torch_table.to_pylist()
    assert torch_path[2][schema.FORMAT] == "PNG" and torch_path[2][schema.STATUS] == "ok"
    pil_path = Classifier(ckpt, device="cpu")(
        prepare_batch(listing, PrepareOptions(policy="resize", max_pixels=10**8))
    ).to_pylist()
    for got, want in zip(torch_path, pil_path, strict=True):
        assert (got[schema.STATUS], got[schema.WIDTH], got[schema.HEIGHT]) == (
            want[schema.STATUS],
            want[schema.WIDTH],
            want[schema.HEIGHT],
        )
        if want[schema.STATUS] == "ok":
            assert abs(got[schema.SCORE] - want[schema.SCORE]) < 0.02
    assert pil_path[-1][schema.STATUS] == "truncated"


@pytest.mark.slow
def test_resume_after_kill_9_gives_every_input_exactly_one_row(ray_cluster, tmp_path, tiny_checkpoint):
    """kill -9 the whole scan (driver and its local Ray) part-way, resume, and check the exact-once invariant."""
    imgs = write_photos(str(tmp_path / "imgs"), 240, side=160)
    out = str(tmp_path / "out")
    args = [str(tmp_path / "imgs"), "--out", out, "--checkpoint", tiny_checkpoint, "--commit-every", "0"]
    args += ["--rows-per-file", "1"]
    scores_dir = os.path.join(out, schema.SCORES_DIR)
    scan_killed_after_commits(args, scores_dir, commits=2, env={**os.environ, "RAY_DISABLE_IMPORT_WARNING": "1"})
    time.sleep(1)
    done, kept_rows, kept_files = committed_shards(scores_dir)
    assert 0 < kept_rows < len(imgs), "killed part-way"
    kept = {f: open(f, "rb").read() for f in kept_files}
    with open(os.path.join(out, schema.RUN_FILE)) as handle:
        assert json.load(handle)["status"] == "running"

    result = run_scan(ScanConfig(sources=(str(tmp_path / "imgs"),), out=out, checkpoint=tiny_checkpoint, resume=True))
    table = scores(out)
    paths = table.column(schema.PATH).to_pylist()
    assert sorted(paths) == sorted(imgs), "every input has exactly one row"
    assert all(s == "ok" for s in table.column(schema.STATUS).to_pylist())
    assert {f: open(f, "rb").read() for f in kept_files} == kept, "finished files are kept as they were"
    attempt = result.run["attempts"][-1]
    assert attempt["rows_kept"] == kept_rows and attempt["rows_scored"] == len(imgs) - kept_rows
    assert not [n for n in os.listdir(scores_dir) if n.startswith(".")], "partial files never reach the results"
