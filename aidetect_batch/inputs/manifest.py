"""The input stage: what a scan reads, as one Arrow table of ``path``, ``source`` and pass-through columns.

Inputs come from a listing of sources (:mod:`aidetect_batch.inputs.sources`) or
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
import posixpath
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from aidetect_batch import schema
from aidetect_batch.inputs import item, sources, stamps
from aidetect_batch.inputs.sources import SourceError
from aidetect_batch.storage import filesystem, is_remote, to_uri

PARQUET_SUFFIXES = (".parquet", ".pq")
DELIMITED = {".csv": ",", ".tsv": "\t"}
_ABSOLUTE = r"^(/|[A-Za-z][A-Za-z0-9+.-]*://)"


MAX_BLOCK_ROWS = 256
MIN_BLOCK_ROWS = 16


def block_size(total: int, cpus: int, batch_size: int | None = None) -> int:
    """Paths per input block: at least 8 blocks per CPU for small scans, so work spreads and
    progress shows early; at most 256 so a huge listing does not become millions of objects.

    With ``batch_size``, the size is also a divisor or a multiple of the Classifier's batch size.
    Ray Data hands an actor whole blocks until it has at least a batch, so 37-row blocks and
    64-image batches mean a 74-row bundle run as 64 + 10: on a GPU the small batch costs
    almost as much as the full one."""
    rows = max(MIN_BLOCK_ROWS, min(MAX_BLOCK_ROWS, total // (8 * max(cpus, 1))))
    if batch_size is None:
        return rows
    if rows >= batch_size:
        return rows - rows % batch_size
    return max(d for d in range(1, rows + 1) if batch_size % d == 0)


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
    base = manifest_folder(uri, storage_options)
    paths = _resolve(paths, base)
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


def manifest_folder(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """The folder a manifest's relative paths are relative to: its own, absolute."""
    fs, inner = filesystem(uri, storage_options)
    return to_uri(fs, inner.rsplit("/", 1)[0]) if "/" in inner else "."


def _resolve(paths: pa.Array, base: str) -> pa.Array:
    """The one rule for relative paths in manifests (scan and train): joined to the manifest's folder,
    and for local files normalised (``./a`` and ``x/../a`` become ``a``); absolute paths and URIs stay."""
    relative = pc.invert(pc.match_substring_regex(paths, _ABSOLUTE))
    if not pc.any(relative).as_py():
        return paths
    joined = pc.binary_join_element_wise(base.rstrip("/"), paths, "/")
    if not is_remote(base):
        joined = pa.array([posixpath.normpath(p) for p in joined.to_pylist()], pa.string())
    return pc.if_else(relative, joined, paths)


def _uniform(n: int, seed: int, start: int = 0) -> np.ndarray:
    """A seeded uniform [0, 1) value per row position (splitmix64), the same on every run and machine."""
    with np.errstate(over="ignore"):
        x = np.arange(start, start + n, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def select(table: pa.Table, sample: float | None = None, limit: int | None = None, *, seed: int = 0) -> pa.Table:
    """Keep each row with probability ``sample`` (seeded by position), then the first ``limit`` rows kept."""
    if sample is not None and sample < 1.0:
        table = table.filter(pa.array(_uniform(table.num_rows, seed) < sample))
    if limit is not None:
        table = table.slice(0, limit)
    return table


class Fingerprint:
    """SHA-256 of an ordered sequence of paths, fed in chunks of any size: the same for any chunking."""

    def __init__(self) -> None:
        self._lengths, self._values = hashlib.sha256(), hashlib.sha256()

    def update(self, paths: pa.Array | pa.ChunkedArray) -> None:
        """Add the next paths, in order."""
        for chunk in paths.chunks if isinstance(paths, pa.ChunkedArray) else [paths]:
            chunk = chunk.cast(pa.large_string())
            offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64)[chunk.offset : chunk.offset + len(chunk) + 1]
            self._lengths.update(np.diff(offsets).astype("<i8").tobytes())
            if len(chunk) and chunk.buffers()[2] is not None:
                self._values.update(memoryview(chunk.buffers()[2])[int(offsets[0]) : int(offsets[-1])])

    def hexdigest(self) -> str:
        return hashlib.sha256(self._lengths.digest() + self._values.digest()).hexdigest()


def fingerprint(table: pa.Table) -> str:
    """SHA-256 of the ordered paths: two runs over the same input set agree, any change shows."""
    digest = Fingerprint()
    digest.update(table.column(schema.PATH))
    return digest.hexdigest()


def shard_digest(paths: list[str], found: list[str | None] | None = None) -> str:
    """An order-independent digest of one shard's paths (sum of 64-bit BLAKE2b hashes), so the sink can
    record it from rows that arrive in any order and a resumed listing can check the shard is the same.

    With the units' stamps ``found`` (:mod:`aidetect_batch.inputs.stamps`, ``None`` for a loose file), a shard
    holding an archive adds ``~`` and the digest of its archives' stamps, so a rewritten archive shows too."""
    digest = f"{_hash_sum(paths):016x}-{len(paths)}"
    stamped = [f"{p}\0{s}" for p, s in zip(paths, found or (), strict=False) if s is not None]
    return f"{digest}~{_hash_sum(stamped):016x}" if stamped else digest


def _hash_sum(values: list[str]) -> int:
    total = sum(int.from_bytes(hashlib.blake2b(v.encode(), digest_size=8).digest(), "little") for v in values)
    return total % (1 << 64)


def same_paths(committed: str, listed: str) -> bool:
    """Whether two shard digests name the same paths (stamps aside: digests written before them have none)."""
    return committed.split("~")[0] == listed.split("~")[0]


class ListingState:
    """Run as a zero-CPU Ray actor: the streamed listing reports how far it got and how it ended,
    which the driver reads for progress lines, the final row count and the input fingerprint."""

    def __init__(self) -> None:
        self.listed = 0
        self.pages = 0
        self.finished: dict[str, Any] | None = None

    def page(self, listed: int) -> None:
        self.listed = listed
        self.pages += 1

    def finish(self, rows: int, fingerprint: str, changed: str | None = None) -> None:
        self.listed = rows
        self.finished = {"rows": rows, "fingerprint": fingerprint, "changed": changed}

    def snapshot(self) -> dict[str, Any]:
        return {"listed": self.listed, "pages": self.pages, "finished": self.finished}


def stream_shards(
    batch: Any,
    units: list[tuple[str, bool]],
    extensions: tuple[str, ...],
    *,
    all_files: bool,
    storage_options: dict[str, Any],
    shard_rows: int,
    sample: float | None,
    limit: int | None,
    seed: int,
    committed: dict[int, str],
    state: Any,
    kinds: tuple[item.Kind, ...] | None = None,
    page_keys: int = sources.LIST_PAGE_KEYS,
) -> Iterator[pa.Table]:
    """The first stage of a streamed scan (a Ray Data generator UDF on one dummy row).

    Lists the units page by page and yields the input table shard by shard (``path``, ``source``,
    ``_shard``, ``_shard_rows``, and each archive's stamp in ``_stamp``) while the listing goes on (Ray
    Data passes them on in blocks). Rows, order, ``--sample``/``--limit`` and shard numbering equal
    :func:`select` over the whole listing. ``committed`` maps a resumed run's finished shards to their
    :func:`shard_digest`: those are not yielded, and if one differs (its paths, or an archive in it was
    rewritten) the listing changed since, so it stops and says so. ``kinds``: the input kinds that expand
    units (their units are stamped), by default those registered.
    """
    pages = _Selection(sample=sample, limit=limit, seed=seed)
    shards = _Sharder(shard_rows, committed)
    kinds = kinds or item.registered()
    for page in sources.iter_listing(
        units, extensions, all_files, storage_options=storage_options, page_keys=page_keys
    ):
        found = stamps.of_page(page, kinds, storage_options)
        yield from shards.add(*pages.select(page.paths, page.roots, found))
        state.page.remote(pages.kept)
        if shards.changed or pages.full:
            break
    yield from shards.finish()
    state.finish.remote(pages.kept, pages.digest.hexdigest(), shards.changed)


class _Selection:
    """``--sample`` and ``--limit`` applied page by page, as :func:`select` applies them to a whole listing."""

    def __init__(self, *, sample: float | None, limit: int | None, seed: int) -> None:
        self.sample, self.limit, self.seed = sample, limit, seed
        self.position = 0
        self.kept = 0
        self.digest = Fingerprint()

    @property
    def full(self) -> bool:
        return self.limit is not None and self.kept >= self.limit

    def select(self, paths: list[str], *columns: list[Any]) -> tuple[list[Any], ...]:
        """The rows of a page kept: ``paths`` and each parallel list in ``columns``."""
        lists = (paths, *columns)
        if self.sample is not None and self.sample < 1.0:
            keep = _uniform(len(paths), self.seed, start=self.position) < self.sample
            self.position += len(paths)
            lists = tuple([v for v, k in zip(values, keep, strict=True) if k] for values in lists)
        if self.limit is not None:
            lists = tuple(values[: self.limit - self.kept] for values in lists)
        self.kept += len(lists[0])
        self.digest.update(pa.array(lists[0], pa.string()))
        return lists


class _Sharder:
    """Cuts the selected rows into numbered shards of ``shard_rows``. It skips a resumed run's committed
    shards and notes in ``changed`` the first one whose rows differ from what was committed."""

    def __init__(self, shard_rows: int, committed: dict[int, str]) -> None:
        self.shard_rows = shard_rows
        self.committed = committed
        self.shard = 0
        self.paths: list[str] = []
        self.roots: list[str] = []
        self.stamps: list[str | None] = []
        self.changed: str | None = None

    def add(self, paths: list[str], roots: list[str], found: list[str | None]) -> Iterator[pa.Table]:
        self.paths += paths
        self.roots += roots
        self.stamps += found
        while len(self.paths) >= self.shard_rows and not self.changed:
            table = self._cut(self.shard_rows)
            if table is not None:
                yield table

    def finish(self) -> Iterator[pa.Table]:
        if self.paths and not self.changed:
            table = self._cut(len(self.paths))
            if table is not None:
                yield table
        if not self.changed and any(k >= self.shard for k in self.committed):
            self.changed = f"shard {max(self.committed)} (the listing now ends before it)"

    def _cut(self, rows: int) -> pa.Table | None:
        paths, roots, found = self.paths[:rows], self.roots[:rows], self.stamps[:rows]
        self.paths, self.roots, self.stamps = self.paths[rows:], self.roots[rows:], self.stamps[rows:]
        k, self.shard = self.shard, self.shard + 1
        if k in self.committed:
            self.changed = _difference(self.committed[k], paths, found, where=self._rows(k, rows))
            return None
        return pa.table(
            {
                schema.PATH: pa.array(paths, pa.string()),
                schema.SOURCE: pa.array(roots, pa.string()),
                schema.SHARD: pa.array(np.full(rows, k, np.int64)),
                schema.SHARD_ROWS: pa.array(np.full(rows, rows, np.int64)),
                stamps.COLUMN: pa.array(found, pa.string()),
            }
        )

    def _rows(self, k: int, rows: int) -> str:
        return f"shard {k} (rows {k * self.shard_rows}-{k * self.shard_rows + rows - 1})"


def _difference(committed: str, paths: list[str], found: list[str | None], *, where: str) -> str | None:
    """How a committed shard differs from the same shard listed again, or ``None`` when it does not.
    A digest written before stamps existed has none, and then only its paths are compared."""
    listed = shard_digest(paths, found)
    if not same_paths(committed, listed):
        return f"{where} differs from the committed one"
    if "~" not in committed or committed == listed:
        return None
    archives = stamps.named([p for p, s in zip(paths, found, strict=True) if s is not None])
    return f"{where} holds an archive rewritten since (size, modification time or ETag): one of {archives}"
