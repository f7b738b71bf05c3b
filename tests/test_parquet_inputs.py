"""Parquet image datasets as inputs: one row per row of a file, Hugging Face's image struct found from the file's
metadata, its other columns carried through, read by row group with column projection, locally, on S3 and hf://."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import _registry as fsspec_classes
from fsspec.registry import known_implementations
from helpers import encode, photo

from aidetect_batch import cli, schema
from aidetect_batch.errors import ConfigError
from aidetect_batch.inputs import archives, item
from aidetect_batch.scan.config import ScanConfig
from aidetect_batch.scan.cpu_stage import PrepareOptions, prepare_batch
from aidetect_batch.scan.runner import list_inputs, resolve_inputs, run_scan

# The layout `datasets` writes for Features({"image": Image(), "label": ClassLabel(names=[...]), "caption":
# Value("string")}): Features.arrow_schema gives the Image feature the Arrow type struct<bytes: binary, path:
# string>, a ClassLabel int64, and puts {"info": {"features": Features.to_dict()}} in the schema metadata under
# "huggingface"; to_dict leaves out a feature's default fields but always writes "_type".
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
FEATURES = {
    "image": {"_type": "Image"},
    "label": {"names": ["real", "fake"], "_type": "ClassLabel"},
    "caption": {"dtype": "string", "_type": "Value"},
}
HF_SCHEMA = pa.schema(
    [("image", IMAGE_STRUCT), ("label", pa.int64()), ("caption", pa.string())],
    metadata={"huggingface": json.dumps({"info": {"features": FEATURES}})},
)
NULL_ROW, CORRUPT_ROW = 2, 5
ROWS = 7


def jpeg(seed: int) -> bytes:
    return encode(photo(64, 48, seed=seed), "JPEG")


def hf_images(seed: int = 0) -> list[dict]:
    images = [{"bytes": jpeg(seed + i), "path": f"img_{seed + i}.jpg"} for i in range(ROWS)]
    images[NULL_ROW] = {"bytes": None, "path": "not_embedded.jpg"}
    images[CORRUPT_ROW] = {"bytes": b"\xff\xd8 not really a jpeg", "path": "corrupt.jpg"}
    return images


def write_hf(path, seed: int = 0) -> str:
    """A Hugging Face image dataset shard: 7 rows in row groups of 3, one row without bytes, one corrupt."""
    images = hf_images(seed)
    table = pa.table(
        {
            "image": pa.array(images, IMAGE_STRUCT),
            "label": pa.array([i % 2 for i in range(ROWS)], pa.int64()),
            "caption": [f"caption {seed + i}" for i in range(ROWS)],
        },
        schema=HF_SCHEMA,
    )
    pq.write_table(table, path, row_group_size=3)
    return str(path)


def options_for(*units: str, **containers) -> PrepareOptions:
    """What the scan gives its decode tasks: the carried columns are found on the driver from the first unit."""
    chosen = item.ContainerOptions(**containers)
    found = item.carried_fields(listing_of(*units), item.ReadOptions(containers=chosen))
    return PrepareOptions(policy="resize", max_pixels=10**8, containers=dataclasses.replace(chosen, carried=found))


def listing_of(*units: str) -> pa.Table:
    return pa.table({schema.PATH: list(units), schema.SOURCE: ["root"] * len(units)})


def scan_rows(*units: str, options: PrepareOptions | None = None) -> list[dict]:
    table = prepare_batch(listing_of(*units), options or options_for(*units))
    return table.drop_columns([c for c in (schema.IMAGE, schema.PIXELS) if c in table.column_names]).to_pylist()


def test_a_hugging_face_shard_gives_one_row_per_row_with_its_columns(tmp_path):
    shard = write_hf(tmp_path / "train-00000-of-00001.parquet")
    table = prepare_batch(listing_of(shard), options_for(shard))
    assert table.schema.field("input_label").type == pa.int64(), "label is an output column: carried prefixed"
    assert table.schema.field("caption").type == pa.string() and schema.LABEL not in table.column_names
    rows = table.drop_columns([schema.IMAGE]).to_pylist()
    assert [r[schema.PATH] for r in rows] == [f"parquet://{i}::{shard}" for i in range(ROWS)]
    assert [r[item.UNIT_ROWS] for r in rows] == [0] * (ROWS - 1) + [ROWS]
    images = hf_images()
    for i, row in enumerate(rows):
        assert (row[schema.CONTAINER], row[schema.MEMBER]) == (shard, str(i))
        assert row[schema.IMAGE_PATH] == images[i]["path"]
        assert (row["input_label"], row["caption"]) == (i % 2, f"caption {i}")
    statuses = [r[schema.STATUS] for r in rows]
    assert statuses == ["ok", "ok", "unreadable", "ok", "ok", "undecodable", "ok"]
    assert "not embedded" in rows[NULL_ROW][schema.ERROR] and "not_embedded.jpg" in rows[NULL_ROW][schema.ERROR]
    for i in (0, 1, 3, 4, 6):
        data = images[i]["bytes"]
        assert rows[i][schema.SHA256] == hashlib.sha256(data).hexdigest()
        assert item.read_path(rows[i][schema.PATH], item.ReadOptions()) == data, "a row reopens its own bytes"


def test_each_value_is_held_to_the_size_cap(tmp_path):
    shard = write_hf(tmp_path / "x.parquet")
    options = PrepareOptions(policy="resize", max_pixels=10**8, max_file_bytes=len(jpeg(0)) - 1)
    rows = scan_rows(shard, options=options)
    assert len(rows) == ROWS and rows[0][schema.STATUS] == "too_large"
    assert rows[CORRUPT_ROW][schema.STATUS] == "undecodable", "a value under the cap is still read"


class CountingFile:
    """A binary file that counts the bytes read through it."""

    def __init__(self, handle) -> None:
        self.handle, self.count = handle, 0

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.count += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.handle.seek(offset, whence)

    def tell(self) -> int:
        return self.handle.tell()

    @property
    def closed(self) -> bool:
        return self.handle.closed

    def close(self) -> None:
        self.handle.close()


def test_a_row_group_is_read_with_column_projection(tmp_path, monkeypatch):
    """A large binary column that is not the image is never fetched: not read, not carried."""
    rng = np.random.default_rng(0)
    blobs = [rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes() for _ in range(ROWS)]
    table = pa.table({"image": pa.array(hf_images(), IMAGE_STRUCT), "blob": blobs, "n": list(range(ROWS))})
    shard = str(tmp_path / "blobs.parquet")
    pq.write_table(table.replace_schema_metadata(HF_SCHEMA.metadata), shard, row_group_size=3)
    opened: list[CountingFile] = []

    @contextlib.contextmanager
    def counting(unit, options, **remote):
        with open(unit.uri, "rb") as handle:
            opened.append(CountingFile(handle))
            yield opened[-1]

    monkeypatch.setattr(archives, "open_unit", counting)
    rows = scan_rows(shard)
    assert [r["n"] for r in rows] == list(range(ROWS)) and "blob" not in rows[0]
    assert sum(f.count for f in opened) < len(blobs[0]) < os.path.getsize(shard) / 5, "one blob's worth read at most"


def test_a_plain_binary_column_is_read_with_image_column(tmp_path):
    shard = str(tmp_path / "plain.parquet")
    pq.write_table(pa.table({"id": ["a", "b"], "jpeg": [jpeg(1), jpeg(2)]}), shard)
    (row,) = scan_rows(shard)
    assert (row[schema.PATH], row[schema.STATUS]) == (shard, "unsupported")
    assert "jpeg" in row[schema.ERROR] and "--image-column" in row[schema.ERROR]
    rows = scan_rows(shard, options=options_for(shard, image_column="jpeg"))
    assert [(r[schema.STATUS], r["id"], r[schema.IMAGE_PATH]) for r in rows] == [("ok", "a", None), ("ok", "b", None)]
    assert item.read_path(rows[1][schema.PATH], item.ReadOptions(containers=item.ContainerOptions(image_column="jpeg")))
    missing = scan_rows(shard, options=options_for(shard, image_column="picture"))
    assert [r[schema.STATUS] for r in missing] == ["unsupported"] and "'picture'" in missing[0][schema.ERROR]


def test_files_that_are_not_image_datasets_are_one_row_each(tmp_path):
    """img2dataset writes a metadata .parquet per shard (no image bytes); a .parquet may also not be Parquet."""
    metadata = str(tmp_path / "00000.parquet")
    pq.write_table(
        pa.table({"url": ["https://x/a.jpg"], "caption": ["a"], "key": ["000000000"], "status": ["success"]}), metadata
    )
    fake = tmp_path / "fake.parquet"
    fake.write_bytes(b"PAR1 is only the start of it")
    rows = scan_rows(metadata, str(fake))
    assert [(r[schema.PATH], r[schema.STATUS]) for r in rows] == [(metadata, "unsupported"), (str(fake), "unreadable")]
    assert "binary columns: none" in rows[0][schema.ERROR] and rows[1][item.UNIT_ROWS] == 1
    dataset = write_hf(tmp_path / "train.parquet")
    carried = item.carried_fields(listing_of(metadata, str(fake), dataset), item.ReadOptions())
    assert carried and "caption" in [f.name for f in carried], "a metadata file listed first is passed over"
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    assert [r[schema.STATUS] for r in scan_rows(str(empty))] == ["empty"]


def test_a_later_file_with_other_columns_gets_nulls_and_one_warning(tmp_path, caplog):
    first = write_hf(tmp_path / "a.parquet")
    other = str(tmp_path / "b.parquet")
    images = pa.array(hf_images(10)[:2], IMAGE_STRUCT)
    columns = {"image": images, "label": ["not", "ints"], "extra": [1.5, 2.5]}
    pq.write_table(pa.table(columns).replace_schema_metadata(HF_SCHEMA.metadata), other)
    with caplog.at_level(logging.WARNING):
        table = prepare_batch(listing_of(first, other), options_for(first, other))
    assert table.num_rows == ROWS + 2 and "extra" not in table.column_names
    assert table.schema.field("input_label").type == pa.int64() and table.schema.field("caption").type == pa.string()
    tail = table.slice(ROWS).to_pylist()
    assert [(r["caption"], r["input_label"], r[schema.STATUS]) for r in tail] == [(None, None, "ok")] * 2
    differ = [r for r in caplog.records if "columns differ" in r.getMessage()]
    assert len(differ) == 1 and "extra" in differ[0].getMessage() and "caption" in differ[0].getMessage()


def test_clashing_names_are_carried_under_the_prefix(tmp_path):
    shard = str(tmp_path / "clash.parquet")
    names = {"path": ["p"], "status": ["s"], "_hidden": [1], "input_status": ["t"], "mask": [{"bytes": b"m"}]}
    table = pa.table({"image": pa.array(hf_images()[:1], IMAGE_STRUCT), **names})
    pq.write_table(table.replace_schema_metadata(HF_SCHEMA.metadata), shard)
    carried = item.carried_fields(listing_of(shard), item.ReadOptions())
    assert [f.name for f in carried] == ["input_path", "input_status", "input__hidden", "input_input_status"]
    (row,) = scan_rows(shard)
    assert (row[schema.PATH], row["input_path"], row["input_status"], row["input_input_status"]) == (
        f"parquet://0::{shard}",
        "p",
        "s",
        "t",
    )


def test_parquet_is_listed_and_read_with_no_archives(tmp_path):
    write_hf(tmp_path / "train.parquet")
    (tmp_path / "a.zip").write_bytes(b"x")
    cfg = ScanConfig(sources=(str(tmp_path),), out=str(tmp_path / "out"), checkpoint="c", archives=False)
    assert [k.name for k in cfg.input_kinds] == ["parquet", "file"], "a Parquet file is not an archive"
    assert list_inputs(cfg).column(schema.PATH).to_pylist() == [str(tmp_path / "train.parquet")]
    assert ScanConfig(sources=("x",), out="o", checkpoint="c", image_column="img").containers.image_column == "img"


def test_a_shard_on_s3(s3_server, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("datasets")
    fs.put_file(write_hf(tmp_path / "x.parquet"), "datasets/data/train-00000.parquet")
    uri = "s3://datasets/data/train-00000.parquet"
    rows = scan_rows(uri)
    assert [r[schema.PATH] for r in rows] == [f"parquet://{i}::{uri}" for i in range(ROWS)]
    assert [r["caption"] for r in rows] == [f"caption {i}" for i in range(ROWS)]
    assert [r[schema.STATUS] for r in rows].count("ok") == 5
    assert item.read_path(rows[4][schema.PATH], item.ReadOptions()) == hf_images()[4]["bytes"]
    named = resolve_inputs(ScanConfig(sources=(uri,), out=str(tmp_path / "o"), checkpoint="c"), None)
    assert named.units is not None, "a named S3 object is listed by a Ray task, and still carries its columns"
    assert [(f.name, f.type) for f in named.extra_fields] == [("input_label", pa.int64()), ("caption", pa.string())]
    prefix = resolve_inputs(ScanConfig(sources=("s3://datasets/data",), out=str(tmp_path / "o"), checkpoint="c"), None)
    assert (prefix.carried, prefix.extra_fields) == (None, []), "files under a streamed prefix carry nothing"


class FakeHub(MemoryFileSystem):
    """Stands in for huggingface_hub's HfFileSystem (not installed here): ``hf://`` paths kept in memory."""

    protocol = "hf"
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return "/" + path.removeprefix("hf://").strip("/")


def test_hf_uris_are_read_through_fsspec(tmp_path, monkeypatch):
    monkeypatch.setitem(fsspec_classes, "hf", FakeHub)
    uri = "hf://datasets/user/faces/data/train-00000-of-00001.parquet"
    FakeHub().pipe_file(uri, open(write_hf(tmp_path / "x.parquet"), "rb").read())
    rows = scan_rows(uri)
    assert [r[schema.PATH] for r in rows][-1] == f"parquet://{ROWS - 1}::{uri}"
    assert rows[0][schema.STATUS] == "ok" and rows[0]["input_label"] == 0
    assert item.read_path(rows[0][schema.PATH], item.ReadOptions()) == hf_images()[0]["bytes"]


def test_hf_without_huggingface_hub_fails_before_ray_saying_what_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.delitem(fsspec_classes, "hf", raising=False)
    missing = {"class": "no_such_module_here.HfFileSystem", "err": "Install huggingface_hub to access HfFileSystem"}
    monkeypatch.setitem(known_implementations, "hf", missing)
    source = "hf://datasets/user/faces/data/*.parquet"
    with pytest.raises(ConfigError, match="pip install huggingface_hub"):
        ScanConfig(sources=(source,), out=str(tmp_path / "out"), checkpoint="c", image_column="image")
    argv = ["scan", source, "--image-column", "image", "--checkpoint", "c", "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2, "refused before Ray starts (this test may not start it)"
    assert "pip install huggingface_hub" in capsys.readouterr().err


def test_a_scan_of_two_shards_writes_one_row_per_row_and_carries_columns(ray_cluster, tiny_checkpoint, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    first = write_hf(data / "train-00000.parquet")
    second = str(data / "train-00001.parquet")
    images = pa.array(hf_images(20)[:3], IMAGE_STRUCT)
    pq.write_table(pa.table({"image": images, "label": [1, 0, 1]}).replace_schema_metadata(HF_SCHEMA.metadata), second)
    cfg = ScanConfig(
        sources=(str(data / "*.parquet"),),
        out=str(tmp_path / "out"),
        checkpoint=tiny_checkpoint,
        decode_batch_size=1,
    )
    result = run_scan(cfg)
    scores = pq.read_table(os.path.join(cfg.out, schema.SCORES_DIR))
    paths = scores.column(schema.PATH).to_pylist()
    expected = {f"parquet://{i}::{first}" for i in range(ROWS)} | {f"parquet://{i}::{second}" for i in range(3)}
    assert len(paths) == len(set(paths)) == ROWS + 3 and set(paths) == expected
    assert scores.schema.field("input_label").type == pa.int64() and scores.schema.field("caption").type == pa.string()
    rows = {r[schema.PATH]: r for r in scores.to_pylist()}
    assert rows[f"parquet://1::{second}"]["input_label"] == 0 and rows[f"parquet://1::{second}"]["caption"] is None
    assert rows[f"parquet://3::{first}"]["caption"] == "caption 3" and rows[f"parquet://3::{first}"][schema.SCORE] >= 0
    assert result.run["inputs"] == 2 and result.summary.total == ROWS + 3
    counts = {status: n for status, n in result.summary.status_counts.items() if n}
    assert counts == {"ok": 5 + 2, "unreadable": 1 + 1, "undecodable": 1}, "the second file's row 2 has no bytes"
    assert os.path.exists(os.path.join(cfg.out, schema.REPORT_DIR, schema.SUMMARY_FILE))
