"""Stamps of archives: what a resume compares to refuse an archive rewritten since the stopped scan. No Ray."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from aidetect_batch import schema
from aidetect_batch.errors import ConfigError
from aidetect_batch.inputs import item, manifest, stamps
from aidetect_batch.scan.runner import CONTAINER_STAMPS, check_resumable


def listing(*paths: str) -> pa.Table:
    return pa.table({schema.PATH: list(paths), schema.SOURCE: ["/d"] * len(paths)})


def test_only_units_an_archive_kind_expands_are_stamped(tmp_path):
    for name in ("a.zip", "b.TAR.GZ", "c.jpg", "d.tgz.jpg"):
        (tmp_path / name).write_bytes(b"x" * 3)
    names = [str(tmp_path / n) for n in ("a.zip", "b.TAR.GZ", "c.jpg", "d.tgz.jpg")]
    found = stamps.container_stamps(listing(*names, str(tmp_path / "gone.tar")), item.registered())
    assert list(found) == [names[0], names[1], str(tmp_path / "gone.tar")]
    assert found[names[0]] == f"3:{os.stat(names[0]).st_mtime_ns}" and found[str(tmp_path / "gone.tar")] == "missing"
    assert stamps.container_stamps(listing(*names), (item.LOOSE_FILE,)) == {}, "--no-archives stamps nothing"


def test_a_rewrite_changes_the_stamp(tmp_path):
    archive = tmp_path / "a.zip"
    archive.write_bytes(b"one")
    before = stamps.stamp(item.Item(str(archive)))
    os.utime(archive, ns=(0, os.stat(archive).st_mtime_ns + 1))
    assert stamps.stamp(item.Item(str(archive))) != before, "same size, other mtime"
    assert stamps.changed({str(archive): before}, {str(archive): stamps.stamp(item.Item(str(archive)))}) == [
        str(archive)
    ]
    assert stamps.of_info({"ETag": '"abc"', "size": 3}) == "etag:abc"
    assert stamps.of_info({"Size": 3, "LastModified": "2026-01-01"}) == "3:2026-01-01"


IDENTITY = {"inputs": "f", "input_rows": 3, "model_id": "m"}


def test_resume_refuses_a_rewritten_archive_and_names_it():
    before = {**IDENTITY, CONTAINER_STAMPS: {"/d/a.zip": "3:1", "/d/b.tar": "5:1"}}
    check_resumable({"identity": before}, dict(before))
    now = {**IDENTITY, CONTAINER_STAMPS: {"/d/a.zip": "3:1", "/d/b.tar": "5:2"}}
    with pytest.raises(ConfigError, match=r"1 archive\(s\) changed .*: /d/b\.tar\. .*--overwrite") as refused:
        check_resumable({"identity": before}, now)
    assert "/d/a.zip" not in str(refused.value)
    many = {**IDENTITY, CONTAINER_STAMPS: {f"/d/{i}.zip": "1:2" for i in range(7)}}
    with pytest.raises(ConfigError, match="and 2 more"):
        check_resumable({"identity": {**IDENTITY, CONTAINER_STAMPS: {}}}, many)


def test_a_scan_that_recorded_no_stamps_still_resumes(caplog):
    check_resumable({"identity": dict(IDENTITY)}, {**IDENTITY, CONTAINER_STAMPS: {"/d/a.zip": "3:1"}})
    assert "recorded no archive stamps" in caplog.text
    with pytest.raises(ConfigError, match="model_id: was 'm', now 'n'"):
        check_resumable({"identity": dict(IDENTITY)}, {**IDENTITY, "model_id": "n"})


def test_shard_digests_carry_stamps_and_old_digests_compare_by_paths():
    paths = ["/d/a.zip", "/d/l.jpg"]
    plain = manifest.shard_digest(paths)
    stamped = manifest.shard_digest(paths, ["3:1", None])
    assert stamped.startswith(plain + "~") and manifest.shard_digest(paths, [None, None]) == plain
    assert stamped == manifest.shard_digest(list(reversed(paths)), [None, "3:1"]), "order-independent"
    assert manifest.same_paths(plain, stamped) and not manifest.same_paths(plain, manifest.shard_digest(paths[:1]))
