"""The CPU stage: expand, read, hash, claim (``--dedup``), decode and preprocess each input of a batch.

It runs as Ray Data ``map_batches`` tasks between the input shards and the
Classifier pool, and as the per-file fallback of ``--gpu-decode`` inside the
Classifier. Each listed unit is expanded into its Items by its input kind
(:mod:`aidetect_batch.inputs.item`): a loose file is one Item, an archive
several. Every Item yields one row, and so does a unit whose expansion fails:
a failure at any step becomes the row's ``status`` and ``error``, never an
exception. The size cap is checked before any byte is read, and special files
are never opened for reading (:func:`aidetect_batch.inputs.sources.read_file`).
An Item a kind reads as several views, and a video or an animated image
(``--video-frames``: its sampled frames, :mod:`aidetect_batch.media.video`),
is one row whose views travel to the Classifier like ``tiles``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any

import numpy as np
import pyarrow as pa
import ray
from ray.data.extensions import ArrowTensorArray

from aidetect_batch import schema
from aidetect_batch.detectors import policies
from aidetect_batch.inputs import item, sources
from aidetect_batch.media import pdq, perturb, provenance, video
from aidetect_batch.scan import watchdog

_logger = logging.getLogger(__name__)

# Member bytes a decode task holds before it decodes what it has read and hands the rows on: a task's memory
# stays flat however large the archive it streams.
CHUNK_BYTES = 64 << 20

DECODE_COLUMNS = (
    *schema.DECODED_COLUMNS,
    schema.FILE_SIZE,
    schema.SHA256,
    schema.T_READ_MS,
    schema.DUPLICATE_OF,
    schema.PROVENANCE,
    schema.PROVENANCE_DETAIL,
    *schema.CLIP_COLUMNS,
)
# What one file's native work fills in: the columns the watchdog's child sends back.
WATCHED_COLUMNS = (*schema.DECODED_COLUMNS, schema.PROVENANCE, schema.PROVENANCE_DETAIL, *schema.CLIP_COLUMNS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FileOptions:
    """What one file's provenance, decode, preprocess and PDQ need (see :class:`PrepareOptions`). It is all
    the watchdog's child receives: not the input kinds, which may be defined where the child cannot import them.

    Attributes:
        views: Rows carry their views as tiles (an input kind may read an Item as several views, or a file
            be a video).
        video_frames: Frames sampled from a video or an animated image; 0 decodes them as stills do.
        video_budget_s: Decode seconds per video before sampling stops with the frames it has.
    """

    policy: str
    max_pixels: int
    size: int
    perturbation: str | None
    framing: policies.Framing
    checks: provenance.Checks
    phash: bool
    decode_later: bool
    views: bool
    video_frames: int = 0
    video_budget_s: float = video.DEFAULT_BUDGET_S

    @property
    def fixed(self) -> bool:
        """Every image becomes one ``size``×``size`` view (``resize``, ``center-crop``)."""
        return policies.get(self.policy).fixed


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    """How the CPU stage treats each file.

    Attributes:
        policy: Preprocess policy name.
        max_pixels: Decompression-bomb guard, from the image header.
        size: Side of the model's square input.
        max_file_bytes: Files larger than this are ``too_large`` rows and are never read; ``None``: no cap.
        perturbation: Robustness perturbation (``jpeg:75``) applied at full resolution before the policy.
        storage_options: fsspec options for remote files.
        decode_later: ``--gpu-decode``: stop after reading and hand the bytes on in ``_data``.
        framing: How ``tiles`` and ``native`` frame an image (``--max-tiles``, ``--native-max-pixels``).
        checks: Which provenance checks run on the bytes (``--no-c2pa``, ``--watermark``).
        phash: Compute each decoded image's PDQ hash (``--phash``), for near-duplicate grouping.
        kinds: The input kinds that expand listed units, as registered on the driver when this was made.
        containers: How archives are expanded (members admitted, ``--max-members``, ``--max-ratio``, depth).
        chunk_rows: Rows decoded and handed on together; a unit that yields more (an archive) is cut into
            several tables, so the task never holds all of it.
        decode_timeout: Seconds one file's native work (provenance, decode, preprocess, PDQ) may take in the
            watchdog's child process before the file is a ``timeout`` row (``--decode-timeout``); 0 runs
            it in this process, unwatched.
        per_file: What the watchdog's child runs for each file; ``None``: :func:`prepare_file`. The seam
            through which a test gives it a decoder that hangs or aborts.
        video_frames: ``--video-frames``: frames sampled from each video or animated image, scored as views
            of its row; 0 leaves videos ``unsupported`` and an animation its first frame. ``--gpu-decode``
            decodes one image per row, so it ignores this.
        video_budget_s: Decode seconds per video before sampling stops with the frames it has.
    """

    policy: str
    max_pixels: int
    size: int = policies.CROP
    max_file_bytes: int | None = None
    perturbation: str | None = None
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    decode_later: bool = False
    framing: policies.Framing = policies.Framing()
    checks: provenance.Checks = provenance.Checks()
    phash: bool = False
    kinds: tuple[item.Kind, ...] = dataclasses.field(default_factory=item.registered)
    containers: item.ContainerOptions = item.ContainerOptions()
    chunk_rows: int = 16
    decode_timeout: float = 0.0
    per_file: Callable[[bytes | list[bytes], FileOptions], FileResult] | None = None
    video_frames: int = 0
    video_budget_s: float = video.DEFAULT_BUDGET_S

    @property
    def read_options(self) -> item.ReadOptions:
        """How the input kinds read bytes: the storage options, the size cap and the archive limits."""
        return item.ReadOptions(self.storage_options, self.max_file_bytes, self.containers)

    @property
    def views(self) -> bool:
        """An input kind may read an Item as several views, or a file be a video: every row then carries its
        views as tiles."""
        return any(kind.views for kind in self.kinds) or self.sampled_frames > 0

    @property
    def sampled_frames(self) -> int:
        """Frames sampled per video: none under ``--gpu-decode``, whose rows hold one image each."""
        return 0 if self.decode_later else self.video_frames

    @property
    def file_options(self) -> FileOptions:
        """What each file's native work needs."""
        return FileOptions(
            policy=self.policy,
            max_pixels=self.max_pixels,
            size=self.size,
            perturbation=self.perturbation,
            framing=self.framing,
            checks=self.checks,
            phash=self.phash,
            decode_later=self.decode_later,
            views=self.views,
            video_frames=self.sampled_frames,
            video_budget_s=self.video_budget_s,
        )


@dataclasses.dataclass(frozen=True)
class FileResult:
    """One file's native work, as the watchdog's child sends it back.

    Attributes:
        columns: The file's :data:`WATCHED_COLUMNS` values.
        pixels: Its model input (one view, or a stack of views); ``None`` when it failed or was not decoded.
    """

    columns: dict[str, Any]
    pixels: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class Entry:
    """One output row of a batch: its Item, the kind that reads it, and the listing row it came from.

    Attributes:
        item: The input this row scores.
        kind: The input kind that expanded the unit and reads the Item.
        unit: Index of the listing row (the listed unit) in the batch.
        unit_rows: On the unit's last row, how many rows the unit yielded; 0 on its other rows.
        failure: Why expanding the unit, or reading this Item, failed (the row then carries that status).
        data: The Item's bytes when its kind read them while expanding the unit (one pass over a tar).
        columns: Values the kind gives this row (``container``, ``member``, a WebDataset caption).
        note: Prefix of the row's error (the row of a unit that failed part way says how far it was read).
    """

    item: item.Item
    kind: item.Kind
    unit: int
    unit_rows: int
    failure: BaseException | None = None
    data: bytes | None = None
    columns: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    note: str = ""


def prepare_batch(batch: pa.Table, options: PrepareOptions, registry: Any = None) -> pa.Table:
    """:func:`prepare_stream`'s rows as one table: for callers that hold a batch anyway (Serve, training, tests)."""
    tables = list(prepare_stream(batch, options, registry))
    return pa.concat_tables(tables) if tables else prepare_entries(batch, [], options, registry)


def prepare_stream(batch: pa.Table, options: PrepareOptions, registry: Any = None) -> Iterator[pa.Table]:
    """Expand, read, hash, (deduplicate,) decode and preprocess each input; failures become statuses.

    Yields Arrow tables typed like the scores schema plus the uint8 ``image``
    tensor column (``size``×``size``×3), or for ``tiles``, ``native`` and Items read
    as several views the ``_pixels`` bytes and their ``_pixel_shape``, so nullable
    integers stay integers on the way to the sink. Together they hold one row per
    Item (one per loose file, in listing order) and the hidden ``_unit_rows`` column.
    Rows go out in chunks of ``options.chunk_rows`` (or :data:`CHUNK_BYTES` of member
    bytes), so an archive's members leave the task as they are decoded. Columns of the
    listing other than ``path``, ``source`` and ``_raw_path`` (labels, groups, manifest
    columns, the shard id) pass through, repeated on each row of a unit. ``registry``
    (``--dedup``) is the :class:`aidetect_batch.scan.dedup.HashRegistry` actor.
    """
    for entries in chunks(expand_batch(batch, options), rows=options.chunk_rows, max_bytes=CHUNK_BYTES):
        yield prepare_entries(batch, entries, options, registry)


def prepare_entries(batch: pa.Table, entries: list[Entry], options: PrepareOptions, registry: Any = None) -> pa.Table:
    """One chunk of :func:`prepare_batch`: read, hash, claim, inspect, decode and tabulate ``entries``."""
    rows: dict[str, list[Any]] = {c: [None] * len(entries) for c in DECODE_COLUMNS}
    payload = [read_into(rows, i, entry, options=options) for i, entry in enumerate(entries)]
    if registry is not None:
        _claim_duplicates(rows, payload, [e.item.path for e in entries], registry=registry)
    images = inspect_and_decode(rows, payload, options)
    return _to_table(
        batch,
        rows,
        payload if options.decode_later else None,
        entries=entries,
        images=images,
        policy=options.policy,
        carried=options.containers.carried or (),
    )


def chunks(entries: Iterator[Entry], *, rows: int, max_bytes: int) -> Iterator[list[Entry]]:
    """``entries`` in lists of ``rows``, cut sooner when the bytes read while expanding reach ``max_bytes``."""
    chunk: list[Entry] = []
    held = 0
    for entry in entries:
        chunk.append(entry)
        held += len(entry.data or b"")
        if len(chunk) >= rows or held >= max_bytes:
            yield chunk
            chunk, held = [], 0
    if chunk:
        yield chunk


def expand_batch(batch: pa.Table, options: PrepareOptions) -> Iterator[Entry]:
    """Every listed unit's Items, in listing order, each as its kind reads it."""
    for u, unit in enumerate(item.units_of(batch)):
        yield from expand_unit(unit, u, options)


def expand_unit(unit: item.Item, u: int, options: PrepareOptions) -> Iterator[Entry]:
    """One unit's rows, the last saying how many there are. A unit that cannot be expanded keeps one row;
    one that fails part way (a truncated tar) keeps the rows read and adds one row, the unit's own, for
    the rest. Each row is held until the next is read, so the last one is known when it leaves."""
    kind = item.kind_of(unit, options.kinds)
    held: Entry | None = None
    count = 0
    try:
        for read in _reads(kind, unit, options):
            if held is not None:
                yield held
            held, count = Entry(read.item, kind, u, 0, read.failure, read.data, _columns(read, kind)), count + 1
        if held is None:
            raise item.NoItems(f"{kind.name} unit holds no items")
    except Exception as exc:  # noqa: BLE001 - a unit that cannot be opened is its row's status, never the job's
        if held is not None:
            yield held
        note = f"the rest of the unit, after {count} items: " if count else ""
        held, count = Entry(unit, kind, u, 0, exc, columns=_columns(item.Read(unit), kind), note=note), count + 1
    yield dataclasses.replace(held, unit_rows=count)


def _reads(kind: item.Kind, unit: item.Item, options: PrepareOptions) -> Iterator[item.Read]:
    """The unit's rows as its kind reads them. A container's (zlib inflating archive members, Arrow decoding
    Parquet row groups) are read in the expansion watchdog's child when ``decode_timeout`` is set: a row that
    takes longer, or a reader that dies, ends the unit there with a ``timeout`` or ``crashed`` row for the rest."""
    if not options.decode_timeout or item.is_loose(kind):
        return item.read_all(kind, unit, options.read_options)
    settings = (kind, options.read_options)
    rows = _EXPANDER.stream(read_rows, settings, unit, timeout=options.decode_timeout)
    return (dataclasses.replace(read, data=data) for read, data in rows)


def read_rows(
    unit: item.Item, settings: tuple[item.Kind, item.ReadOptions]
) -> Iterator[tuple[item.Read, bytes | None]]:
    """What the expansion watchdog's child runs per unit: each row apart from its bytes (which travel out of band),
    its failure made able to cross the pipe."""
    kind, read_options = settings
    for read in item.read_all(kind, unit, read_options):
        failure = None if read.failure is None else watchdog.portable(read.failure)
        yield dataclasses.replace(read, data=None, failure=failure), read.data


def _columns(read: item.Read, kind: item.Kind) -> Mapping[str, Any]:
    """A row's ``container`` and ``member`` (a container's own row, e.g. "the rest of the unit", names the
    container, so the report counts it with its members), then the columns the kind gives it."""
    if item.is_loose(kind):
        return read.columns
    return {schema.CONTAINER: read.item.uri, schema.MEMBER: read.item.member, **read.columns}


def read_into(
    rows: dict[str, list[Any]], i: int, entry: Entry, *, options: PrepareOptions
) -> bytes | list[bytes] | None:
    """Read row ``i``'s Item and fill its read columns; its bytes (a list: several views), or ``None`` when
    reading failed (status set)."""
    start = time.perf_counter()
    try:
        if entry.failure is not None:
            raise entry.failure
        data = entry.data if entry.data is not None else _read(entry, options)
        if isinstance(data, list) and not entry.kind.views:
            raise TypeError(f"input kind {entry.kind.name!r} read several views but does not declare views")
    except Exception as exc:  # noqa: BLE001 - any storage failure is this file's status, never the job's
        status, rows[schema.FILE_SIZE][i] = read_failure(exc)
        rows[schema.STATUS][i] = status.value
        rows[schema.ERROR][i] = f"{entry.note}{type(exc).__name__}: {exc}"[:300]
        return None
    rows[schema.T_READ_MS][i] = (time.perf_counter() - start) * 1000.0
    if isinstance(data, sources.Ranged):
        rows[schema.FILE_SIZE][i] = data.size
        return data
    if not isinstance(data, bytes) and len(data) == 1:
        data = data[0]
    whole = data if isinstance(data, bytes) else b"".join(data)
    rows[schema.FILE_SIZE][i] = len(whole)
    rows[schema.SHA256][i] = hashlib.sha256(whole).hexdigest()
    return data


def _read(entry: Entry, options: PrepareOptions) -> bytes | list[bytes] | sources.Ranged:
    """The Item's bytes; a loose video over ``--max-file-mb`` is instead :class:`sources.Ranged`, when frames are
    sampled: a few seeks read it, so the cap, which bounds the memory of a file read whole, need not refuse it."""
    try:
        return entry.kind.read(entry.item, options.read_options)
    except sources.FileTooLarge as exc:
        if not options.sampled_frames or not item.is_loose(entry.kind) or exc.size is None:
            raise
        ranged = sources.Ranged(entry.item.uri, exc.size, options.storage_options, entry.item.raw_path)
        with sources.open_ranged(ranged) as handle:
            if video.container_of(handle.read(64)) is None:
                raise
        return ranged


def inspect_into(rows: dict[str, list[Any]], i: int, data: bytes | sources.Ranged, checks: provenance.Checks) -> None:
    """Fill file ``i``'s provenance columns from its bytes (before decoding, so a failed decode keeps them). A
    video read by ranges gives its tags only: C2PA and XMP would need its every byte."""
    found = _ranged_provenance(data) if isinstance(data, sources.Ranged) else provenance.inspect(data, checks)
    rows[schema.PROVENANCE][i] = found.kind
    rows[schema.PROVENANCE_DETAIL][i] = found.detail


def read_failure(exc: BaseException) -> tuple[schema.Status, int | None]:
    """The one place a read error becomes a status: the status and the file size, when known."""
    if isinstance(exc, sources.FileTooLarge):
        return schema.Status.TOO_LARGE, exc.size
    if isinstance(exc, item.NoItems):
        return schema.Status.EMPTY, None
    if isinstance(exc, item.NotExpanded):
        return schema.Status.UNSUPPORTED, None
    if isinstance(exc, watchdog.Stopped):
        return exc.failure.status, None
    return schema.Status.UNREADABLE, None


def _ranged_provenance(ranged: sources.Ranged) -> provenance.Provenance:
    """The tags of a video read by ranges; none when it cannot be opened (its decode then says why)."""
    try:
        with sources.open_ranged(ranged) as handle:
            return provenance.Provenance.of(provenance.tag_signals(video.tags_of(handle)))
    except OSError:
        return provenance.Provenance()


def _claim_duplicates(
    rows: dict[str, list[Any]], payload: list[bytes | None], paths: list[str], *, registry: Any
) -> None:
    """Ask the registry actor, once per batch, which hashes were seen first elsewhere; those rows become duplicates."""
    read = [i for i in range(len(paths)) if payload[i] is not None and rows[schema.SHA256][i] is not None]
    firsts = ray.get(registry.claim.remote([rows[schema.SHA256][i] for i in read], [paths[i] for i in read]))
    for i, first in zip(read, firsts, strict=True):
        if first is not None:
            rows[schema.STATUS][i] = schema.Status.DUPLICATE.value
            rows[schema.DUPLICATE_OF][i] = first
            payload[i] = None


# One per Ray worker process, kept for every batch it runs; its child starts with the first watched file.
_WATCHDOG = watchdog.Watchdog(preload=(__name__,))
# Containers are read in a child of their own: a unit's rows are read while the chunks before them decode.
_EXPANDER = watchdog.Watchdog(preload=(__name__,))


def inspect_and_decode(
    rows: dict[str, list[Any]], payload: list[bytes | list[bytes] | None], options: PrepareOptions
) -> np.ndarray | list[np.ndarray | None] | None:
    """Each read row's provenance, then (unless ``--gpu-decode``) its decode, preprocess and PDQ: the
    images, or ``None`` under ``--gpu-decode``. With ``decode_timeout`` this native work runs in the
    watchdog's child process (:mod:`aidetect_batch.scan.watchdog`), else here."""
    if options.decode_timeout:
        images = _watched(rows, payload, options)
    else:
        for i, data in enumerate(payload):
            if data is not None:
                inspect_into(rows, i, _first(data), options.checks)
        images = None if options.decode_later else _decode_all(rows, payload, options)
    if options.decode_later:
        _views_need_the_cpu(rows, payload)
    return images


def _first(data: bytes | list[bytes] | sources.Ranged) -> bytes | sources.Ranged:
    return data[0] if isinstance(data, list) else data


def _watched(
    rows: dict[str, list[Any]], payload: list[bytes | list[bytes] | None], options: PrepareOptions
) -> np.ndarray | list[np.ndarray | None] | None:
    """:func:`inspect_and_decode` through the watchdog: a file whose work hangs or kills its process
    becomes a ``timeout`` or ``crashed`` row, and is not handed on to ``--gpu-decode``."""
    file_options = options.file_options
    todo = [i for i, data in enumerate(payload) if data is not None]
    work = options.per_file or prepare_file
    results = _WATCHDOG.map(work, file_options, [payload[i] for i in todo], timeout=options.decode_timeout)
    images = None if options.decode_later else _images_for(len(payload), file_options)
    for i, result in zip(todo, results, strict=True):
        if isinstance(result, watchdog.Failure):
            rows[schema.STATUS][i], rows[schema.ERROR][i] = result.status.value, result.error
            rows[schema.T_DECODE_MS][i] = result.elapsed_ms
            payload[i] = None
            continue
        for column, value in result.columns.items():
            rows[column][i] = value
        if images is not None and result.pixels is not None:
            images[i] = result.pixels
    return images


def prepare_file(data: bytes | list[bytes], options: FileOptions) -> FileResult:
    """One file's provenance, then (unless ``--gpu-decode``) its decode, preprocess and PDQ, on its own:
    what the watchdog's child runs per file. The same per-file code as in-process, so results agree."""
    rows: dict[str, list[Any]] = {c: [None] for c in WATCHED_COLUMNS}
    inspect_into(rows, 0, _first(data), options.checks)
    pixels: list[np.ndarray | None] = [None]
    if not options.decode_later:
        _decode_row(rows, 0, data, images=pixels, options=options, change=_change_of(options))
    return FileResult({c: rows[c][0] for c in WATCHED_COLUMNS}, pixels[0])


def _decode_all(
    rows: dict[str, list[Any]], payload: list[bytes | list[bytes] | None], options: PrepareOptions
) -> np.ndarray | list[np.ndarray | None]:
    """Decode every read row. When a kind may read several views (:attr:`PrepareOptions.views`), every
    row carries its views as ``_pixels``: a fixed-size view is then a one-tile stack, scored as tiles are."""
    file_options = options.file_options
    images = _images_for(len(payload), file_options)
    change = _change_of(file_options)
    for i, data in enumerate(payload):
        if data is not None:
            _decode_row(rows, i, data, images=images, options=file_options, change=change)
    return images


def _images_for(n: int, options: FileOptions) -> Any:
    """Where ``n`` rows' views go: one uint8 array when every row is one fixed-size view, else a list."""
    if options.fixed and not options.views:
        return np.zeros((n, options.size, options.size, 3), dtype=np.uint8)
    return [None] * n


def _change_of(options: FileOptions) -> Any:
    return perturb.parse(options.perturbation) if options.perturbation else None


def _decode_row(
    rows: dict[str, list[Any]],
    i: int,
    data: bytes | list[bytes],
    *,
    images: Any,
    options: FileOptions,
    change: Any,
) -> None:
    """Decode row ``i``'s views or its one image; when rows carry views, a fixed-size view is a one-tile stack."""
    if isinstance(data, list):
        decode_views_into(rows, i, data, images=images, options=options, change=change)
        return
    if isinstance(data, sources.Ranged):
        try:
            with sources.open_ranged(data) as handle:
                decode_clip_into(rows, i, handle, images=images, options=options, change=change)
        except OSError as exc:  # the file went away, or the store failed, between its reads
            rows[schema.STATUS][i] = schema.Status.UNREADABLE.value
            rows[schema.ERROR][i] = f"{type(exc).__name__}: {exc}"[:300]
        return
    decode_into(rows, i, data, images=images, options=options, change=change)
    if options.views and options.fixed and images[i] is not None and images[i].ndim == 3:
        images[i] = images[i][None]


def decode_views_into(
    rows: dict[str, list[Any]],
    i: int,
    views: list[bytes],
    *,
    images: list[np.ndarray | None],
    options: FileOptions,
    change: Any,
) -> None:
    """Decode the views of row ``i`` (video frames) into one stack of tiles in ``images[i]``.

    The row takes the first failing view's status and error, else the first view's columns
    (format, size, PDQ); ``t_decode_ms`` is the time of all views.
    """
    scratch: dict[str, list[Any]] = {c: [None] * len(views) for c in schema.DECODED_COLUMNS}
    pixels: list[np.ndarray | None] = [None] * len(views)
    stills = dataclasses.replace(options, video_frames=0)  # a view is one image: a video in it is not sampled
    for j, data in enumerate(views):
        decode_into(scratch, j, data, images=pixels, options=stills, change=change)
    failed = [j for j, status in enumerate(scratch[schema.STATUS]) if status != schema.Status.OK.value]
    pick = failed[0] if failed else 0
    for column in schema.DECODED_COLUMNS:
        rows[column][i] = scratch[column][pick]
    rows[schema.T_DECODE_MS][i] = sum(scratch[schema.T_DECODE_MS])
    if failed:
        rows[schema.ERROR][i] = f"view {pick + 1} of {len(views)}: {scratch[schema.ERROR][pick]}"
        return
    stacks = [p if p.ndim == 4 else p[None] for p in pixels if p is not None]
    if len({p.shape[1:] for p in stacks}) != 1:
        rows[schema.STATUS][i] = schema.Status.UNSUPPORTED.value
        rows[schema.ERROR][i] = f"{len(views)} views of different shapes; use a fixed-size policy (resize, tiles)"
        return
    images[i] = np.concatenate(stacks)


def _views_need_the_cpu(rows: dict[str, list[Any]], payload: list[bytes | list[bytes] | None]) -> None:
    """``--gpu-decode`` decodes one image per row: an Item read as several views becomes ``unsupported``."""
    for i, data in enumerate(payload):
        if isinstance(data, list):
            rows[schema.STATUS][i] = schema.Status.UNSUPPORTED.value
            rows[schema.ERROR][i] = f"{len(data)} views of one item need the CPU decode (scan without --gpu-decode)"
            payload[i] = None


def decode_into(
    rows: dict[str, list[Any]],
    i: int,
    data: bytes,
    *,
    images: np.ndarray | list[np.ndarray | None],
    options: FileOptions,
    change: Any,
) -> None:
    """Decode and preprocess file ``i`` on the CPU, filling its decode columns and ``images[i]``.

    The one per-file path of both the decode stage and ``--gpu-decode``'s fallback, so statuses agree.
    A video or an animated image (``options.video_frames``) is sampled instead (:func:`decode_clip_into`).
    """
    if options.video_frames and video.is_motion(data):
        decode_clip_into(rows, i, data, images=images, options=options, change=change)
        return
    start = time.perf_counter()
    result, view = policies.decode_and_preprocess(
        data, options.policy, options.max_pixels, size=options.size, change=change, framing=options.framing
    )
    for column in (schema.FORMAT, schema.MODE, schema.WIDTH, schema.HEIGHT):
        rows[column][i] = getattr(result, column)
    if view is not None:
        images[i] = view.pixels
        rows[schema.COVERAGE][i] = view.coverage
    rows[schema.STATUS][i] = result.status.value
    rows[schema.ERROR][i] = result.error
    rows[schema.T_DECODE_MS][i] = (time.perf_counter() - start) * 1000.0
    if options.phash and result.image is not None:
        hashed = pdq.pdq_of(result.image)
        rows[schema.PDQ][i], rows[schema.PDQ_QUALITY][i] = hashed.hash, hashed.quality


def decode_clip_into(
    rows: dict[str, list[Any]],
    i: int,
    data: bytes | IO[bytes],
    *,
    images: np.ndarray | list[np.ndarray | None],
    options: FileOptions,
    change: Any,
) -> None:
    """Sample a video's or an animation's frames and frame each exactly as a still of its pixels would be
    (the perturbation, then the policy): one stack of views in ``images[i]``, with the clip's columns and
    each frame's time. Under ``--phash`` the clip's PDQ is its middle sampled frame's, so reposts of a clip
    group together: a simplification of Meta's vPDQ, which hashes one frame per second."""
    start = time.perf_counter()
    clip = video.sample(data, options.video_frames, max_pixels=options.max_pixels, budget_s=options.video_budget_s)
    for column in (
        schema.FORMAT,
        schema.MODE,
        schema.WIDTH,
        schema.HEIGHT,
        schema.CODEC,
        schema.DURATION_S,
        schema.FPS,
    ):
        rows[column][i] = getattr(clip, column)
    rows[schema.STATUS][i], rows[schema.ERROR][i] = clip.status.value, clip.error
    views = [
        policies.view_of(
            change.apply(frame.image) if change else frame.image, options.policy, options.size, options.framing
        )
        for frame in clip.frames
    ]
    if views:
        images[i] = np.concatenate([v.pixels if v.pixels.ndim == 4 else v.pixels[None] for v in views])
        rows[schema.COVERAGE][i] = views[0].coverage
        rows[schema.N_FRAMES][i] = len(views)
        rows[schema.FRAME_TIMES][i] = [frame.t for frame in clip.frames]
    if options.phash and clip.frames:
        hashed = pdq.pdq_of(clip.frames[len(clip.frames) // 2].image)
        rows[schema.PDQ][i], rows[schema.PDQ_QUALITY][i] = hashed.hash, hashed.quality
    rows[schema.T_DECODE_MS][i] = (time.perf_counter() - start) * 1000.0


def _to_table(
    batch: pa.Table,
    rows: dict[str, list[Any]],
    payload: list[bytes | None] | None,
    *,
    entries: list[Entry],
    images: np.ndarray | list[np.ndarray | None] | None,
    policy: str,
    carried: tuple[pa.Field, ...] = (),
) -> pa.Table:
    n = len(entries)
    units = [e.unit for e in entries]
    listing = batch if units == list(range(batch.num_rows)) else batch.take(pa.array(units, pa.int64()))
    columns: dict[str, Any] = {
        schema.PATH: pa.array([e.item.path for e in entries], pa.string()),
        schema.SOURCE: listing.column(schema.SOURCE).cast(pa.string()),
        schema.PREPROCESS: pa.array([policy] * n, pa.string()),
    }
    for name, values in rows.items():
        columns[name] = pa.array(values, schema.HIDDEN_TYPES.get(name) or schema.SCORES_SCHEMA.field(name).type)
    for name in schema.ITEM_COLUMNS:
        columns[name] = pa.array([e.columns.get(name) for e in entries], pa.string())
    for field in carried:
        columns[field.name] = carried_array([e.columns.get(field.name) for e in entries], field)
    for name in listing.column_names:
        if name not in columns and name != schema.RAW_PATH:
            columns[name] = listing.column(name)
    columns[item.UNIT_ROWS] = pa.array([e.unit_rows for e in entries], pa.int64())
    if payload is not None:
        columns[schema.DATA] = pa.array(payload, pa.large_binary())
    elif isinstance(images, np.ndarray):
        columns[schema.IMAGE] = ArrowTensorArray.from_numpy(images)
    else:
        columns.update(pixel_columns(images or []))
    return pa.table(columns)


def carried_array(values: list[Any], field: pa.Field) -> pa.Array:
    """A carried column (a Parquet dataset's) typed as the driver found it, whatever a unit held: all-null
    chunks keep the type, and a value that does not convert (another file's type) is null, with a warning."""
    try:
        return pa.array(values, field.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        _logger.warning("column %s: values that are not %s are written as null", field.name, field.type)
    return pa.array([_converted(v, field.type) for v in values], field.type)


def _converted(value: Any, type_: pa.DataType) -> Any:
    try:
        return pa.scalar(value, type_).as_py()
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        return None


def pixel_columns(images: list[np.ndarray | None]) -> dict[str, pa.Array]:
    """Views of varying shapes as ``_pixels`` (their uint8 bytes) and ``_pixel_shape``; null where none."""
    return {
        schema.PIXELS: pa.array([None if a is None else a.tobytes() for a in images], pa.large_binary()),
        schema.PIXEL_SHAPE: pa.array([None if a is None else list(a.shape) for a in images], pa.list_(pa.int32())),
    }


def pixels_of(batch: pa.Table) -> list[np.ndarray | None]:
    """The views :func:`pixel_columns` stored, as uint8 arrays (no copy of the bytes)."""
    shapes = batch.column(schema.PIXEL_SHAPE).to_pylist()
    blobs = batch.column(schema.PIXELS).combine_chunks()
    return [
        None if shape is None else np.frombuffer(blobs[i].as_buffer(), np.uint8).reshape(shape)
        for i, shape in enumerate(shapes)
    ]
