"""The input stage: what a scan reads, as one Arrow table of ``path``, ``source`` and pass-through columns.

Inputs come from a listing of sources (:mod:`aidetect_batch.sources`) or
from a manifest, one path per row: Parquet, CSV/TSV with a ``path`` column,
or newline-separated text, local or ``s3://``. Every other manifest column
(post id, user id, timestamp) is carried to the scores unchanged. Relative
paths resolve against the manifest's folder. Nothing is fetched per file on
the driver: a missing path becomes an ``unreadable`` row in the scan.

The table stays in Arrow memory (about 100 bytes a row), never as Python
lists. ``--sample`` and ``--limit`` pick rows by position with a seeded hash,
so a resumed run selects exactly the same rows.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from aidetect_batch import schema
from aidetect_batch.sources import SourceError
from aidetect_batch.storage import filesystem, to_uri

PARQUET_SUFFIXES = (".parquet", ".pq")
DELIMITED = {".csv": ",", ".tsv": "\t"}
_ABSOLUTE = r"^(/|[A-Za-z][A-Za-z0-9+.-]*://)"


def read_manifest(uri: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """Read a scan manifest into ``path``, ``source`` and its other columns, in manifest order.

    Raises:
        SourceError: the manifest is missing, unreadable, has no ``path`` column, or an empty path.
    """
    storage_options = storage_options or {}
    fs, inner = filesystem(uri, storage_options)
    lowered = uri.lower()
    try:
        with fs.open(inner, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise SourceError(f"manifest {uri!r} does not exist") from None
    except OSError as exc:
        raise SourceError(f"manifest {uri!r} cannot be read: {exc}") from exc
    try:
        if lowered.endswith(PARQUET_SUFFIXES):
            table = pq.read_table(io.BytesIO(data))
        elif lowered.endswith(tuple(DELIMITED)):
            delimiter = DELIMITED["." + lowered.rsplit(".", 1)[1]]
            table = pacsv.read_csv(
                io.BytesIO(data),
                parse_options=pacsv.ParseOptions(delimiter=delimiter),
                convert_options=pacsv.ConvertOptions(column_types={schema.PATH: pa.string()}, strings_can_be_null=True),
            )
        else:
            lines = pa.array(data.decode("utf-8").splitlines(), pa.string())
            lines = pc.utf8_trim_whitespace(lines)
            table = pa.table({schema.PATH: lines.filter(pc.not_equal(lines, ""))})
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise SourceError(f"manifest {uri!r} cannot be parsed: {exc}") from exc
    if schema.PATH not in table.column_names:
        raise SourceError(f"manifest {uri!r} has no {schema.PATH!r} column (columns: {table.column_names})")
    paths = table.column(schema.PATH).cast(pa.string()).combine_chunks()
    if paths.null_count or pc.any(pc.equal(pc.utf8_length(paths), 0)).as_py():
        raise SourceError(f"manifest {uri!r} has an empty path")
    base = to_uri(fs, inner.rsplit("/", 1)[0]) if "/" in inner else "."
    relative = pc.invert(pc.match_substring_regex(paths, _ABSOLUTE))
    if pc.any(relative).as_py():
        paths = pc.if_else(relative, pc.binary_join_element_wise(base.rstrip("/"), paths, "/"), paths)
    source = (
        table.column(schema.SOURCE).cast(pa.string())
        if schema.SOURCE in table.column_names
        else pa.array([base] * table.num_rows, pa.string())
    )
    columns = {schema.PATH: paths, schema.SOURCE: source}
    for name in table.column_names:
        if name not in columns:
            columns[name] = table.column(name)
    return pa.table(columns)


def _uniform(n: int, seed: int) -> np.ndarray:
    """A seeded uniform [0, 1) value per row position (splitmix64), the same on every run and machine."""
    with np.errstate(over="ignore"):
        x = np.arange(n, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def select(table: pa.Table, sample: float | None = None, limit: int | None = None, seed: int = 0) -> pa.Table:
    """Keep each row with probability ``sample`` (seeded by position), then the first ``limit`` rows kept."""
    if sample is not None and sample < 1.0:
        table = table.filter(pa.array(_uniform(table.num_rows, seed) < sample))
    if limit is not None:
        table = table.slice(0, limit)
    return table


def fingerprint(table: pa.Table) -> str:
    """SHA-256 of the ordered paths: two runs over the same input set agree, any change shows."""
    lengths, values = hashlib.sha256(), hashlib.sha256()
    for chunk in table.column(schema.PATH).chunks:
        chunk = chunk.cast(pa.large_string())
        offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64)[chunk.offset : chunk.offset + len(chunk) + 1]
        lengths.update(np.diff(offsets).astype("<i8").tobytes())
        if len(chunk) and chunk.buffers()[2] is not None:
            values.update(memoryview(chunk.buffers()[2])[int(offsets[0]) : int(offsets[-1])])
    return hashlib.sha256(lengths.digest() + values.digest()).hexdigest()
