"""A dump no file of which may kill, hang or swamp the scan: odd names, special files, link loops, huge files."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
import urllib.parse
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import c2pa_signed_jpeg, encode, photo

from aidetect_batch import schema
from aidetect_batch.inputs import sources
from aidetect_batch.inputs.sources import DEFAULT_EXTENSIONS
from aidetect_batch.scan.config import ScanConfig
from aidetect_batch.scan.cpu_stage import PrepareOptions, prepare_batch
from aidetect_batch.scan.runner import run_scan

LATIN1_NAME = b"caf\xe9 100%.jpg"
ODD_NAMES = (
    "line\nbreak.jpg",
    'quote\'s "double".jpg',
    "<img src=x onerror=alert(1)>&amp;.jpg",
    "emoji \U0001f600.jpg",
)
SPARSE_BYTES = 4 << 30
CAP_MB = 1


def _read_bytes() -> int:
    """Bytes this process has read through read(2) so far (Linux ``/proc/self/io``)."""
    with open("/proc/self/io") as handle:
        return int(next(line for line in handle if line.startswith("rchar:")).split()[1])


def _hostile_metadata(good: bytes) -> list[tuple[str, bytes, str]]:
    """Files whose metadata attacks the provenance reader: a zTXt chunk that inflates to 55 MB, a C2PA
    marker with no manifest behind it, and a signed manifest with its claim overwritten."""
    png = encode(photo(96, 64, seed=4), "PNG")
    body = b"parameters\x00\x00" + zlib.compress(b"Steps: 20, " * 5_000_000, 9)
    chunk = struct.pack(">I", len(body)) + b"zTXt" + body + struct.pack(">I", zlib.crc32(b"zTXt" + body))
    forged = good[:2] + b"\xff\xeb\x00\x20JP\x00\x01\x00\x00\x00\x01jumb\x00\x00\x00\x10jumdc2pa" + bytes(6) + good[2:]
    damaged = bytearray(c2pa_signed_jpeg("trainedAlgorithmicMedia"))
    claim = damaged.find(b"c2pa.claim")
    damaged[claim + 40 : claim + 48] = bytes(8)
    return [
        ("text_bomb.png", png[:33] + chunk + png[33:], "undecodable"),
        ("forged_c2pa.jpg", forged, "ok"),
        ("damaged_c2pa.jpg", bytes(damaged), "ok"),
    ]


@pytest.fixture(scope="module")
def dump(tmp_path_factory) -> dict:
    """A folder holding every kind of entry a real-world dump can hold, with what the scan must make of it."""
    root = str(tmp_path_factory.mktemp("dump"))
    good = encode(photo(96, 64, seed=3), "JPEG")
    rows = {}
    for name in ("plain.jpg", *ODD_NAMES):
        with open(os.path.join(root, name), "wb") as handle:
            handle.write(good)
        rows[os.path.join(root, name)] = "ok"
    with open(os.path.join(os.fsencode(root), LATIN1_NAME), "wb") as handle:
        handle.write(good)
    latin1 = os.fsdecode(os.path.join(os.fsencode(root), LATIN1_NAME))
    rows[sources.escape_path(latin1)[0]] = "ok"
    os.makedirs(os.path.join(root, "sub", "deeper"))
    os.symlink("..", os.path.join(root, "sub", "deeper", "loop"))
    os.symlink(os.path.join(root, "plain.jpg"), os.path.join(root, "sub", "link.jpg"))
    rows[os.path.join(root, "sub", "link.jpg")] = "ok"
    os.symlink("nowhere.jpg", os.path.join(root, "dangling.jpg"))
    rows[os.path.join(root, "dangling.jpg")] = "unreadable"
    os.mkfifo(os.path.join(root, "pipe.jpg"))
    server = socket.socket(socket.AF_UNIX)
    server.bind(os.path.join(root, "sock.jpg"))
    huge = os.path.join(root, "huge_video.mp4")
    with open(huge, "wb") as handle:
        handle.truncate(SPARSE_BYTES)
    rows[huge] = "too_large"
    for name, data, status in _hostile_metadata(good):
        with open(os.path.join(root, name), "wb") as handle:
            handle.write(data)
        rows[os.path.join(root, name)] = status
    yield {"root": root, "rows": rows, "huge": huge, "latin1": latin1}
    server.close()


def test_listing_walks_links_once_and_skips_special_files(dump):
    walk = sources.walk_local(dump["root"], DEFAULT_EXTENSIONS, all_files=True)
    assert sorted(sources.escape_path(p)[0] for p in walk.files) == sorted(dump["rows"])
    assert walk.skipped == {"named pipe": 1, "socket": 1, "link to a folder already walked": 1}


def test_a_name_that_is_not_utf8_is_escaped_reversibly():
    escaped, raw = sources.escape_path(os.fsdecode(b"/d/" + LATIN1_NAME))
    assert escaped == "/d/caf%E9 100%25.jpg" and raw == b"/d/" + LATIN1_NAME
    assert urllib.parse.unquote_to_bytes(escaped) == raw
    assert sources.escape_path("/d/100% real.jpg") == ("/d/100% real.jpg", None)


def test_hostile_dump_scans_to_one_row_per_listed_file(ray_cluster, dump, tiny_checkpoint, tmp_path):
    cfg = ScanConfig(
        sources=(dump["root"],),
        out=str(tmp_path / "out"),
        checkpoint=tiny_checkpoint,
        all_files=True,
        max_file_mb=CAP_MB,
    )
    result = run_scan(cfg)
    rows = {r[schema.PATH]: r for r in pq.read_table(os.path.join(cfg.out, schema.SCORES_DIR)).to_pylist()}
    assert {p: r[schema.STATUS] for p, r in rows.items()} == dump["rows"]
    huge = rows[dump["huge"]]
    assert huge[schema.FILE_SIZE] == SPARSE_BYTES and "--max-file-mb" in huge[schema.ERROR]
    assert huge[schema.SHA256] is None
    assert "FileNotFoundError" in rows[os.path.join(dump["root"], "dangling.jpg")][schema.ERROR]
    latin1 = rows[sources.escape_path(dump["latin1"])[0]]
    assert latin1[schema.SHA256] == rows[os.path.join(dump["root"], "plain.jpg")][schema.SHA256]
    assert result.summary.total == len(dump["rows"])
    assert rows[os.path.join(dump["root"], "damaged_c2pa.jpg")][schema.PROVENANCE] == "c2pa_invalid"
    assert rows[os.path.join(dump["root"], "text_bomb.png")][schema.PROVENANCE] is None


def test_special_and_oversized_files_named_directly_are_rows_and_never_read(dump):
    """A manifest can name what a listing skips: the pipe and the socket become unreadable rows without
    blocking, and the 4 GiB file a too_large row without a byte of it read."""
    paths = [os.path.join(dump["root"], n) for n in ("pipe.jpg", "sock.jpg")] + [dump["huge"]]
    batch = pa.table({schema.PATH: paths, schema.SOURCE: [dump["root"]] * 3})
    options = PrepareOptions(policy="resize", max_pixels=10**8, max_file_bytes=CAP_MB << 20)
    done: dict = {}
    before = _read_bytes()
    worker = threading.Thread(target=lambda: done.update(table=prepare_batch(batch, options)), daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(timeout=20)
    assert "table" in done, "reading a special file blocked"
    assert _read_bytes() - before < 1 << 20
    assert time.monotonic() - started < 20
    rows = done["table"].drop_columns([schema.IMAGE]).to_pylist()
    assert [r[schema.STATUS] for r in rows] == ["unreadable", "unreadable", "too_large"]
    assert "named pipe" in rows[0][schema.ERROR] and "socket" in rows[1][schema.ERROR]
    assert rows[2][schema.FILE_SIZE] == SPARSE_BYTES


def test_a_stalled_s3_read_fails_over_within_its_timeout():
    """An endpoint that accepts connections and never answers: the read ends with a timeout error (which
    the CPU stage records as an unreadable row) instead of blocking a decode task forever."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held = []
    threading.Thread(target=lambda: [held.append(listener.accept()) for _ in iter(int, 1)], daemon=True).start()
    options = {
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{listener.getsockname()[1]}"},
        "config_kwargs": {"read_timeout": 0.5, "connect_timeout": 0.5},
        "key": "testing",
        "secret": "testing",
    }
    started = time.monotonic()
    with pytest.raises(sources.TIMEOUT_ERRORS):
        sources.read_file("s3://bucket/stalled.jpg", options)
    elapsed = time.monotonic() - started
    assert len(held) >= 2, "the client retried nothing"
    assert elapsed < 30, f"a stalled read took {elapsed:.0f}s with a 0.5s timeout"
    listener.close()


def test_a_labelled_file_whose_name_is_not_utf8_is_listed_and_read(tmp_path):
    """Training lists datasets with the same walk: such a file keeps its label and is decoded, not dropped."""
    from aidetect_batch.train import datasets

    good = encode(photo(64, 64, seed=4), "PNG")
    for label, name in (("real", LATIN1_NAME.replace(b".jpg", b".png")), ("ai", b"plain.png")):
        os.makedirs(tmp_path / label)
        with open(os.path.join(os.fsencode(tmp_path / label), name), "wb") as handle:
            handle.write(good)
    listing, _ = datasets.list_labelled(str(tmp_path))
    assert sorted(listing.column(schema.TRUE_LABEL).to_pylist()) == ["ai", "real"]
    table = prepare_batch(listing, PrepareOptions(policy="resize", max_pixels=10**8))
    assert table.column(schema.STATUS).to_pylist() == ["ok", "ok"]
    assert schema.RAW_PATH not in table.column_names
