"""Parquet image datasets as inputs: each row of a file is one Item, ``parquet://<row>::<file uri>``.

Hugging Face ``datasets`` stores an image column as ``struct<bytes: binary, path: string>`` and declares it in
the file's ``huggingface`` schema metadata (a feature whose ``_type`` is ``Image``); ``--image-column`` names the
column instead, a plain ``binary`` one too. The struct's own ``path`` is kept in ``image_path``. Every other
column is carried through as a manifest's are, under the output fields the driver found in the first listed
file's footer (:meth:`Parquet.columns`); a name that is an output column gets the ``input_`` prefix
(``label`` becomes ``input_label``). Columns of bytes (a second image, audio) are not carried: they would copy
the dataset into the scores.

A file is read by the decode task that scans it, one row group at a time and only its image column and carried
columns (on ``s3://`` or ``hf://``, ranged reads of those column chunks): the driver reads footers only. A file
without an image column (img2dataset's per-shard metadata ``.parquet``, next to its tars) is one
``unsupported`` row naming the binary columns it has.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aidetect_batch import schema
from aidetect_batch.inputs import archives, item, sources

EXTENSIONS = ("parquet",)
# The schema metadata key where Hugging Face ``datasets`` writes its features, and an image feature's type.
HF_METADATA_KEY = b"huggingface"
HF_IMAGE = "Image"
# Output names a carried column cannot take: the scores' own columns and the decode stage's ``image``.
_RESERVED = frozenset((*schema.SCORE_COLUMNS, schema.IMAGE))
# Remote files are read without fsspec's read-ahead, so a column chunk is one ranged read of exactly its bytes
# and the columns left out are never fetched.
_REMOTE_OPEN = {"cache_type": "none"}

_logger = logging.getLogger(__name__)


class NoImageColumn(item.NotExpanded):
    """A Parquet file with no image column to scan (img2dataset's metadata ``.parquet``): ``unsupported``."""


class NotEmbedded(OSError):
    """A row whose image bytes are not in the file (null, or a Hugging Face image kept as a path only)."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where one file keeps its images, and which of its columns are carried under which output names.

    Attributes:
        image: The image column.
        struct: Whether it is Hugging Face's ``struct<bytes, path>`` (else a plain binary column).
        carried: Each carried column's name in the file → its output name.
    """

    image: str
    struct: bool
    carried: dict[str, str]

    @property
    def columns(self) -> list[str]:
        """The only columns read."""
        return [self.image, *self.carried]


class Parquet:
    """``*.parquet``: one row per row of the file, read by row group with column projection."""

    name = "parquet"
    views = False
    extensions = EXTENSIONS

    def accepts(self, unit: item.Item) -> bool:
        return unit.member is None and archives.has_extension(unit.uri, self.extensions)

    def columns(self, unit: item.Item, options: item.ReadOptions) -> list[pa.Field]:
        """The output fields of the columns the file's rows carry (none without an image column): footer only."""
        with archives.open_unit(unit, options, **_REMOTE_OPEN) as handle:
            arrow_schema = pq.read_schema(handle)
        try:
            image = find_image_column(arrow_schema, options.containers.image_column)[0]
        except NoImageColumn:
            return []
        carried = carried_names(arrow_schema, image)
        return [pa.field(out, arrow_schema.field(name).type) for name, out in carried.items()]

    def items(self, unit: item.Item, options: item.ReadOptions) -> list[item.Item]:
        with archives.open_unit(unit, options, **_REMOTE_OPEN) as handle:
            parquet = pq.ParquetFile(handle)
            find_image_column(parquet.schema_arrow, options.containers.image_column)
            return [unit.at(self.name, str(row)) for row in range(parquet.metadata.num_rows)]

    def read(self, found: item.Item, options: item.ReadOptions) -> bytes:
        """One row's image: only its row group's image column chunk is read."""
        row = int(found.member or "")
        with archives.open_unit(found, options, **_REMOTE_OPEN) as handle:
            parquet = pq.ParquetFile(handle)
            image, struct = find_image_column(parquet.schema_arrow, options.containers.image_column)
            group, offset = _row_group_of(parquet.metadata, row)
            column = parquet.read_row_group(group, columns=[image], use_threads=False).column(0)
        data, paths = _image_values(column.slice(offset, 1), struct)
        return _checked(data[0], paths[0], options)

    def read_all(self, unit: item.Item, options: item.ReadOptions) -> Iterator[item.Read]:
        """Every row in file order, one row group at a time (the CPU stage hands rows on in chunks, so a
        task holds about one row group)."""
        with archives.open_unit(unit, options, **_REMOTE_OPEN) as handle:
            parquet = pq.ParquetFile(handle)
            layout = layout_of(parquet.schema_arrow, options.containers, unit)
            start = 0
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group, columns=layout.columns, use_threads=False)
                yield from self._rows(table, layout, unit=unit, start=start, options=options)
                start += table.num_rows

    def _rows(
        self, table: pa.Table, layout: Layout, *, unit: item.Item, start: int, options: item.ReadOptions
    ) -> Iterator[item.Read]:
        data, paths = _image_values(table.column(layout.image), layout.struct)
        carried = table.select(list(layout.carried)).rename_columns(list(layout.carried.values())).to_pylist()
        for i, value in enumerate(data):
            found = unit.at(self.name, str(start + i))
            columns = {schema.IMAGE_PATH: paths[i], **carried[i]}
            try:
                read = item.Read(found, _checked(value, paths[i], options), columns=columns)
            except (NotEmbedded, sources.FileTooLarge) as exc:
                read = item.Read(found, failure=exc, columns=columns)
            yield read


def find_image_column(arrow_schema: pa.Schema, chosen: str | None) -> tuple[str, bool]:
    """The image column, and whether it is a ``struct<bytes, path>``: ``chosen`` (``--image-column``), else the
    first ``Image`` feature of the file's Hugging Face metadata.

    Raises:
        NoImageColumn: there is no such column, or it holds no bytes; the error names the binary columns found.
    """
    for name in [chosen] if chosen is not None else _image_features(arrow_schema):
        index = arrow_schema.get_field_index(name)
        struct = _image_type(arrow_schema.field(index).type) if index >= 0 else None
        if struct is not None:
            return name, struct
    found = ", ".join(f.name for f in arrow_schema if _image_type(f.type) is not None) or "none"
    if chosen is None:
        raise NoImageColumn(
            f"no Image feature in the file's Hugging Face metadata (binary columns: {found}); "
            "name the image column with --image-column"
        )
    raise NoImageColumn(f"no binary or struct<bytes, path> column {chosen!r} (--image-column); binary columns: {found}")


def carried_names(arrow_schema: pa.Schema, image: str) -> dict[str, str]:
    """Every column but the image and those holding bytes, with its output name: prefixed while it is an output
    column's name, starts with ``_`` (the stages' hidden columns) or was taken by an earlier column."""
    names: dict[str, str] = {}
    for field in arrow_schema:
        if field.name == image or _holds_bytes(field.type):
            continue
        out = field.name
        while out in _RESERVED or out.startswith("_") or out in names.values():
            out = schema.CARRIED_PREFIX + out
        names[field.name] = out
    return names


def layout_of(arrow_schema: pa.Schema, options: item.ContainerOptions, unit: item.Item) -> Layout:
    """The file's image column and the carried columns it has. A carried column it lacks is null in its rows,
    and a column the first file did not have is not carried: one warning says which."""
    image, struct = find_image_column(arrow_schema, options.image_column)
    if options.carried is None:
        return Layout(image, struct, {})
    wanted = {f.name for f in options.carried}
    present = carried_names(arrow_schema, image)
    carried = {name: out for name, out in present.items() if out in wanted}
    missing, extra = sorted(wanted - set(carried.values())), sorted(set(present.values()) - wanted)
    if missing or extra:
        _logger.warning(
            "%s: columns differ from the first listed Parquet file's: %s null here, %s not carried",
            unit.uri,
            missing or "none",
            extra or "none",
        )
    return Layout(image, struct, carried)


def _image_features(arrow_schema: pa.Schema) -> list[str]:
    """The columns the file's Hugging Face metadata declares as ``Image`` features, in its order."""
    raw = (arrow_schema.metadata or {}).get(HF_METADATA_KEY)
    try:
        features = json.loads(raw)["info"]["features"] if raw else {}
    except (ValueError, KeyError, TypeError):
        return []
    if not isinstance(features, dict):
        return []
    return [
        name for name, feature in features.items() if isinstance(feature, dict) and feature.get("_type") == HF_IMAGE
    ]


def _image_type(type_: pa.DataType) -> bool | None:
    """``True`` for a ``struct`` with a binary ``bytes`` field, ``False`` for plain binary, else ``None``."""
    if pa.types.is_binary(type_) or pa.types.is_large_binary(type_):
        return False
    if pa.types.is_struct(type_) and type_.get_field_index("bytes") >= 0:
        inner = type_.field("bytes").type
        return True if pa.types.is_binary(inner) or pa.types.is_large_binary(inner) else None
    return None


def _holds_bytes(type_: pa.DataType) -> bool:
    """Whether values of ``type_`` hold variable-length bytes, at any depth (an image or audio struct)."""
    if pa.types.is_binary(type_) or pa.types.is_large_binary(type_):
        return True
    return any(_holds_bytes(type_.field(i).type) for i in range(type_.num_fields))


def _image_values(column: pa.ChunkedArray, struct: bool) -> tuple[list[bytes | None], list[str | None]]:
    """A column's image bytes and, for a struct that has one, its ``path`` (a null struct: both null)."""
    if not struct:
        return column.to_pylist(), [None] * len(column)
    data = pc.struct_field(column, "bytes").to_pylist()
    if column.type.get_field_index("path") < 0:
        return data, [None] * len(column)
    return data, pc.struct_field(column, "path").to_pylist()


def _checked(data: bytes | None, path: str | None, options: item.ReadOptions) -> bytes:
    """A row's bytes under the size cap; a row without bytes raises :class:`NotEmbedded`."""
    if data is None:
        where = f", only its path {path!r}" if path else ""
        raise NotEmbedded(f"the image bytes are not embedded in the file{where}")
    options.check_size(len(data))
    return data


def _row_group_of(metadata: pq.FileMetaData, row: int) -> tuple[int, int]:
    """The row group holding the file's ``row``, and the row's offset in it."""
    start = 0
    for group in range(metadata.num_row_groups):
        rows = metadata.row_group(group).num_rows
        if start <= row < start + rows:
            return group, row - start
        start += rows
    raise IndexError(f"row {row} is not in the file's {start} rows")
