"""Write score rows to Parquet, local or remote, so a killed job leaves no partial file behind.

The driver streams result batches from Ray Data and this sink rolls them into
files of about ``rows_per_file`` rows (large enough for pandas and DuckDB,
small enough to stream). Every file is written under a hidden temporary name
and only renamed to ``part-<run>-<n>.parquet`` once complete; on S3 an object
appears only when its upload completes. Readers (pandas, DuckDB, pyarrow)
ignore names starting with ``.`` or ``_``, so a crash mid-file never shows up
in results.

Resume builds on this. The input is cut into numbered shards; a file is only
ever written with whole shards, and lists them in its Parquet metadata
(``aidetect.shards``). A shard is whole when a row has arrived for every
listed unit in it and every unit's rows have arrived: a unit may yield several
rows (an archive's members), and says how many on its last row
(``_unit_rows``, :mod:`aidetect_batch.inputs.item`). A file that holds other
than one row per unit records its units too (``aidetect.units``), and each
shard's digest (``aidetect.shard_digests``): its units' paths and, from a
streamed listing, its archives' stamps, which a resumed listing checks.
The committed files are therefore exactly the finished
work: :func:`committed_shards` reads their footers, and a resumed run skips
those shards. Rows of a shard still in flight wait in driver memory, and
ready shards are committed at least every ``commit_every_s`` seconds, which
bounds the work a crash can lose.

Writing from the driver rather than with ``Dataset.write_parquet`` also means
a local OUT lands on the driver's disk, not scattered over worker nodes.

A video's frame scores (the hidden ``_frame_times`` and ``_frame_scores``
columns) go to a side table, ``OUT/frames/``, one row per frame, in a file of
the same name as its scores file, committed just before it. The scores file is
the commit: a resume deletes frames files without one (:func:`committed_work`),
so each video's frames are there exactly once when its row is.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aidetect_batch import schema
from aidetect_batch.inputs import item, stamps
from aidetect_batch.inputs.manifest import shard_digest
from aidetect_batch.storage import filesystem, is_remote, join

_logger = logging.getLogger(__name__)

ROW_GROUP_ROWS = 16_384
# Key of a scores file's Parquet metadata: how many listed units its rows come from, written only when
# that differs from its row count (files without it hold one row per unit).
UNITS_METADATA_KEY = b"aidetect.units"
# The hidden columns a video row's frame rows are made from, kept with the ready rows until their file is written.
FRAME_FIELDS = tuple(pa.field(name, schema.HIDDEN_TYPES[name]) for name in (schema.FRAME_TIMES, schema.FRAME_SCORES))


def to_scores_table(batch: pa.Table | dict[str, Any], table_schema: pa.Schema = schema.SCORES_SCHEMA) -> pa.Table:
    """Select and cast a result batch to ``table_schema`` (the scores schema plus pass-through columns)."""
    table = batch if isinstance(batch, pa.Table) else pa.table(batch)
    columns = []
    for field in table_schema:
        column = table.column(field.name)
        if pa.types.is_null(column.type) or column.type != field.type:
            column = column.cast(field.type)
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=table_schema)


def frame_table(table: pa.Table) -> pa.Table:
    """The frames side table of result rows: one row per frame of each row with frame scores (a scored video).

    Raises:
        RuntimeError: a row with a different number of frame times and frame scores.
    """
    scored = table.column(schema.FRAME_SCORES).combine_chunks().is_valid()
    scores = table.column(schema.FRAME_SCORES).filter(scored).combine_chunks()
    times = table.column(schema.FRAME_TIMES).filter(scored).combine_chunks()
    counts = pc.list_value_length(scores).to_numpy(zero_copy_only=False)
    if not np.array_equal(pc.list_value_length(times).fill_null(0).to_numpy(zero_copy_only=False), counts):
        raise RuntimeError("a video row's frame times and frame scores differ in number")
    first = np.repeat(np.cumsum(counts) - counts, counts)
    columns = [
        table.column(schema.PATH).filter(scored).take(pc.list_parent_indices(scores)),
        pa.array(np.arange(len(first)) - first, pa.int32()),
        pc.list_flatten(times).cast(pa.float32()),
        pc.list_flatten(scores),
    ]
    return pa.Table.from_arrays(columns, schema=schema.FRAMES_SCHEMA)


def _unit_rows(table: pa.Table) -> np.ndarray:
    """Per row, the rows its unit yielded on the unit's last row, else 0; all 1 for a table without
    ``_unit_rows`` (one row per unit)."""
    if item.UNIT_ROWS not in table.column_names:
        return np.ones(table.num_rows, np.int64)
    return table.column(item.UNIT_ROWS).to_numpy()


def encode_shards(shards: list[int]) -> bytes:
    """Compact ``[[first, last], ...]`` ranges for a file's metadata."""
    ranges: list[list[int]] = []
    for shard in sorted(shards):
        if ranges and shard == ranges[-1][1] + 1:
            ranges[-1][1] = shard
        else:
            ranges.append([shard, shard])
    return json.dumps(ranges, separators=(",", ":")).encode()


def decode_shards(value: bytes) -> set[int]:
    """Inverse of :func:`encode_shards`."""
    return {s for first, last in json.loads(value) for s in range(first, last + 1)}


def committed_shards(
    directory: str, storage_options: dict[str, Any] | None = None
) -> tuple[dict[int, str], int, list[str]]:
    """Shards held by the committed files under ``directory``: (shard → unit digest, their rows, the files).

    Only footers are read. Hidden temporary files of a killed run are deleted.
    """
    found = committed_work(directory, storage_options)
    return found.shards, found.rows, found.files


@dataclasses.dataclass
class Committed:
    """The committed files under a scores folder and the work they hold.

    Attributes:
        shards: Shard id → the digest of its listed units' paths (:func:`shard_digest`).
        rows: Rows in the files.
        units: Listed units those rows come from (equal to ``rows`` unless a unit yielded several rows).
        files: The files, sorted.
    """

    shards: dict[int, str]
    rows: int
    units: int
    files: list[str]


def committed_work(
    directory: str, storage_options: dict[str, Any] | None = None, *, frames_directory: str | None = None
) -> Committed:
    """What :func:`committed_shards` finds, with the listed units the rows come from.

    ``frames_directory``: the scan's frames side table, whose files without a committed scores file of the same
    name (a run stopped between the two) are deleted, so the resume that rescores their shards writes them once.
    """
    found = _committed_scores(directory, storage_options)
    if frames_directory is not None:
        kept = {f.rsplit("/", 1)[-1] for f in found.files}
        _drop_uncommitted(frames_directory, kept, storage_options)
    return found


def _drop_uncommitted(directory: str, kept: set[str], storage_options: dict[str, Any] | None) -> None:
    fs, root = filesystem(directory, storage_options)
    if not fs.exists(root):
        return
    for info in fs.ls(root, detail=True):
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        if (name.startswith(".") and name.endswith(".tmp")) or (name.startswith("part-") and name not in kept):
            fs.rm(info["name"])
            _logger.info("removed %s/%s, which a stopped run left without its scores file", directory, name)


def _committed_scores(directory: str, storage_options: dict[str, Any] | None) -> Committed:
    fs, root = filesystem(directory, storage_options)
    if not fs.exists(root):
        return Committed({}, 0, 0, [])
    shards: dict[int, str] = {}
    rows = 0
    units = 0
    files = []
    for info in fs.ls(root, detail=True):
        name = info["name"].rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(".") and name.endswith(".tmp"):
            fs.rm(info["name"])
            _logger.info("removed %s, a file a stopped run left unfinished", name)
            continue
        if not (name.startswith("part-") and name.endswith(".parquet")):
            continue
        with fs.open(info["name"], "rb") as handle:
            meta = pq.read_metadata(handle)
        footer = meta.metadata or {}
        held = decode_shards(footer.get(schema.SHARDS_METADATA_KEY, b"[]"))
        if held & shards.keys():
            raise RuntimeError(f"{name} repeats shards already in another file; the output is not from one scan")
        digests = json.loads(footer.get(schema.SHARD_DIGESTS_METADATA_KEY, b"{}"))
        shards.update({k: digests.get(str(k), "") for k in held})
        rows += meta.num_rows
        units += int(footer.get(UNITS_METADATA_KEY, meta.num_rows))
        files.append(join(directory, name))
    return Committed(shards, rows, units, sorted(files))


class ScoreWriter:
    """Roll score batches into atomically committed Parquet files under ``directory``.

    Args:
        directory: The scores folder, local or remote.
        rows_per_file: Target rows per file (files hold whole shards, so they may exceed it by one shard).
        storage_options: fsspec options for a remote ``directory``.
        run_id: Part of each file name; a resumed run gets a new one.
        table_schema: Columns written (the scores schema plus pass-through columns).
        shard_rows: Rows expected per shard id (the ``_shard`` column); a shard missing here takes its
            count from the rows' ``_shard_rows`` column (a streamed listing). ``None``: rows carry no
            shard and are committed purely by size.
        commit_every_s: Commit finished shards at least this often (bounds the work a crash loses).
        frames_directory: The frames side table, written from the rows' ``_frame_times`` and ``_frame_scores``;
            ``None``: none is written.
    """

    def __init__(
        self,
        directory: str,
        rows_per_file: int = 250_000,
        storage_options: dict[str, Any] | None = None,
        *,
        run_id: str | None = None,
        table_schema: pa.Schema = schema.SCORES_SCHEMA,
        shard_rows: dict[int, int] | None = None,
        commit_every_s: float = 60.0,
        frames_directory: str | None = None,
    ) -> None:
        self.directory = directory
        self.schema = table_schema
        self._kept_schema = pa.schema([*table_schema, *FRAME_FIELDS]) if frames_directory else table_schema
        self.rows_per_file = rows_per_file
        self.fs, self.root = filesystem(directory, storage_options)
        self.fs.makedirs(self.root, exist_ok=True)
        self.frames = filesystem(frames_directory, storage_options) if frames_directory else None
        self.remote = is_remote(directory)
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self.files: list[str] = []
        self.rows_written = 0
        self.units_written = 0
        self.expected = shard_rows
        self.commit_every_s = commit_every_s
        self._partial: dict[int, list[pa.Table]] = {}
        self._seen: dict[int, int] = {}
        self._units_seen: dict[int, int] = {}
        self._unit_extra: dict[int, int] = {}
        self._unit_paths: dict[int, list[str]] = {}
        self._unit_stamps: dict[int, list[str | None]] = {}
        self._ready: list[pa.Table] = []
        self._ready_shards: list[int] = []
        self._ready_digests: dict[str, str] = {}
        self._ready_rows = 0
        self._ready_units = 0
        self._last_commit = time.monotonic()

    @property
    def shards_in_flight(self) -> int:
        """Shards with some but not all rows received."""
        return len(self._partial)

    def write(self, batch: pa.Table | dict[str, Any]) -> None:
        """Add a batch of result rows; commits files as shards finish."""
        table = batch if isinstance(batch, pa.Table) else pa.table(batch)
        unit_rows = _unit_rows(table)
        if self.expected is None:
            self._ready.append(self._kept(table))
            self._ready_rows += table.num_rows
            self.units_written += int(np.count_nonzero(unit_rows))
            while self._ready_rows >= self.rows_per_file:
                self._commit_exact(self.rows_per_file)
            return
        shard_ids = table.column(schema.SHARD).to_numpy()
        counts = table.column(schema.SHARD_ROWS).to_numpy() if schema.SHARD_ROWS in table.column_names else None
        for shard in np.unique(shard_ids).tolist():
            mask = shard_ids == shard
            if shard not in self.expected:
                if counts is None:
                    raise RuntimeError(f"rows of shard {shard}, which is not one of this scan's inputs")
                self.expected[shard] = int(counts[mask][0])
            rows = table.filter(pa.array(mask))
            part = self._kept(rows)
            self._partial.setdefault(shard, []).append(part)
            self._count_units(shard, rows, unit_rows[mask])
            if self._shard_done(shard):
                parts = self._partial.pop(shard)
                self._ready.extend(parts)
                self._ready_shards.append(shard)
                self._ready_digests[str(shard)] = shard_digest(
                    self._unit_paths.pop(shard), self._unit_stamps.pop(shard, None)
                )
                self._ready_rows += self._seen.pop(shard)
                self._ready_units += self._units_seen.pop(shard)
                self._unit_extra.pop(shard)
        due = time.monotonic() - self._last_commit >= self.commit_every_s
        if self._ready_rows >= self.rows_per_file or (due and self._ready_rows):
            self._commit_ready()

    def _kept(self, rows: pa.Table) -> pa.Table:
        """The rows as written, and the frame columns their frame rows come from (null where a batch has none)."""
        if self.frames is None:
            return to_scores_table(rows, self.schema)
        missing = [f for f in FRAME_FIELDS if f.name not in rows.column_names]
        for field in missing:
            rows = rows.append_column(field, pa.nulls(rows.num_rows, field.type))
        return to_scores_table(rows, self._kept_schema)

    def _count_units(self, shard: int, rows: pa.Table, unit_rows: np.ndarray) -> None:
        """Count a shard's rows, and its units from the rows that carry their count (``unit_rows`` > 0), with
        their paths and, from a streamed listing, their stamps (:mod:`aidetect_batch.inputs.stamps`)."""
        heads = pa.array(unit_rows > 0)
        counts = unit_rows[unit_rows > 0]
        self._seen[shard] = self._seen.get(shard, 0) + rows.num_rows
        self._units_seen[shard] = self._units_seen.get(shard, 0) + len(counts)
        self._unit_extra[shard] = self._unit_extra.get(shard, 0) + int((counts - 1).sum())
        paths = rows.column(schema.PATH).filter(heads).to_pylist()
        self._unit_paths.setdefault(shard, []).extend(item.unit_path(p) for p in paths)
        if stamps.COLUMN in rows.column_names:
            self._unit_stamps.setdefault(shard, []).extend(rows.column(stamps.COLUMN).filter(heads).to_pylist())

    def _shard_done(self, shard: int) -> bool:
        """Whether every unit of the shard and every row of those units has arrived.

        Raises:
            RuntimeError: more units, or more rows, than the shard holds.
        """
        units, expected = self._units_seen[shard], self.expected[shard]  # type: ignore[index]
        if units > expected:
            raise RuntimeError(f"shard {shard}: more rows than inputs ({units})")
        if units < expected:
            return False
        rows = expected + self._unit_extra[shard]
        if self._seen[shard] > rows:
            raise RuntimeError(f"shard {shard}: more rows than its {expected} inputs yielded ({self._seen[shard]})")
        return self._seen[shard] == rows

    def _commit_exact(self, rows: int) -> None:
        table = pa.concat_tables(self._ready)
        self._write_file(table.slice(0, rows), [])
        rest = table.slice(rows)
        self._ready = [rest] if rest.num_rows else []
        self._ready_rows = rest.num_rows

    def _commit_ready(self) -> None:
        self._write_file(pa.concat_tables(self._ready), self._ready_shards, units=self._ready_units)
        self.units_written += self._ready_units
        self._ready, self._ready_shards, self._ready_digests, self._ready_rows = [], [], {}, 0
        self._ready_units = 0

    def _write_file(self, table: pa.Table, shards: list[int], *, units: int | None = None) -> None:
        """Commit ``table`` as the next scores file, after its frame rows (if any) under the same name."""
        name = f"part-{self.run_id}-{len(self.files):05d}.parquet"
        if self.frames is not None:
            frames = frame_table(table)
            table = table.drop_columns([f.name for f in FRAME_FIELDS])
            if frames.num_rows:
                fs, root = self.frames
                fs.makedirs(root, exist_ok=True)
                self._put(fs, root, name, frames)
        if shards:
            metadata = {
                schema.SHARDS_METADATA_KEY: encode_shards(shards),
                schema.SHARD_DIGESTS_METADATA_KEY: json.dumps(self._ready_digests, separators=(",", ":")),
            }
            if units is not None and units != table.num_rows:
                metadata[UNITS_METADATA_KEY] = str(units)
            table = table.replace_schema_metadata(metadata)
        self._put(self.fs, self.root, name, table)
        self.files.append(join(self.directory, name))
        self.rows_written += table.num_rows
        self._last_commit = time.monotonic()

    def _put(self, fs: Any, root: str, name: str, table: pa.Table) -> None:
        """Write ``table`` as ``root/name``, which appears only once complete: a hidden name, then a move (an S3
        object appears when its upload completes)."""
        final = f"{root}/{name}"
        tmp = final if self.remote else f"{root}/.{name}.tmp"
        with fs.open(tmp, "wb") as handle:
            pq.write_table(table, handle, compression="zstd", row_group_size=ROW_GROUP_ROWS)
        if tmp != final:
            fs.mv(tmp, final)

    def commit_finished(self) -> None:
        """Commit every finished shard now and drop the rows of unfinished ones (a stopped scan):
        a resume scores those shards again."""
        if self._ready_rows:
            if self.expected is None:
                self._commit_exact(self._ready_rows)
            else:
                self._commit_ready()
        self._partial.clear()
        self._seen.clear()
        self._units_seen.clear()
        self._unit_extra.clear()
        self._unit_paths.clear()
        self._unit_stamps.clear()

    def close(self) -> list[str]:
        """Commit what is ready and return every file this writer committed.

        Raises:
            RuntimeError: a shard is still missing rows (an input lost on the way).
        """
        if self._partial:
            missing = {s: self.expected[s] - self._units_seen[s] for s in sorted(self._partial)[:5]}  # type: ignore[index]
            raise RuntimeError(f"{len(self._partial)} shard(s) incomplete at the end, e.g. missing rows {missing}")
        self.commit_finished()
        _logger.info("wrote %d rows in %d file(s) to %s", self.rows_written, len(self.files), self.directory)
        return self.files
