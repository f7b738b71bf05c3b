"""Write score rows to Parquet, local or remote, so a killed job leaves no partial file behind.

The driver streams result batches from Ray Data and this sink rolls them into
files of ``rows_per_file`` rows (large enough for pandas and DuckDB, small
enough to stream). Every file is written under a hidden temporary name and
only renamed to ``part-<run>-<n>.parquet`` once complete; on S3 an object
appears only when its upload completes. Readers (pandas, DuckDB, pyarrow)
ignore names starting with ``.`` or ``_``, so a crash mid-file never
shows up in results. This is what a later resume builds on: the committed
files are exactly the finished work.

Writing from the driver rather than with ``Dataset.write_parquet`` also means
a local OUT lands on the driver's disk, not scattered over worker nodes.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from aidetect_batch import schema
from aidetect_batch.storage import filesystem, is_remote, join

_logger = logging.getLogger(__name__)

ROW_GROUP_ROWS = 16_384


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


class ScoreWriter:
    """Roll score batches into atomically committed Parquet files under ``directory``."""

    def __init__(
        self,
        directory: str,
        rows_per_file: int = 250_000,
        storage_options: dict[str, Any] | None = None,
        run_id: str | None = None,
        table_schema: pa.Schema = schema.SCORES_SCHEMA,
    ) -> None:
        self.directory = directory
        self.schema = table_schema
        self.rows_per_file = rows_per_file
        self.fs, self.root = filesystem(directory, storage_options)
        self.fs.makedirs(self.root, exist_ok=True)
        self.remote = is_remote(directory)
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self.files: list[str] = []
        self.rows_written = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._handle: Any = None
        self._file_rows = 0
        self._tmp = ""
        self._final = ""

    def write(self, batch: pa.Table | dict[str, Any]) -> None:
        """Append a batch of result rows."""
        table = to_scores_table(batch, self.schema)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= ROW_GROUP_ROWS:
            self._flush(ROW_GROUP_ROWS)

    def _open(self) -> None:
        name = f"part-{self.run_id}-{len(self.files):05d}.parquet"
        self._final = f"{self.root}/{name}"
        self._tmp = self._final if self.remote else f"{self.root}/.{name}.tmp"
        self._handle = self.fs.open(self._tmp, "wb")
        self._writer = pq.ParquetWriter(self._handle, self.schema, compression="zstd")
        self._file_rows = 0

    def _commit(self) -> None:
        assert self._writer is not None
        self._writer.close()
        self._handle.close()
        if self._tmp != self._final:
            self.fs.mv(self._tmp, self._final)
        self.files.append(join(self.directory, self._final.rsplit("/", 1)[1]))
        self._writer = None

    def _flush(self, max_rows: int) -> None:
        table = pa.concat_tables(self._pending)
        if self._writer is None:
            self._open()
        room = self.rows_per_file - self._file_rows
        take = min(max_rows, table.num_rows, room)
        assert self._writer is not None
        self._writer.write_table(table.slice(0, take), row_group_size=ROW_GROUP_ROWS)
        self._file_rows += take
        self.rows_written += take
        rest = table.slice(take)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows
        if self._file_rows >= self.rows_per_file:
            self._commit()

    def close(self) -> list[str]:
        """Flush what is pending, commit the open file, and return every committed file."""
        while self._pending_rows:
            self._flush(self._pending_rows)
        if self._writer is not None:
            self._commit()
        _logger.info("wrote %d rows in %d file(s) to %s", self.rows_written, len(self.files), self.directory)
        return self.files
