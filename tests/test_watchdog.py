"""The per-file watchdog: a decoder made to hang becomes a ``timeout`` row, one made to abort a ``crashed`` row,
the rest of the batch is scored as it is without the watchdog, and the watchdog goes on working."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import encode, photo
from PIL import Image
from test_archives import CONTAINERS, write_tar, write_zip
from test_parquet_inputs import write_hf

from aidetect_batch import schema
from aidetect_batch.inputs import item, tars
from aidetect_batch.scan import cpu_stage, watchdog
from aidetect_batch.scan.config import ScanConfig
from aidetect_batch.scan.cpu_stage import PrepareOptions, prepare_batch
from aidetect_batch.scan.runner import run_scan

HANG, ABORT = b"HANG", b"ABORT"
# What the scan's own watchdog preloads, so the tests' forkserver is the one production starts.
PRELOAD = (cpu_stage.__name__,)
TIMING = (schema.T_READ_MS, schema.T_DECODE_MS)


def misbehaving(real):
    """``real`` per file, except that a file starting with ``HANG`` spins in C without end (``sum`` over a range
    never returns to Python) and one starting with ``ABORT`` aborts its process (SIGABRT), as a native decoder
    stuck in a loop or failing an assertion would."""

    def work(data, options):
        first = data if isinstance(data, bytes) else data[0]
        if first.startswith(HANG):
            sum(range(10**18))
        if first.startswith(ABORT):
            os.abort()
        return real(data, options)

    return work


def gone(pid: int, within: float = 5.0) -> bool:
    """Whether process ``pid`` has exited (or is a zombie) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def dog():
    guard = watchdog.Watchdog(PRELOAD)
    yield guard
    guard.close()


def test_a_hang_times_out_an_abort_crashes_and_the_rest_of_the_batch_is_done(dog):
    work = misbehaving(lambda data, factor: len(data) * factor)
    dog.map(work, 1, [b"warm"], timeout=60.0)
    first = dog.pid
    start = time.monotonic()
    results = dog.map(work, 2, [b"a", HANG, b"bb", ABORT, b"ccc"], timeout=1.0)
    took = time.monotonic() - start
    assert results[0::2] == [2, 4, 6]
    hung, aborted = results[1], results[3]
    assert hung.status is schema.Status.TIMEOUT and "--decode-timeout" in hung.error
    assert 1000.0 <= hung.elapsed_ms < 3000.0
    assert aborted.status is schema.Status.CRASHED and "SIGABRT" in aborted.error
    assert took < 8.0, "a restart is a fork from the preloaded server, not a new interpreter"
    assert gone(first), "the hung child was killed"
    assert dog.map(work, 3, [b"dd"], timeout=1.0) == [6], "the watchdog goes on working"


def test_a_python_error_in_one_file_loses_only_that_file(dog):
    results = dog.map(lambda data, _: 1 // len(data), None, [b"x", b"", b"y"], timeout=30.0)
    assert results[0] == results[2] == 1
    assert results[1].status is schema.Status.CRASHED and results[1].error.startswith("ZeroDivisionError")


def rows_then(end: bytes):
    """Work for :meth:`Watchdog.stream`: ``count`` rows carrying bytes, then ``end`` (hang, abort, raise or stop)."""

    def work(count, tag):
        for i in range(count):
            yield (i, tag * (i + 1))
        if end == HANG:
            sum(range(10**18))
        if end == ABORT:
            os.abort()
        if end == b"RAISE":
            raise item.NoItems("raised in the child")

    return work


def test_a_stream_keeps_its_rows_and_ends_in_a_timeout_a_crash_or_the_works_own_error(dog):
    assert list(dog.stream(rows_then(b""), b"ab", 3, timeout=30.0)) == [(0, b"ab"), (1, b"abab"), (2, b"ababab")]
    got = []
    cases = ((HANG, watchdog.TimedOut, "--decode-timeout"), (ABORT, watchdog.Crashed, "SIGABRT"))
    for end, error, says in cases:
        start = time.monotonic()
        with pytest.raises(error, match=says) as stopped:
            got.extend(dog.stream(rows_then(end), b"x", 2, timeout=1.0))
        assert got == [(0, b"x"), (1, b"xx")], "the rows before are kept"
        assert time.monotonic() - start < 8.0
        got.clear()
    assert stopped.value.failure.status is schema.Status.CRASHED
    assert list(dog.stream(rows_then(b""), b"v", 1, timeout=30.0)) == [(0, b"v")]
    pid = dog.pid
    with pytest.raises(item.NoItems, match="raised in the child"):
        list(dog.stream(rows_then(b"RAISE"), b"y", 1, timeout=30.0))
    assert dog.pid == pid, "the work's own error keeps the child"
    partial = dog.stream(rows_then(HANG), b"z", 5, timeout=30.0)
    assert next(partial) == (0, b"z")
    partial.close()
    assert gone(pid), "a stream left unfinished stops its child"
    assert list(dog.stream(rows_then(b""), b"w", 1, timeout=30.0)) == [(0, b"w")], "and the next starts another"


def test_a_child_stuck_in_native_code_does_not_outlive_a_parent_killed_before_its_deadline():
    """A Ray worker killed with -9 mid-file leaves no decoder spinning: the child's own alarm ends it just past
    the deadline, though ``sum`` never returns to Python."""
    script = textwrap.dedent(
        """
        from aidetect_batch.scan import watchdog

        dog = watchdog.Watchdog()
        dog.map(sum, 0, [range(3)], timeout=60.0)
        print(dog.pid, flush=True)
        dog.map(sum, 0, [range(10**18)], timeout=3.0)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        time.sleep(1.0)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    assert not gone(child, within=0.5), "the child spins on after its parent died"
    assert gone(child, within=5.0), "and is gone soon after its deadline"


class Frames:
    """``*.frames``: a text file naming images, one Item read as several views (as a video's frames)."""

    name = "frames"
    views = True
    extensions = ("frames",)

    def accepts(self, unit: item.Item) -> bool:
        return unit.uri.endswith(".frames")

    def items(self, unit: item.Item, options: item.ReadOptions) -> list[item.Item]:
        return [item.Item(unit.uri, kind=self.name)]

    def read(self, found: item.Item, options: item.ReadOptions) -> list[bytes]:
        return [Path(p).read_bytes() for p in Path(found.uri).read_text().split()]


def listing_of(paths: list[str]) -> pa.Table:
    return pa.table({schema.PATH: paths, schema.SOURCE: ["test"] * len(paths)})


@pytest.fixture(scope="module")
def files(corpus, tmp_path_factory) -> list[str]:
    """The hostile corpus (every format, provenance and C2PA files, broken files) and a clip of three frames."""
    paths = sorted(corpus["default"])
    clip = tmp_path_factory.mktemp("frames") / "clip.frames"
    clip.write_text("\n".join([p for p in paths if p.endswith(".jpg") and corpus["default"][p] == "ok"][:3]))
    return [*paths, str(clip)]


def both_ways(listing: pa.Table, options: PrepareOptions) -> tuple[pa.Table, pa.Table]:
    off = prepare_batch(listing, options)
    on = prepare_batch(listing, dataclasses.replace(options, decode_timeout=60.0))
    return off, on


def images_of(table: pa.Table) -> np.ndarray:
    return table.column(schema.IMAGE).combine_chunks().to_numpy()


def assert_same_rows(off: pa.Table, on: pa.Table) -> None:
    pixels = [c for c in (schema.IMAGE, schema.PIXELS) if c in off.column_names]
    assert on.drop_columns([*TIMING, *pixels]).to_pylist() == off.drop_columns([*TIMING, *pixels]).to_pylist()
    if schema.IMAGE in pixels:
        assert np.array_equal(images_of(on), images_of(off))
    elif pixels:
        for got, want in zip(cpu_stage.pixels_of(on), cpu_stage.pixels_of(off), strict=True):
            assert (got is None and want is None) or np.array_equal(got, want)


@pytest.mark.parametrize(
    "changes",
    [
        {"policy": "resize", "phash": True},
        {"policy": "tiles"},
        {"policy": "center-crop", "kinds": (Frames(), item.LOOSE_FILE)},
        {"policy": "resize", "decode_later": True},
    ],
    ids=["resize-phash", "tiles", "views", "gpu-decode"],
)
def test_the_watchdog_changes_no_result(files, changes):
    """Pixels and every column (provenance, C2PA, PDQ, statuses of broken files) equal those decoded in-process."""
    options = PrepareOptions(max_pixels=10**8, **changes)
    off, on = both_ways(listing_of(files), options)
    assert_same_rows(off, on)
    assert "c2pa_ai" in off.column(schema.PROVENANCE).to_pylist()
    if not options.decode_later:
        assert {"ok", "truncated", "undecodable", "too_large"} <= set(off.column(schema.STATUS).to_pylist())


def test_a_hang_and_an_abort_among_real_images_lose_only_their_own_rows(files, tmp_path):
    good = encode(photo(96, 64, seed=1), "JPEG")
    (tmp_path / "hang.jpg").write_bytes(HANG + good)
    (tmp_path / "abort.png").write_bytes(ABORT + good)
    paths = [files[0], str(tmp_path / "hang.jpg"), *files[1:6], str(tmp_path / "abort.png"), *files[6:10]]
    options = PrepareOptions(policy="resize", max_pixels=10**8)
    watched = PrepareOptions(
        policy="resize", max_pixels=10**8, decode_timeout=1.0, per_file=misbehaving(cpu_stage.prepare_file)
    )
    start = time.monotonic()
    rows = prepare_batch(listing_of(paths), watched)
    assert time.monotonic() - start < 10.0
    plain = prepare_batch(listing_of([p for p in paths if "hang" not in p and "abort" not in p]), options)
    by_path = {r[schema.PATH]: r for r in rows.drop_columns([*TIMING, schema.IMAGE]).to_pylist()}
    hung, aborted = by_path.pop(paths[1]), by_path.pop(paths[7])
    assert hung[schema.STATUS] == "timeout" and "--decode-timeout" in hung[schema.ERROR]
    assert aborted[schema.STATUS] == "crashed" and "SIGABRT" in aborted[schema.ERROR]
    assert hung[schema.FILE_SIZE] == len(HANG + good) and hung[schema.SHA256], "what was read is kept"
    assert list(by_path.values()) == plain.drop_columns([*TIMING, schema.IMAGE]).to_pylist()
    images = images_of(rows)
    assert not images[1].any() and not images[7].any(), "no pixels for the lost files"
    kept = np.delete(images, [1, 7], axis=0)
    assert np.array_equal(kept, images_of(plain))


def test_the_cost_of_the_watchdog_per_file_is_measured(files):
    options = PrepareOptions(policy="resize", max_pixels=10**8).file_options
    data = [Path(p).read_bytes() for p in files if p.endswith(".jpg")][:4]
    cost = watchdog.measure_cost(cpu_stage.prepare_file, options, data, preload=PRELOAD, repeats=1)
    assert cost.in_process_ms > 0 and cost.watched_ms > 0 and cost.start_ms > 0
    assert cost.overhead_ms == cost.watched_ms - cost.in_process_ms


@pytest.fixture(scope="module")
def containers(tmp_path_factory) -> list[str]:
    """Archives and a Parquet shard with a member of every outcome: ok, a bomb, an encrypted member, a corrupt
    inner archive, a nested tar, members over --max-members, a truncated tar and a Parquet row without bytes."""
    root = tmp_path_factory.mktemp("containers")
    good = [encode(photo(64, 48, seed=seed), "JPEG") for seed in range(4)]
    inner = write_tar(root / "inner.tar", {"n0.jpg": good[0], "n1.png": encode(photo(40, 40), "PNG")})
    zipped = write_zip(
        root / "mixed.zip",
        {"a.jpg": good[1], "bomb.bmp": b"\0" * (8 << 20), "inner.tar": open(inner, "rb").read(), "bad.zip": b"PK"},
        compression=zipfile.ZIP_DEFLATED,
    )
    many = write_tar(root / "many.tar", {f"{i}.jpg": good[i % 4] for i in range(6)})
    whole = open(write_tar(root / "whole.tar", {"a.jpg": good[2], "b.jpg": good[3] * 20}), "rb").read()
    (root / "cut.tar").write_bytes(whole[: len(whole) // 2])
    locked = bytearray(open(write_zip(root / "locked.zip", {"secret.jpg": good[0]}), "rb").read())
    for signature, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        locked[locked.index(signature) + flag_at] |= 1
    (root / "locked.zip").write_bytes(bytes(locked))
    (root / "empty.tar").write_bytes(b"")
    return [
        zipped,
        many,
        str(root / "cut.tar"),
        str(root / "locked.zip"),
        str(root / "empty.tar"),
        write_hf(root / "hf.parquet"),
    ]


def test_containers_read_under_the_watchdog_give_the_same_rows(containers):
    """Reading archives and Parquet in the child changes no row: statuses of hostile members (raised as
    exceptions that cross the pipe), identities, carried columns and pixels all agree."""
    listing = listing_of(containers)
    carried = item.carried_fields(listing, item.ReadOptions(containers=CONTAINERS))
    few = dataclasses.replace(CONTAINERS, max_members=4, carried=carried)
    off, on = both_ways(listing, PrepareOptions(policy="resize", max_pixels=10**8, containers=few))
    assert_same_rows(off, on)
    statuses = set(off.column(schema.STATUS).to_pylist())
    assert {"ok", "too_large", "unreadable", "empty", "undecodable"} <= statuses
    assert "n1.png" in off.column(schema.MEMBER).to_pylist(), "the nested tar is read"


def hostile_tar() -> tars.Tar:
    """``*.htar``: a tar whose reader hangs in C on a member starting with ``HANG`` and aborts its process on one
    starting with ``ABORT``, as zlib or a Parquet decoder stuck on a hostile stream would. Made in a function so
    that it travels to the child by value: a new child need not import this test module."""

    class HostileTar(tars.Tar):
        name = "htar"
        extensions = ("htar",)

        def read_all(self, unit, options, *, data=None):
            for read in super().read_all(unit, options, data=data):
                if (read.data or b"").startswith(HANG):
                    sum(range(10**18))
                if (read.data or b"").startswith(ABORT):
                    os.abort()
                yield read

    return HostileTar()


def test_a_container_reader_that_hangs_or_aborts_keeps_the_rows_before_and_the_batch_goes_on(tmp_path):
    good = [encode(photo(64, 48, seed=seed), "JPEG") for seed in range(3)]
    hangs = write_tar(tmp_path / "hangs.htar", {"a.jpg": good[0], "stuck.jpg": HANG, "never.jpg": good[1]})
    aborts = write_tar(tmp_path / "aborts.htar", {"boom.jpg": ABORT, "never.jpg": good[1]})
    fine = write_tar(tmp_path / "fine.htar", {"b.jpg": good[2]})
    loose = tmp_path / "loose.jpg"
    loose.write_bytes(good[1])
    kinds = (hostile_tar(), item.LOOSE_FILE)
    options = PrepareOptions(policy="resize", max_pixels=10**8, kinds=kinds, containers=CONTAINERS, decode_timeout=1.0)
    start = time.monotonic()
    rows = prepare_batch(listing_of([hangs, aborts, fine, str(loose)]), options).to_pylist()
    assert time.monotonic() - start < 15.0
    assert [(r[schema.PATH], r[schema.STATUS]) for r in rows] == [
        (f"htar://a.jpg::{hangs}", "ok"),
        (hangs, "timeout"),
        (aborts, "crashed"),
        (f"htar://b.jpg::{fine}", "ok"),
        (str(loose), "ok"),
    ]
    assert rows[1][schema.ERROR].startswith("the rest of the unit, after 1 items: TimedOut: the container reader")
    assert "--decode-timeout" in rows[1][schema.ERROR] and rows[1][schema.CONTAINER] == hangs
    assert "SIGABRT" in rows[2][schema.ERROR]
    assert [r[item.UNIT_ROWS] for r in rows] == [0, 2, 1, 1, 1]


def big_flat_png(side: int) -> bytes:
    """A flat ``side``² PNG: a few hundred KB whose decode and PDQ take seconds (within --max-pixels: no bomb)."""
    return encode(Image.new("RGB", (side, side), (90, 120, 150)), "PNG", compress_level=1)


@pytest.fixture(scope="module")
def watched_scan(ray_cluster, tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("watched")
    for seed in range(4):
        (root / f"small_{seed}.jpg").write_bytes(encode(photo(96, 64, seed=seed), "JPEG"))
    (root / "slow.png").write_bytes(big_flat_png(9000))
    write_tar(root / "shard.tar", {f"{key}.jpg": encode(photo(80, 60, seed=9), "JPEG") for key in ("k1", "k2")})
    cfg = ScanConfig(
        sources=(str(root),),
        out=str(tmp_path_factory.mktemp("watched_out") / "out"),
        checkpoint=tiny_checkpoint,
        phash=True,
        decode_timeout=1.0,
    )
    return run_scan(cfg), cfg, root


def test_a_scan_in_ray_workers_scores_the_batch_around_a_decode_that_times_out(watched_scan):
    """Members of a tar, read in the workers' expansion watchdog, score as the loose files do."""
    result, cfg, root = watched_scan
    rows = {r[schema.PATH]: r for r in pq.read_table(os.path.join(cfg.out, schema.SCORES_DIR)).to_pylist()}
    shard = str(root / "shard.tar")
    files = {str(p) for p in root.iterdir() if p.suffix != ".tar"}
    assert set(rows) == files | {f"tar://k1.jpg::{shard}", f"tar://k2.jpg::{shard}"}, "every file and member once"
    slow = rows.pop(str(root / "slow.png"))
    assert slow[schema.STATUS] == "timeout" and "1 s" in slow[schema.ERROR] and np.isnan(slow[schema.SCORE])
    assert slow[schema.FILE_SIZE] > 0 and slow[schema.T_DECODE_MS] >= 1000.0
    for row in rows.values():
        assert row[schema.STATUS] == "ok" and 0.0 <= row[schema.SCORE] <= 1.0
    assert result.summary.status_counts["timeout"] == 1 and result.summary.status_counts["crashed"] == 0


def test_scans_are_watched_by_default_for_120_s_and_360_s_with_the_watermark():
    """The suite's conftest turns the default off for its many short scans, so the shipped defaults are read in a
    fresh interpreter."""
    code = (
        "from dataclasses import replace; from aidetect_batch.scan.config import ScanConfig; "
        "c = ScanConfig(sources=('x',), out='o', checkpoint='c'); "
        "print(c.watchdog_timeout, replace(c, watermark=True).watchdog_timeout, "
        "replace(c, decode_timeout=0.0).watchdog_timeout)"
    )
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert shown == ["120.0", "360.0", "0.0"]
