"""The input Item seam: two fake input kinds, defined and registered in this module only, scan end to end.

``Bundle`` (``*.bundle``: several images, one Item and one row each) stands for an archive, and
``Flipbook`` (``*.flip``: the frames of one clip, one Item read as several views) for a video.
No module of the package knows about either.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import encode, photo

from aidetect_batch import schema
from aidetect_batch.inputs import item, sources
from aidetect_batch.report import page
from aidetect_batch.scan.config import ScanConfig
from aidetect_batch.scan.cpu_stage import PrepareOptions, prepare_batch
from aidetect_batch.scan.runner import list_inputs, run_scan
from aidetect_batch.scan.sink import committed_work

MAGIC = b"BUNDLE1\n"


def pack(members: dict[str, bytes]) -> bytes:
    """A bundle: a magic line, a JSON line of ``[name, size]`` pairs, then the members' bytes back to back."""
    header = json.dumps([[name, len(data)] for name, data in members.items()]).encode()
    return MAGIC + header + b"\n" + b"".join(members.values())


def unpack(data: bytes) -> dict[str, bytes]:
    if not data.startswith(MAGIC):
        raise ValueError("not a bundle")
    header, _, body = data[len(MAGIC) :].partition(b"\n")
    members, offset = {}, 0
    for name, size in json.loads(header):
        members[name] = body[offset : offset + size]
        offset += size
    return members


class Bundle:
    """``*.bundle``: each member is an Item, ``bundle://<member>::<file>``."""

    name = "bundle"
    views = False
    extensions = ("bundle",)

    def accepts(self, unit: item.Item) -> bool:
        return unit.uri.endswith(".bundle")

    def items(self, unit: item.Item, options: item.ReadOptions) -> list[item.Item]:
        return [unit.at(self.name, member) for member in self._members(unit, options)]

    def read(self, found: item.Item, options: item.ReadOptions) -> bytes:
        data = self._members(found, options)[found.member]
        options.check_size(len(data))
        return data

    def _members(self, unit: item.Item, options: item.ReadOptions) -> dict[str, bytes]:
        return unpack(sources.read_file(unit.uri, options.storage_options, raw_path=unit.raw_path))


class Flipbook:
    """``*.flip``: the frames of one clip, scored as one row the way tiles are."""

    name = "flip"
    views = True
    extensions = ("flip",)

    def accepts(self, unit: item.Item) -> bool:
        return unit.uri.endswith(".flip")

    def items(self, unit: item.Item, options: item.ReadOptions) -> list[item.Item]:
        return [dataclasses.replace(unit, kind=self.name)]

    def read(self, found: item.Item, options: item.ReadOptions) -> list[bytes]:
        data = sources.read_file(found.uri, options.storage_options, max_bytes=options.max_bytes)
        return list(unpack(data).values())


@pytest.fixture(scope="module")
def kinds():
    # Ray workers cannot import this test module: its kinds travel to them by value.
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    item.register(Bundle())
    item.register(Flipbook())
    yield
    item.unregister(Bundle.name)
    item.unregister(Flipbook.name)
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def jpeg(seed: int) -> bytes:
    return encode(photo(96, 80, seed=seed), "JPEG")


MEMBERS = {"x/one.jpg": jpeg(3), "two.png": encode(photo(70, 90, seed=4), "PNG"), "broken.jpg": b"not an image"}
FRAMES = {f"frame{i}.jpg": jpeg(10 + i) for i in range(3)}


def write_folder(root: str) -> dict[str, bytes | None]:
    """Loose images, a bundle with a broken member, an empty bundle and a flipbook: identity → bytes."""
    files = {
        "loose/a.jpg": jpeg(1),
        "loose/b.png": encode(photo(64, 64, seed=2), "PNG"),
        "loose/copy.png": MEMBERS["two.png"],
        "packs/three.bundle": pack(MEMBERS),
        "packs/empty.bundle": pack({}),
        "clips/clip.flip": pack(FRAMES),
    }
    for relative, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, relative)), exist_ok=True)
        with open(os.path.join(root, relative), "wb") as handle:
            handle.write(data)
    bundle = os.path.join(root, "packs/three.bundle")
    expected: dict[str, bytes | None] = {
        os.path.join(root, r): files[r] for r in ("loose/a.jpg", "loose/b.png", "loose/copy.png")
    }
    expected.update({f"bundle://{name}::{bundle}": data for name, data in MEMBERS.items()})
    expected[os.path.join(root, "packs/empty.bundle")] = None
    expected[os.path.join(root, "clips/clip.flip")] = None
    return expected


def test_a_member_path_names_its_kind_member_and_unit(kinds):
    member = item.Item("s3://b/x.bundle", "dir/a::b%c.jpg", kind="bundle")
    assert member.path == "bundle://dir/a%3A%3Ab%25c.jpg::s3://b/x.bundle"
    assert item.parse(member.path) == member
    assert item.unit_path(member.path) == "s3://b/x.bundle"
    assert item.parse("/data/a::b.jpg") == item.Item("/data/a::b.jpg")
    assert item.parse("nope://a.jpg::s3://b/x.nope") == item.Item("nope://a.jpg::s3://b/x.nope"), "not registered"


def test_kinds_are_registered_once_and_the_loose_file_comes_last(kinds):
    assert [k.name for k in item.registered()] == ["flip", "bundle", "parquet", "tar", "zip", "file"], "then built-in"
    assert item.kind_of(item.Item("/d/x.bundle")).name == "bundle"
    assert item.kind_of(item.Item("/d/x.jpg")) is item.LOOSE_FILE
    with pytest.raises(ValueError, match="already registered"):
        item.register(Bundle())
    with pytest.raises(ValueError, match="URI scheme"):
        item.register(type("Shadow", (), {"name": "file"})())


def test_the_cpu_stage_yields_one_row_per_member_and_per_failure(kinds, tmp_path):
    expected = write_folder(str(tmp_path))
    bundle, empty = str(tmp_path / "packs/three.bundle"), str(tmp_path / "packs/empty.bundle")
    loose, missing, bogus = str(tmp_path / "loose/a.jpg"), str(tmp_path / "gone.bundle"), str(tmp_path / "bad.bundle")
    (tmp_path / "bad.bundle").write_bytes(b"plain text")
    units = [loose, bundle, empty, missing, bogus]
    listing = pa.table({schema.PATH: units, schema.SOURCE: [str(tmp_path)] * 5, "post_id": [10, 11, 12, 13, 14]})
    options = PrepareOptions(policy="resize", max_pixels=10**8, kinds=(Bundle(), item.LOOSE_FILE))
    rows = prepare_batch(listing, options).drop_columns([schema.IMAGE]).to_pylist()
    members = [f"bundle://{name}::{bundle}" for name in MEMBERS]
    assert [r[schema.PATH] for r in rows] == [loose, *members, empty, missing, bogus]
    assert [r[item.UNIT_ROWS] for r in rows] == [1, 0, 0, 3, 1, 1, 1], "a unit's count is on its last row"
    assert [r["post_id"] for r in rows] == [10, 11, 11, 11, 12, 13, 14], "listing columns repeat per member"
    status = {r[schema.PATH]: (r[schema.STATUS], r[schema.ERROR] or "") for r in rows}
    assert status[loose][0] == status[members[0]][0] == status[members[1]][0] == "ok"
    assert status[members[2]][0] == "undecodable" and status[members[2]][1]
    assert status[empty] == ("empty", "NoItems: bundle unit holds no items")
    assert status[missing][0] == "unreadable" and "FileNotFoundError" in status[missing][1]
    assert status[bogus] == ("unreadable", "ValueError: not a bundle")
    for row in rows[1:4]:
        data = expected[row[schema.PATH]]
        assert row[schema.SHA256] == hashlib.sha256(data).hexdigest()
        assert item.read_path(row[schema.PATH], item.ReadOptions()) == data


def test_the_member_size_cap_maps_to_too_large_like_a_file(kinds, tmp_path):
    write_folder(str(tmp_path))
    listing = pa.table({schema.PATH: [str(tmp_path / "packs/three.bundle")], schema.SOURCE: [str(tmp_path)]})
    cap = len(MEMBERS["x/one.jpg"]) - 1
    rows = prepare_batch(listing, PrepareOptions(policy="resize", max_pixels=10**8, max_file_bytes=cap)).to_pylist()
    one = next(r for r in rows if "x/one.jpg" in r[schema.PATH])
    assert one[schema.STATUS] == "too_large" and one[schema.FILE_SIZE] == len(MEMBERS["x/one.jpg"])
    assert "--max-file-mb" in one[schema.ERROR]


def test_views_of_one_item_travel_as_tiles_of_one_row(kinds, tmp_path):
    write_folder(str(tmp_path))
    clip, loose = str(tmp_path / "clips/clip.flip"), str(tmp_path / "loose/a.jpg")
    listing = pa.table({schema.PATH: [clip, loose], schema.SOURCE: [str(tmp_path)] * 2})
    table = prepare_batch(listing, PrepareOptions(policy="resize", max_pixels=10**8))
    assert schema.IMAGE not in table.column_names
    assert table.column(schema.PIXEL_SHAPE).to_pylist() == [[3, 224, 224, 3], [1, 224, 224, 3]]
    clip_row = table.drop_columns([schema.PIXELS]).to_pylist()[0]
    assert clip_row[schema.STATUS] == "ok" and clip_row[schema.FILE_SIZE] == sum(map(len, FRAMES.values()))
    later = prepare_batch(listing, PrepareOptions(policy="resize", max_pixels=10**8, decode_later=True)).to_pylist()
    assert later[0][schema.STATUS] == "unsupported" and later[0][schema.DATA] is None, "--gpu-decode: one view"
    assert later[1][schema.STATUS] is None and later[1][schema.DATA]


def test_a_thumbnail_reopens_a_member(kinds, tmp_path):
    write_folder(str(tmp_path))
    member = f"bundle://x/one.jpg::{tmp_path / 'packs/three.bundle'}"
    assert page.thumbnail(member).startswith("data:image/jpeg;base64,")
    assert page.thumbnail(f"bundle://gone.jpg::{tmp_path / 'packs/three.bundle'}") is None


@pytest.fixture(scope="module")
def item_scan(ray_cluster, kinds, tiny_checkpoint, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("items"))
    expected = write_folder(root)
    cfg = ScanConfig(
        sources=(root,),
        out=str(tmp_path_factory.mktemp("items_scan") / "out"),
        checkpoint=tiny_checkpoint,
        dedup=True,
        batch_size=4,
        decode_batch_size=3,
    )
    return run_scan(cfg), cfg, root, expected


def test_a_scan_writes_one_row_per_item_and_its_identity(item_scan):
    result, cfg, root, expected = item_scan
    rows = pq.read_table(os.path.join(cfg.out, schema.SCORES_DIR)).to_pylist()
    paths = [r[schema.PATH] for r in rows]
    assert len(paths) == len(set(paths)) and set(paths) == set(expected)
    assert result.summary.total == len(expected) and result.run["outputs"]["rows"] == len(expected)
    assert result.run["inputs"] == 6 and committed_work(os.path.join(cfg.out, schema.SCORES_DIR)).units == 6
    by_path = {r[schema.PATH]: r for r in rows}
    bundle = os.path.join(root, "packs/three.bundle")
    broken = by_path[f"bundle://broken.jpg::{bundle}"]
    assert broken[schema.STATUS] == "undecodable" and broken[schema.ERROR] and math.isnan(broken[schema.SCORE])
    assert by_path[os.path.join(root, "packs/empty.bundle")][schema.STATUS] == "empty"
    one = by_path[f"bundle://x/one.jpg::{bundle}"]
    assert one[schema.STATUS] == "ok" and 0.0 <= one[schema.SCORE] <= 1.0 and one[schema.SOURCE] == root
    assert item.read_path(one[schema.PATH], item.ReadOptions()) == MEMBERS["x/one.jpg"]
    assert one[schema.SHA256] == hashlib.sha256(MEMBERS["x/one.jpg"]).hexdigest()
    clip = by_path[os.path.join(root, "clips/clip.flip")]
    assert clip[schema.STATUS] == "ok" and clip[schema.N_TILES] == 3 and 0.0 <= clip[schema.SCORE] <= 1.0
    assert by_path[os.path.join(root, "loose/a.jpg")][schema.N_TILES] == 1


def test_dedup_claims_a_member_as_itself(item_scan):
    _, cfg, root, _ = item_scan
    rows = {r[schema.PATH]: r for r in pq.read_table(os.path.join(cfg.out, schema.SCORES_DIR)).to_pylist()}
    copies = [os.path.join(root, "loose/copy.png"), f"bundle://two.png::{os.path.join(root, 'packs/three.bundle')}"]
    statuses = sorted(rows[p][schema.STATUS] for p in copies)
    assert statuses == ["duplicate", "ok"]
    duplicate, first = sorted(copies, key=lambda p: rows[p][schema.STATUS] != "duplicate")
    assert rows[duplicate][schema.DUPLICATE_OF] == first


def test_a_kinds_extensions_are_listed_without_all_files(kinds, tmp_path):
    write_folder(str(tmp_path))
    cfg = ScanConfig(sources=(str(tmp_path),), out=str(tmp_path / "out"), checkpoint="unused")
    listed = set(list_inputs(cfg).column(schema.PATH).to_pylist())
    assert {str(tmp_path / "packs/three.bundle"), str(tmp_path / "clips/clip.flip")} <= listed
    item.unregister(Flipbook.name)
    try:
        assert str(tmp_path / "clips/clip.flip") not in set(list_inputs(cfg).column(schema.PATH).to_pylist())
    finally:
        item.register(Flipbook())
