"""Streamed listing of S3 prefixes: page by page while the scan runs, same rows as the driver's listing, resumable.

Everything talks to moto's S3 server on 127.0.0.1.
"""

import json
import os
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import s3fs
from helpers import encode, photo

from aidetect_batch import schema
from aidetect_batch.bench import suites
from aidetect_batch.errors import ConfigError
from aidetect_batch.inputs import item, manifest, sources, stamps
from aidetect_batch.scan import runner
from aidetect_batch.scan.config import ScanConfig
from aidetect_batch.scan.runner import run_scan
from aidetect_batch.scan.sink import committed_shards

EXTENSIONS = ScanConfig(sources=("x",), out="y", checkpoint="z").extensions


@pytest.fixture(scope="module")
def bucket(s3_server, ray_after_moto):
    """30 JPEGs in nested folders plus everything the listing must skip or keep as a bad row."""
    fs = s3fs.S3FileSystem(anon=False)
    fs.mkdir("streamed")
    jpeg = encode(photo(48, 40, seed=3), "JPEG", quality=90)
    names = [f"posts/{d}/{i:03d}.jpg" for d in ("2024-01", "2024-02", "2024-03") for i in range(10)]
    for i, name in enumerate(names):
        fs.pipe(f"streamed/{name}", encode(photo(48, 40, seed=i + 1), "JPEG", quality=90) if i % 7 else jpeg)
    fs.pipe("streamed/posts/.hidden.jpg", jpeg)
    fs.pipe("streamed/posts/2024-01/._mac.jpg", b"x")
    fs.pipe("streamed/posts/2024-02/notes.txt", b"text")
    fs.pipe("streamed/posts/2024-03/", b"")
    fs.pipe("streamed/posts/2024-03/zero.jpg", b"")
    fs.pipe("streamed/other/elsewhere.jpg", jpeg)
    return fs


def listed(units, page_keys=7, **kwargs):
    pages = list(sources.iter_listing(units, EXTENSIONS, page_keys=page_keys, **kwargs))
    return pages, [p for page in pages for p in page.paths]


def test_iter_listing_pages_match_the_full_listing(bucket):
    units = sources.listing_units(
        ("s3://streamed/posts", "s3://streamed/posts/2024-02", "s3://streamed/other/elsewhere.jpg")
    )
    assert units == [("s3://streamed/posts", True), ("s3://streamed/other/elsewhere.jpg", False)], (
        "inner prefix dropped"
    )
    pages, paths = listed(units)
    assert len(pages) >= 5, "several listing pages"
    full = sources.list_sources(("s3://streamed/posts", "s3://streamed/other/elsewhere.jpg"), EXTENSIONS)
    assert paths == full.column(schema.PATH).to_pylist()
    assert [r for page in pages for r in page.roots] == full.column(schema.SOURCE).to_pylist()
    assert "s3://streamed/posts/2024-03/zero.jpg" in paths, "zero-byte files are kept, to become 'empty' rows"
    assert not [p for p in paths if "/." in p or p.endswith(("/", ".txt"))]
    with pytest.raises(sources.SourceError, match="does not exist"):
        sources.listing_units(("s3://streamed/nothing-here",))
    assert sources.streamable(("s3://a/b", "s3://c")) and not sources.streamable(("s3://a/*.jpg",))
    assert not sources.streamable(("/local/dir",))


class CountingCalls:
    """Counts ListObjectsV2 requests that reach the real S3 server."""

    def __init__(self, monkeypatch):
        self.lists = 0
        original = s3fs.S3FileSystem.call_s3

        def call_s3(fs, method, *args, **kwargs):
            self.lists += method == "list_objects_v2"
            return original(fs, method, *args, **kwargs)

        monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", call_s3)


def stream(units, state, **kwargs):
    options = {"sample": None, "limit": None, "seed": 0, "committed": {}, "shard_rows": 4, "page_keys": 5}
    options.update(kwargs)
    return manifest.stream_shards(None, units, EXTENSIONS, all_files=False, storage_options={}, state=state, **options)


def test_stream_shards_yields_the_first_shard_after_one_page(bucket, monkeypatch):
    counter = CountingCalls(monkeypatch)
    state = ray.remote(num_cpus=0)(manifest.ListingState).remote()
    shards = stream([("s3://streamed/posts", True)], state, shard_rows=3)
    first = next(shards)
    assert counter.lists == 1, "the first shard (3 of the first page's 5 keys pass) comes after a single page"
    assert first.column(schema.SHARD).to_pylist() == [0] * 3
    assert first.column(schema.SHARD_ROWS).to_pylist() == [3] * 3
    rest = list(shards)
    assert counter.lists >= 7
    snapshot = ray.get(state.snapshot.remote())
    assert snapshot["finished"]["rows"] == 31 and snapshot["finished"]["changed"] is None
    full = sources.list_sources(("s3://streamed/posts",), EXTENSIONS)
    assert snapshot["finished"]["fingerprint"] == manifest.fingerprint(full)
    assert [p for t in [first, *rest] for p in t.column(schema.PATH).to_pylist()] == full.column("path").to_pylist()


def test_stream_shards_select_like_the_driver_and_check_committed_shards(bucket):
    full = sources.list_sources(("s3://streamed/posts",), EXTENSIONS)
    state = ray.remote(num_cpus=0)(manifest.ListingState).remote()
    got = list(stream([("s3://streamed/posts", True)], state, sample=0.5, limit=9, seed=4))
    want = manifest.select(full, 0.5, 9, seed=4).column(schema.PATH).to_pylist()
    assert [p for t in got for p in t.column(schema.PATH).to_pylist()] == want
    assert [t.column(schema.SHARD)[0].as_py() for t in got] == [0, 1, 2]

    committed = {0: manifest.shard_digest(want[:4]), 1: manifest.shard_digest(list(reversed(want[4:8])))}
    again = list(stream([("s3://streamed/posts", True)], state, sample=0.5, limit=9, seed=4, committed=committed))
    assert [t.column(schema.SHARD)[0].as_py() for t in again] == [2], "committed shards are not listed again"
    assert ray.get(state.snapshot.remote())["finished"]["changed"] is None

    moved = {0: manifest.shard_digest(want[1:5])}
    assert list(stream([("s3://streamed/posts", True)], state, sample=0.5, limit=9, seed=4, committed=moved)) == []
    assert "shard 0" in ray.get(state.snapshot.remote())["finished"]["changed"]


def test_a_streamed_resume_stops_at_a_committed_shard_whose_archive_was_rewritten(bucket):
    """The listing pages carry each archive's ETag: it reaches the shard's digest, and a resumed listing whose
    archive has another one says which; digests written before stamps are compared by their paths only."""
    bucket.pipe("streamed/arch/a.tar", b"tar bytes")
    bucket.pipe("streamed/arch/b.jpg", b"jpeg bytes")
    bucket.pipe("streamed/arch/c.zip", b"zip bytes")
    units = [("s3://streamed/arch", True)]
    state = ray.remote(num_cpus=0)(manifest.ListingState).remote()

    def shards(committed):
        options = {"sample": None, "limit": None, "seed": 0, "shard_rows": 2, "committed": committed}
        found = manifest.stream_shards(
            None, units, item.listed_extensions(EXTENSIONS), all_files=False, storage_options={}, state=state, **options
        )
        return list(found), ray.get(state.snapshot.remote())["finished"]["changed"]

    first, _ = shards({})
    table = pa.concat_tables(first)
    assert table.column(schema.PATH).to_pylist() == [f"s3://streamed/arch/{n}" for n in ("a.tar", "b.jpg", "c.zip")]
    found = table.column(stamps.COLUMN).to_pylist()
    assert found[0].startswith("etag:") and found[1] is None and found[2].startswith("etag:")
    committed = {0: manifest.shard_digest(table.column(schema.PATH).to_pylist()[:2], found[:2])}
    assert shards(committed) == ([first[1]], None), "the committed shard is skipped"
    assert shards({0: committed[0].split("~")[0]})[1] is None, "a digest from before stamps: paths only"
    bucket.pipe("streamed/arch/a.tar", b"other bytes")
    again, changed = shards(committed)
    assert again == [] and "shard 0 (rows 0-1) holds an archive rewritten" in changed
    assert "s3://streamed/arch/a.tar" in changed and "b.jpg" not in changed


def test_a_streamed_listing_hands_on_about_a_page_per_block(s3_server, ray_after_moto):
    """Ray Data gathers the listing task's shards into blocks of the dataset's block size: the scan's
    64 KiB makes the first block about one listing page; 4 MiB (the earlier setting) held them all."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    s3fs.S3FileSystem(anon=False).mkdir("pages")
    store = s3_backends[DEFAULT_ACCOUNT_ID]["global"]  # setup only (2,300 PUTs over HTTP take ~25 s); listing uses HTTP
    for i in range(2300):
        store.put_object("pages", f"dump/{i // 1000:04d}/{i:07d}.jpg", b"x")
    result = suites.listing("s3://pages/dump", rounds=1)
    assert result["keys"] == 2300
    small, large = result["streamed"]
    assert small["block_bytes"] == runner.STREAM_BLOCK_BYTES and large["block_bytes"] == 4 << 20
    assert small["keys"] == large["keys"] == 2300
    assert small["first_block_keys"] <= 1280 and small["blocks"] >= 2, "the first block is about one page"
    assert large["first_block_keys"] == 2300 and large["blocks"] == 1, "4 MiB waits for the whole listing"
    assert suites.listing_lines(result)[1].startswith("streamed,    64 KiB blocks: first block after")


def scores(out):
    return pq.read_table(os.path.join(out, schema.SCORES_DIR)).sort_by(schema.PATH)


@pytest.mark.slow
def test_streamed_scan_matches_a_listed_scan_and_resumes(bucket, tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(runner, "STREAM_SHARD_ROWS", 4)
    base = ScanConfig(sources=("s3://streamed/posts",), out=str(tmp_path / "streamed"), checkpoint=tiny_checkpoint)
    base = replace(base, rows_per_file=4, commit_every_s=0.0, batch_size=4, decode_batch_size=4)
    streamed = run_scan(base)
    full = sources.list_sources(("s3://streamed/posts",), EXTENSIONS)
    listed_scan = run_scan(replace(base, out=str(tmp_path / "listed")), listing=full)

    a, b = scores(base.out), scores(str(tmp_path / "listed"))
    assert a.num_rows == 31 == b.num_rows
    columns = [schema.PATH, schema.SOURCE, schema.STATUS, schema.SCORE, schema.LABEL]
    assert a.select(columns).to_pandas().equals(b.select(columns).to_pandas())
    assert a.column(schema.STATUS).to_pylist().count("empty") == 1
    identity = streamed.run["identity"]
    assert identity["inputs"] == listed_scan.run["identity"]["inputs"] == manifest.fingerprint(full)
    assert identity["input_rows"] == 31 and streamed.run["inputs"] == 31
    assert streamed.summary.status_counts["ok"] == 30

    scores_dir = os.path.join(base.out, schema.SCORES_DIR)
    done, _, files = committed_shards(scores_dir)
    assert len(done) == 8 and all(done.values()), "every shard committed with its path digest"
    assert len(files) >= 2
    lost = files[0]
    lost_rows = pq.read_metadata(lost).num_rows
    os.remove(lost)
    resumed = run_scan(replace(base, resume=True))
    assert resumed.run["attempts"][-1]["rows_scored"] == lost_rows
    assert scores(base.out).column(schema.PATH).to_pylist() == a.column(schema.PATH).to_pylist(), "exactly once"

    os.remove(files[-1])
    bucket.pipe("streamed/posts/2024-01/000a.jpg", encode(photo(48, 40, seed=99), "JPEG"))
    try:
        with pytest.raises(ConfigError, match="listing of s3://streamed/posts changed"):
            run_scan(replace(base, resume=True))
    finally:
        bucket.rm("streamed/posts/2024-01/000a.jpg")
    with open(os.path.join(base.out, schema.RUN_FILE)) as handle:
        assert json.load(handle)["status"] == "running"


def test_streamed_resume_refuses_other_selection(bucket, tmp_path, tiny_checkpoint):
    out = str(tmp_path / "out")
    cfg = ScanConfig(sources=("s3://streamed/other",), out=out, checkpoint=tiny_checkpoint)
    run_scan(cfg)
    with pytest.raises(ConfigError, match="limit"):
        run_scan(replace(cfg, resume=True, limit=1))
