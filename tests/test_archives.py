"""Zip and tar archives as inputs: one row per admitted member, WebDataset columns, hostile archives, S3."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tarfile
import zipfile

import pyarrow as pa
import pytest
from helpers import encode, photo

from aidetect_batch import schema
from aidetect_batch.inputs import item
from aidetect_batch.scan.config import ScanConfig
from aidetect_batch.scan.cpu_stage import PrepareOptions, prepare_batch
from aidetect_batch.scan.runner import list_inputs

CONTAINERS = ScanConfig(sources=("x",), out="o", checkpoint="c").containers


def jpeg(seed: int) -> bytes:
    return encode(photo(64, 48, seed=seed), "JPEG")


def write_zip(path, members: dict[str, bytes], *, compression=zipfile.ZIP_STORED) -> str:
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return str(path)


def add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data)
    if kind == tarfile.SYMTYPE:
        info.linkname = "a.jpg"
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def write_tar(path, members: dict[str, bytes], mode: str = "w") -> str:
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            add(tar, name, data)
    return str(path)


def scan_rows(*units: str, options: PrepareOptions | None = None, **changes) -> list[dict]:
    listing = pa.table({schema.PATH: list(units), schema.SOURCE: ["root"] * len(units)})
    options = options or PrepareOptions(policy="resize", max_pixels=10**8, containers=CONTAINERS, **changes)
    table = prepare_batch(listing, options)
    return table.drop_columns([c for c in (schema.IMAGE, schema.PIXELS) if c in table.column_names]).to_pylist()


def by_path(rows: list[dict]) -> dict[str, dict]:
    return {r[schema.PATH]: r for r in rows}


ZIPPED = {"a.jpg": jpeg(1), "sub/b.png": encode(photo(40, 40, seed=2), "PNG"), "notes.txt": b"text", "c.JPG": jpeg(3)}


def test_a_zip_gives_one_row_per_admitted_member_with_its_identity(tmp_path):
    archive = write_zip(tmp_path / "x.zip", ZIPPED, compression=zipfile.ZIP_DEFLATED)
    rows = scan_rows(archive)
    assert [r[schema.PATH] for r in rows] == [f"zip://{n}::{archive}" for n in ("a.jpg", "sub/b.png", "c.JPG")]
    assert [r[item.UNIT_ROWS] for r in rows] == [0, 0, 3]
    for row in rows:
        data = ZIPPED[row[schema.MEMBER]]
        assert row[schema.STATUS] == "ok" and row[schema.CONTAINER] == archive
        assert row[schema.SHA256] == hashlib.sha256(data).hexdigest() and row[schema.FILE_SIZE] == len(data)
        assert item.read_path(row[schema.PATH], item.ReadOptions()) == data
    all_files = PrepareOptions(policy="resize", max_pixels=10**8, containers=item.ContainerOptions())
    assert len(scan_rows(archive, options=all_files)) == 4, "--all-files admits every member"


@pytest.mark.parametrize("mode, name", [("w", "x.tar"), ("w:gz", "x.tar.gz"), ("w:gz", "x.tgz")])
def test_a_tar_is_streamed_into_one_row_per_member(tmp_path, mode, name):
    archive = write_tar(tmp_path / name, ZIPPED, mode)
    rows = scan_rows(archive, str(tmp_path / "loose.jpg"))
    paths = [r[schema.PATH] for r in rows]
    assert paths == [*(f"tar://{n}::{archive}" for n in ("a.jpg", "sub/b.png", "c.JPG")), str(tmp_path / "loose.jpg")]
    assert [r[schema.STATUS] for r in rows[:3]] == ["ok"] * 3
    assert rows[3][schema.STATUS] == "unreadable" and rows[3][schema.CONTAINER] is None
    assert item.read_path(paths[1], item.ReadOptions()) == ZIPPED["sub/b.png"]


def test_a_tar_is_read_once_per_scan(tmp_path, monkeypatch):
    archive = write_tar(tmp_path / "x.tar", ZIPPED)
    opened = []
    real = tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: opened.append(1) or real(*a, **k))
    assert len(scan_rows(archive)) == 3 and len(opened) == 1


def test_webdataset_samples_carry_key_caption_and_url(tmp_path):
    members = {}
    for key in ("000000000", "000000001"):
        members[f"shard/{key}.jpg"] = jpeg(int(key) + 5)
        members[f"shard/{key}.txt"] = f"caption {key}".encode()
        members[f"shard/{key}.json"] = json.dumps({"url": f"https://x/{key}.jpg", "key": key}).encode()
    members["lonely.jpg"] = jpeg(9)
    rows = by_path(scan_rows(write_tar(tmp_path / "00000.tar", members)))
    first = rows[f"tar://shard/000000001.jpg::{tmp_path / '00000.tar'}"]
    assert first[schema.WDS_KEY] == "shard/000000001" and first[schema.WDS_CAPTION] == "caption 000000001"
    assert first[schema.WDS_URL] == "https://x/000000001.jpg" and first[schema.STATUS] == "ok"
    lonely = rows[f"tar://lonely.jpg::{tmp_path / '00000.tar'}"]
    assert lonely[schema.WDS_KEY] is None and lonely[schema.WDS_CAPTION] is None
    assert len(rows) == 3


def test_hostile_zips(tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bomb.bmp", b"\0" * (8 << 20))
        archive.writestr("../../etc/evil.jpg", jpeg(1))
        archive.writestr("/abs/x.jpg", jpeg(2))
        archive.writestr("inner.zip", b"PK")
        archive.writestr("dir/", b"")
        link = zipfile.ZipInfo("link.jpg")
        link.external_attr = 0o120777 << 16
        archive.writestr(link, b"a.jpg")
    encrypted = tmp_path / "locked.zip"
    write_zip(encrypted, {"secret.jpg": jpeg(3)})
    raw = bytearray(encrypted.read_bytes())
    for signature, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = raw.index(signature)
        raw[at + flag_at] |= 1
    encrypted.write_bytes(bytes(raw))
    fake = tmp_path / "fake.zip"
    fake.write_bytes(b"this is not a zip")
    big = write_zip(tmp_path / "big.zip", {"big.jpg": jpeg(4)})
    rows = by_path(scan_rows(str(bomb), str(encrypted), str(fake)))
    assert len(rows) == 6, "directory and symlink members are skipped"
    bombed = rows[f"zip://bomb.bmp::{bomb}"]
    assert bombed[schema.STATUS] == "too_large" and "--max-ratio" in bombed[schema.ERROR]
    assert rows[f"zip://../../etc/evil.jpg::{bomb}"][schema.STATUS] == "ok", "../ is only a label"
    assert rows[f"zip:///abs/x.jpg::{bomb}"][schema.STATUS] == "ok"
    nested = rows[f"zip://inner.zip::{bomb}"]
    assert nested[schema.STATUS] == "unreadable" and "BadZipFile" in nested[schema.ERROR], "a corrupt inner zip"
    locked = rows[f"zip://secret.jpg::{encrypted}"]
    assert locked[schema.STATUS] == "unreadable" and "encrypted" in locked[schema.ERROR]
    assert rows[str(fake)][schema.STATUS] == "unreadable" and "BadZipFile" in rows[str(fake)][schema.ERROR]
    capped = scan_rows(big, max_file_bytes=len(jpeg(4)) - 1)
    assert capped[0][schema.STATUS] == "too_large" and "--max-file-mb" in capped[0][schema.ERROR]


def test_hostile_tars(tmp_path):
    archive = tmp_path / "odd.tar"
    with tarfile.open(archive, "w") as tar:
        add(tar, "a.jpg", jpeg(1))
        add(tar, "dir", kind=tarfile.DIRTYPE)
        add(tar, "link.jpg", kind=tarfile.SYMTYPE)
        add(tar, "dev.jpg", kind=tarfile.CHRTYPE)
        add(tar, "nested.tar.gz", b"x")
        add(tar, "b.jpg", jpeg(2))
    rows = scan_rows(str(archive))
    assert [r[schema.MEMBER] for r in rows] == ["a.jpg", "nested.tar.gz", "b.jpg"]
    assert [r[schema.STATUS] for r in rows] == ["ok", "unreadable", "ok"], "a corrupt inner archive is its own row"
    truncated = tmp_path / "cut.tar"
    whole = open(write_tar(tmp_path / "whole.tar", {"a.jpg": jpeg(1), "b.jpg": jpeg(2) * 20}), "rb").read()
    truncated.write_bytes(whole[: len(whole) // 2])
    cut = scan_rows(str(truncated))
    assert [r[schema.PATH] for r in cut] == [f"tar://a.jpg::{truncated}", str(truncated)]
    assert cut[0][schema.STATUS] == "ok" and cut[1][schema.STATUS] == "unreadable"
    assert cut[1][schema.ERROR].startswith("the rest of the unit, after 1 items")
    assert cut[1][schema.CONTAINER] == str(truncated) and cut[1][schema.MEMBER] is None, "counted with its archive"
    assert [r[item.UNIT_ROWS] for r in cut] == [0, 2]


def test_a_compressed_tar_bomb_stops_with_a_too_large_row(tmp_path):
    archive = write_tar(
        tmp_path / "bomb.tgz", {"a.jpg": jpeg(1), "zeros.bmp": b"\0" * (16 << 20), "b.jpg": jpeg(2)}, "w:gz"
    )
    rows = scan_rows(archive)
    assert rows[0][schema.STATUS] == "ok"
    assert rows[-1][schema.PATH] == archive and rows[-1][schema.STATUS] == "too_large"
    assert "--max-ratio" in rows[-1][schema.ERROR]


def test_members_beyond_max_members_are_counted_on_the_archives_row(tmp_path):
    members = {f"{i}.jpg": jpeg(i) for i in range(4)}
    few = item.ContainerOptions(CONTAINERS.extensions, max_members=2)
    options = PrepareOptions(policy="resize", max_pixels=10**8, containers=few)
    for archive in (write_zip(tmp_path / "m.zip", members), write_tar(tmp_path / "m.tar", members)):
        rows = scan_rows(archive, options=options)
        assert [r[schema.MEMBER] for r in rows] == ["0.jpg", "1.jpg", None]
        assert rows[2][schema.PATH] == archive and rows[2][schema.STATUS] == "too_large"
        assert "2 members beyond the first 2" in rows[2][schema.ERROR]
    huge = write_zip(tmp_path / "huge.zip", {f"{i}.jpg": b"x" for i in range(25)})
    one = item.ContainerOptions(CONTAINERS.extensions, max_members=2)
    refused = scan_rows(huge, options=PrepareOptions(policy="resize", max_pixels=10**8, containers=one))
    assert [(r[schema.PATH], r[schema.STATUS]) for r in refused] == [(huge, "too_large")]
    assert "central directory holds 25 entries" in refused[0][schema.ERROR], "never parsed past 10 x --max-members"


def test_non_utf8_member_names_are_escaped_like_file_names(tmp_path):
    archive = tmp_path / "latin.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        add(tar, "caf\xe9%.jpg", jpeg(1))
    rows = scan_rows(str(archive))
    assert rows[0][schema.MEMBER] == "caf%E9%25.jpg" and rows[0][schema.STATUS] == "ok"
    assert item.read_path(rows[0][schema.PATH], item.ReadOptions()) == jpeg(1)


def test_archives_are_listed_and_no_archives_keeps_them_files(tmp_path):
    for name in ("a.zip", "b.tar", "c.tar.gz", "d.tgz", "e.gz"):
        (tmp_path / name).write_bytes(b"x")
    cfg = ScanConfig(sources=(str(tmp_path),), out=str(tmp_path / "out"), checkpoint="unused")
    listed = {os.path.basename(p) for p in list_inputs(cfg).column(schema.PATH).to_pylist()}
    assert listed == {"a.zip", "b.tar", "c.tar.gz", "d.tgz"}
    off = ScanConfig(sources=(str(tmp_path),), out=str(tmp_path / "out"), checkpoint="unused", archives=False)
    assert [k.name for k in off.input_kinds] == ["parquet", "file"], "the archive kinds are left out"
    with pytest.raises(Exception, match="no files found"):
        list_inputs(off)
    archive = write_zip(tmp_path / "z.zip", ZIPPED)
    options = PrepareOptions(policy="resize", max_pixels=10**8, kinds=off.input_kinds)
    row = scan_rows(archive, options=options)[0]
    assert row[schema.PATH] == archive and row[schema.STATUS] == "undecodable", "one row, as before"


def test_a_zip_and_a_tar_on_s3(s3_server, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("archives")
    fs.put_file(write_zip(tmp_path / "x.zip", ZIPPED), "archives/x.zip")
    fs.put_file(write_tar(tmp_path / "x.tgz", ZIPPED, "w:gz"), "archives/x.tgz")
    rows = scan_rows("s3://archives/x.zip", "s3://archives/x.tgz")
    assert [r[schema.STATUS] for r in rows] == ["ok"] * 6
    assert rows[0][schema.PATH] == "zip://a.jpg::s3://archives/x.zip"
    assert rows[3][schema.CONTAINER] == "s3://archives/x.tgz"
    for row in rows:
        assert item.read_path(row[schema.PATH], item.ReadOptions()) == ZIPPED[row[schema.MEMBER]]


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_an_archive_leaves_the_decode_task_in_chunks_as_it_is_read(tmp_path, monkeypatch, kind):
    """Members are decoded and handed on a chunk at a time: a task never holds a whole archive."""
    from aidetect_batch.scan import cpu_stage

    members = {f"m{i}.jpg": jpeg(i) for i in range(7)}
    archive = (write_zip if kind == "zip" else write_tar)(tmp_path / f"x.{kind}", members)
    listing = pa.table({schema.PATH: [archive, archive], schema.SOURCE: ["root"] * 2})
    options = PrepareOptions(policy="resize", max_pixels=10**8, containers=CONTAINERS, chunk_rows=3)
    tables = list(cpu_stage.prepare_stream(listing, options))
    assert [t.num_rows for t in tables] == [3, 3, 3, 3, 2]
    counts = [n for t in tables for n in t.column(item.UNIT_ROWS).to_pylist()]
    assert counts == [0] * 6 + [7] + [0] * 6 + [7], "each unit's count rides on its last row"
    monkeypatch.setattr(cpu_stage, "CHUNK_BYTES", 2 * min(map(len, members.values())))
    by_bytes = list(cpu_stage.prepare_stream(listing.slice(0, 1), dataclasses.replace(options, chunk_rows=100)))
    assert max(t.num_rows for t in by_bytes) <= 2 and sum(t.num_rows for t in by_bytes) == 7


def test_text_a_tar_carries_is_valid_utf8_whatever_its_sidecars_and_names_hold(tmp_path):
    archive = tmp_path / "w.tar"
    members = {
        "s/1.jpg": jpeg(1),
        "s/1.json": b'{"url": "\\ud800x"}',
        "s\udcff/2.jpg": jpeg(2),
        "s\udcff/2.txt": b"cap",
    }
    with tarfile.open(archive, "w", encoding="utf-8", errors="surrogateescape") as tar:
        for name, data in members.items():
            add(tar, name, data)
    rows = by_path(scan_rows(str(archive)))
    assert rows[f"tar://s/1.jpg::{archive}"][schema.WDS_URL] == "?x"
    odd = rows[f"tar://s%25FF/2.jpg::{archive}"]
    assert odd[schema.STATUS] == "ok" and odd[schema.WDS_KEY] == "s%FF/2" and odd[schema.WDS_CAPTION] == "cap"


def test_a_corrupt_zip_member_is_its_own_row_and_the_next_is_still_read(tmp_path):
    archive = write_zip(tmp_path / "x.zip", {"a.jpg": ZIPPED["a.jpg"], "b.jpg": jpeg(4)}, compression=zipfile.ZIP_LZMA)
    data = bytearray(open(archive, "rb").read())
    start = data.index(b"a.jpg") + len("a.jpg") + 4
    data[start : start + 64] = bytes(64)
    open(archive, "wb").write(bytes(data))
    rows = scan_rows(archive)
    assert [r[schema.PATH] for r in rows] == [f"zip://a.jpg::{archive}", f"zip://b.jpg::{archive}"]
    assert rows[0][schema.STATUS] != "ok" and rows[1][schema.STATUS] == "ok"


def test_a_member_name_with_colons_reopens_its_bytes(tmp_path):
    archive = write_zip(tmp_path / "x.zip", {"a:": jpeg(1), "b::c.jpg": jpeg(2)})
    all_files = PrepareOptions(policy="resize", max_pixels=10**8, containers=item.ContainerOptions())
    for row in scan_rows(archive, options=all_files):
        data = {"a:": jpeg(1), "b::c.jpg": jpeg(2)}[row[schema.MEMBER]]
        assert item.read_path(row[schema.PATH], item.ReadOptions()) == data


def test_a_listing_of_mostly_archives_gets_one_archive_per_decode_task(tmp_path):
    from aidetect_batch.scan.runner import mostly_containers

    cfg = ScanConfig(sources=("x",), out="o", checkpoint="c", decode_batch_size=16)
    shards = [f"s3://b/{i:05d}.tar" for i in range(10)]
    assert mostly_containers(shards, cfg) and mostly_containers([*shards, "a.jpg"], cfg)
    assert not mostly_containers(["a.zip", *[f"{i}.jpg" for i in range(40)]], cfg), "one zip among many photos"
    assert not mostly_containers([f"{i}.jpg" for i in range(40)], cfg)


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_members_of_one_name_get_one_path_each_that_reopens_exactly_that_member(tmp_path, kind):
    """A tar appended to, a zip written twice under one name, and a literal ``%FF`` beside a non-UTF-8 byte
    that escapes to it: each row's path reopens its own bytes."""
    archive = tmp_path / f"dup.{kind}"
    members = [("a.jpg", jpeg(1)), ("a.jpg", jpeg(2)), ("b%FF.jpg", jpeg(3)), ("b\udcff.jpg", jpeg(4))]
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as out:
            for name, data in members:
                out.writestr(name.replace("\udcff", "~"), data)
        # zipfile writes any non-ASCII name as flagged UTF-8: put the raw byte in by hand, as old tools wrote it.
        archive.write_bytes(archive.read_bytes().replace(b"b~.jpg", b"b\xff.jpg"))
    else:
        with tarfile.open(archive, "w", encoding="utf-8", errors="surrogateescape") as tar:
            for name, data in members:
                add(tar, name, data)
    rows = scan_rows(str(archive))
    assert [r[schema.PATH] for r in rows] == [
        f"{kind}://a.jpg::{archive}",
        f"{kind}://a.jpg:2::{archive}",
        f"{kind}://b%25FF.jpg::{archive}",
        f"{kind}://b%25FF.jpg:2::{archive}",
    ]
    assert [r[schema.MEMBER] for r in rows] == ["a.jpg", "a.jpg", "b%FF.jpg", "b%FF.jpg"]
    for row, (_, data) in zip(rows, members, strict=True):
        assert row[schema.SHA256] == hashlib.sha256(data).hexdigest()
        assert item.read_path(row[schema.PATH], item.ReadOptions()) == data
    assert item.parse(rows[1][schema.PATH]).occurrence == 2


def test_an_archive_inside_an_archive_is_read_to_archive_depth(tmp_path):
    deepest = io.BytesIO()
    with zipfile.ZipFile(deepest, "w") as archive:
        archive.writestr("b.jpg", jpeg(2))
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w") as tar:
        add(tar, "a.jpg", jpeg(1))
        add(tar, "deeper.zip", deepest.getvalue())
    outer = write_zip(tmp_path / "outer.zip", {"inner.tar": inner.getvalue(), "c.jpg": jpeg(3)})
    tar_path = f"zip://inner.tar::{outer}"
    rows = scan_rows(outer)
    assert [(r[schema.PATH], r[schema.STATUS]) for r in rows] == [
        (f"tar://a.jpg::{tar_path}", "ok"),
        (f"tar://deeper.zip::{tar_path}", "unsupported"),
        (f"zip://c.jpg::{outer}", "ok"),
    ]
    assert rows[0][schema.CONTAINER] == tar_path and "--archive-depth" in rows[1][schema.ERROR]
    assert [r[item.UNIT_ROWS] for r in rows] == [0, 0, 3]
    assert item.read_path(rows[0][schema.PATH], item.ReadOptions()) == jpeg(1)
    two = PrepareOptions(policy="resize", max_pixels=10**8, containers=dataclasses.replace(CONTAINERS, depth=2))
    deep = by_path(scan_rows(outer, options=two))
    b_path = f"zip://b.jpg::tar://deeper.zip::{tar_path}"
    assert deep[b_path][schema.STATUS] == "ok" and item.read_path(b_path, item.ReadOptions()) == jpeg(2)
    none = PrepareOptions(policy="resize", max_pixels=10**8, containers=dataclasses.replace(CONTAINERS, depth=0))
    assert by_path(scan_rows(outer, options=none))[tar_path][schema.STATUS] == "unsupported"


def test_progress_counts_an_archive_as_one_input_when_its_last_row_arrives(caplog):
    from aidetect_batch.scan import runner

    progress = runner._Progress(total=2)
    rows = {schema.STATUS: ["ok", "ok"], item.UNIT_ROWS: [0, 0]}
    progress.update(pa.table(rows))
    assert (progress.done, progress.rows) == (0, 2), "no input is done before its last row"
    with caplog.at_level("INFO", logger=runner.__name__):
        progress.update(pa.table({schema.STATUS: ["undecodable", "ok"], item.UNIT_ROWS: [3, 1]}))
    assert "progress: 2/2 inputs (100.0%), 4 rows: ok 3, failed 1" in caplog.text


def test_a_manifest_row_naming_an_archive_is_expanded(tmp_path):
    archive = write_zip(tmp_path / "x.zip", ZIPPED)
    (tmp_path / "list.csv").write_text(f"path,case\n{archive},7\n")
    cfg = ScanConfig(sources=(), manifest=str(tmp_path / "list.csv"), out=str(tmp_path / "o"), checkpoint="c")
    listing = list_inputs(cfg)
    rows = prepare_batch(listing, PrepareOptions(policy="resize", max_pixels=10**8, containers=cfg.containers))
    assert rows.column(schema.MEMBER).to_pylist() == ["a.jpg", "sub/b.png", "c.JPG"]
    assert rows.column("case").to_pylist() == [7, 7, 7], "the manifest's columns repeat on every member"


def test_rows_of_a_tar_leave_as_it_streams_even_when_every_member_shares_one_key(tmp_path, monkeypatch):
    """``frame.0001.jpg``, ``frame.0002.jpg``, ... all have the sample key ``frame``: each row must still leave
    before the next member is read, or one key would hold the whole archive."""
    from aidetect_batch.inputs import archives, tars

    archive = write_tar(tmp_path / "frames.tar", {f"frame.{i:04d}.jpg": jpeg(i) for i in range(4)})
    events: list[str] = []
    reading = archives.read_capped
    monkeypatch.setattr(archives, "read_capped", lambda *a, **k: events.append("read") or reading(*a, **k))
    for _ in tars.Tar().read_all(item.Item(archive), item.ReadOptions(containers=CONTAINERS)):
        events.append("row")
    assert events == ["read", "row"] * 4


def test_nested_members_digest_under_the_listed_unit_and_empty_inputs_are_empty(tmp_path):
    assert item.unit_path("zip://a.jpg::tar://inner.zip::/d/outer.tar") == "/d/outer.tar"
    assert item.unit_path("tar://x.jpg::/d/outer.tar") == "/d/outer.tar" and item.unit_path("/d/a.jpg") == "/d/a.jpg"
    (tmp_path / "none.zip").write_bytes(b"")
    (tmp_path / "none.tar").write_bytes(b"")
    rows = scan_rows(str(tmp_path / "none.zip"), str(tmp_path / "none.tar"))
    assert [r[schema.STATUS] for r in rows] == ["empty", "empty"], "a zero-byte archive is empty, as a file is"
    nothing = pa.table({schema.PATH: pa.array([], pa.string()), schema.SOURCE: pa.array([], pa.string())})
    assert prepare_batch(nothing, PrepareOptions(policy="resize", max_pixels=10**8)).num_rows == 0
