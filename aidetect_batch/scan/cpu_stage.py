"""The CPU stage: read, hash, claim (``--dedup``), decode and preprocess each file of a batch.

It runs as Ray Data ``map_batches`` tasks between the input shards and the
Classifier pool, and as the per-file fallback of ``--gpu-decode`` inside the
Classifier. Every file yields one row: a failure at any step becomes the row's
``status`` and ``error``, never an exception. The size cap is checked before
any byte is read, and special files are never opened for reading
(:func:`aidetect_batch.inputs.sources.read_file`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.data.extensions import ArrowTensorArray

from aidetect_batch import schema
from aidetect_batch.detectors import policies
from aidetect_batch.inputs import sources
from aidetect_batch.media import pdq, perturb, provenance

DECODE_COLUMNS = (
    *schema.DECODED_COLUMNS,
    schema.FILE_SIZE,
    schema.SHA256,
    schema.T_READ_MS,
    schema.DUPLICATE_OF,
    schema.PROVENANCE,
    schema.PROVENANCE_DETAIL,
)


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

    @property
    def fixed(self) -> bool:
        """Every image becomes one ``size``×``size`` view (``resize``, ``center-crop``)."""
        return self.policy in policies.FIXED_POLICIES


def prepare_batch(batch: pa.Table, options: PrepareOptions, registry: Any = None) -> pa.Table:
    """Read, hash, (deduplicate,) decode and preprocess each file; failures become statuses.

    Returns an Arrow table typed like the scores schema plus the uint8 ``image``
    tensor column (``size``×``size``×3), or for ``tiles`` and ``native`` the
    ``_pixels`` bytes and their ``_pixel_shape``, so nullable integers stay
    integers on the way to the sink. Columns of the listing other than ``path``, ``source``
    and ``_raw_path`` (labels, groups, manifest columns, the shard id) pass
    through unchanged. ``registry`` (``--dedup``) is the
    :class:`aidetect_batch.scan.dedup.HashRegistry` actor.
    """
    paths = batch.column(schema.PATH).to_pylist()
    raw = batch.column(schema.RAW_PATH).to_pylist() if schema.RAW_PATH in batch.column_names else [None] * len(paths)
    rows: dict[str, list[Any]] = {c: [None] * len(paths) for c in DECODE_COLUMNS}
    payload = [read_into(rows, i, path, raw_path=raw[i], options=options) for i, path in enumerate(paths)]
    if registry is not None:
        _claim_duplicates(rows, payload, paths, registry=registry)
    for i, data in enumerate(payload):
        if data is not None:
            inspect_into(rows, i, data, options.checks)
    images = None if options.decode_later else _decode_all(rows, payload, options)
    return _to_table(batch, rows, payload if options.decode_later else None, images=images, policy=options.policy)


def read_into(
    rows: dict[str, list[Any]], i: int, path: str, *, raw_path: bytes | None, options: PrepareOptions
) -> bytes | None:
    """Read file ``i`` and fill its read columns; its bytes, or ``None`` when reading failed (status set)."""
    start = time.perf_counter()
    try:
        data = sources.read_file(path, options.storage_options, max_bytes=options.max_file_bytes, raw_path=raw_path)
    except Exception as exc:  # noqa: BLE001 - any storage failure is this file's status, never the job's
        status, rows[schema.FILE_SIZE][i] = read_failure(exc)
        rows[schema.STATUS][i] = status.value
        rows[schema.ERROR][i] = f"{type(exc).__name__}: {exc}"[:300]
        return None
    rows[schema.T_READ_MS][i] = (time.perf_counter() - start) * 1000.0
    rows[schema.FILE_SIZE][i] = len(data)
    rows[schema.SHA256][i] = hashlib.sha256(data).hexdigest()
    return data


def inspect_into(rows: dict[str, list[Any]], i: int, data: bytes, checks: provenance.Checks) -> None:
    """Fill file ``i``'s provenance columns from its bytes (before decoding, so a failed decode keeps them)."""
    found = provenance.inspect(data, checks)
    rows[schema.PROVENANCE][i] = found.kind
    rows[schema.PROVENANCE_DETAIL][i] = found.detail


def read_failure(exc: BaseException) -> tuple[schema.Status, int | None]:
    """The one place a read error becomes a status: the status and the file size, when known."""
    if isinstance(exc, sources.FileTooLarge):
        return schema.Status.TOO_LARGE, exc.size
    return schema.Status.UNREADABLE, None


def _claim_duplicates(
    rows: dict[str, list[Any]], payload: list[bytes | None], paths: list[str], *, registry: Any
) -> None:
    """Ask the registry actor, once per batch, which hashes were seen first elsewhere; those rows become duplicates."""
    read = [i for i in range(len(paths)) if payload[i] is not None]
    firsts = ray.get(registry.claim.remote([rows[schema.SHA256][i] for i in read], [paths[i] for i in read]))
    for i, first in zip(read, firsts, strict=True):
        if first is not None:
            rows[schema.STATUS][i] = schema.Status.DUPLICATE.value
            rows[schema.DUPLICATE_OF][i] = first
            payload[i] = None


def _decode_all(
    rows: dict[str, list[Any]], payload: list[bytes | None], options: PrepareOptions
) -> np.ndarray | list[np.ndarray | None]:
    images: Any = [None] * len(payload)
    if options.fixed:
        images = np.zeros((len(payload), options.size, options.size, 3), dtype=np.uint8)
    change = perturb.parse(options.perturbation) if options.perturbation else None
    for i, data in enumerate(payload):
        if data is not None:
            decode_into(rows, i, data, images=images, options=options, change=change)
    return images


def decode_into(
    rows: dict[str, list[Any]],
    i: int,
    data: bytes,
    *,
    images: np.ndarray | list[np.ndarray | None],
    options: PrepareOptions,
    change: Any,
) -> None:
    """Decode and preprocess file ``i`` on the CPU, filling its decode columns and ``images[i]``.

    The one per-file path of both the decode stage and ``--gpu-decode``'s fallback, so statuses agree.
    """
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


def _to_table(
    batch: pa.Table,
    rows: dict[str, list[Any]],
    payload: list[bytes | None] | None,
    *,
    images: np.ndarray | list[np.ndarray | None] | None,
    policy: str,
) -> pa.Table:
    n = batch.num_rows
    columns: dict[str, Any] = {
        schema.PATH: batch.column(schema.PATH).cast(pa.string()),
        schema.SOURCE: batch.column(schema.SOURCE).cast(pa.string()),
        schema.PREPROCESS: pa.array([policy] * n, pa.string()),
    }
    for name, values in rows.items():
        columns[name] = pa.array(values, schema.SCORES_SCHEMA.field(name).type)
    for name in batch.column_names:
        if name not in columns and name != schema.RAW_PATH:
            columns[name] = batch.column(name)
    if payload is not None:
        columns[schema.DATA] = pa.array(payload, pa.large_binary())
    elif isinstance(images, np.ndarray):
        columns[schema.IMAGE] = ArrowTensorArray.from_numpy(images)
    else:
        columns.update(pixel_columns(images or []))
    return pa.table(columns)


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
