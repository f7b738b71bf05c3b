"""The scan job: the only module that knows the order of the stages.

    sources ─► read + decode + preprocess (CPU tasks) ─► Classifier (actor pool) ─► sink (Parquet) ─► report

Validation happens before Ray starts: config, output directory, checkpoint
and source listing. Every listed file yields exactly one output row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import platform
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aidetect_batch import inputs, perturb, preprocess, schema, sources
from aidetect_batch.config import ConfigError, ScanConfig
from aidetect_batch.storage import claim_output, filesystem, join, read_json, write_json

_logger = logging.getLogger(__name__)

MAX_BLOCK_ROWS = 256
MIN_BLOCK_ROWS = 16
# Memory reserved per Classifier actor (model, activations, one batch). It also keeps the
# stages apart: Ray Data fuses consecutive map stages whose remote args are equal, which
# would run decoding inside the Classifier actors and leave the remaining CPUs idle.
CLASSIFIER_MEMORY = 1 << 30
PROGRESS_EVERY_S = 10.0
# A streamed listing's shards. Ray Data gathers a task's output into blocks of the dataset's
# target_max_block_size before passing any on, and that size holds for every stage of the
# dataset (Ray 2.60 has no per-operator setting). At the default 128 MiB (about a million paths)
# reading would wait for the whole listing, so a streamed scan uses 64 KiB: about one listing
# page (1,000 keys) per block. The price is that decoded images (150 KB each) then travel as
# one-image blocks, measured at about 0.2 ms per image (BENCHMARKS.md); a fused streaming
# repartition back to whole batches was slower still.
STREAM_SHARD_ROWS = MAX_BLOCK_ROWS
STREAM_BLOCK_BYTES = 64 << 10
# Fault tolerance comes from Ray Data's own defaults, which tests/test_faults.py pins: Classifier
# actors get max_restarts=-1 and max_task_retries=-1 (a killed actor is restarted and its
# in-flight batches re-run), and decode tasks are retried when their worker dies. Passing
# them again as map_batches(**ray_remote_args) is deprecated from Ray 2.60. Per-file errors
# never raise, so retries only ever see system failures.
_OWN_ENTRIES = (schema.SCORES_DIR, schema.REPORT_DIR, schema.RUN_FILE)


@dataclasses.dataclass
class ScanResult:
    """What a finished scan produced."""

    out: str
    files: list[str]
    summary: dict[str, Any]
    run: dict[str, Any]


DECODE_COLUMNS = (*schema.DECODED_COLUMNS, schema.FILE_SIZE, schema.SHA256, schema.T_READ_MS, schema.DUPLICATE_OF)


def prepare_batch(
    batch: pa.Table,
    policy: str,
    max_pixels: int,
    storage_options: dict[str, Any],
    size: int = preprocess.CROP,
    perturbation: str | None = None,
    registry: Any = None,
    decode_later: bool = False,
) -> pa.Table:
    """CPU stage: read, hash, (deduplicate,) decode and preprocess each file; failures become statuses.

    Returns an Arrow table typed like the scores schema plus the uint8 ``image``
    tensor column (``size``×``size``×3), so nullable integers stay integers on
    the way to the sink. Columns of the listing other than ``path`` and
    ``source`` (labels, groups, manifest columns, the shard id) pass through
    unchanged. ``perturbation`` (robustness sweep) is applied to the
    full-resolution decode before the policy. ``registry`` (``--dedup``) is
    the :class:`aidetect_batch.dedup.HashRegistry` actor. ``decode_later``
    (``--gpu-decode``) stops after reading: the bytes go to the Classifier in
    the ``data`` column and the status is left for it to set.
    """
    from ray.data.extensions import ArrowTensorArray

    paths = batch.column(schema.PATH).to_pylist()
    n = len(paths)
    rows: dict[str, list[Any]] = {c: [None] * n for c in DECODE_COLUMNS}
    payload: list[bytes | None] = [None] * n
    for i, path in enumerate(paths):
        start = time.perf_counter()
        try:
            payload[i] = sources.read_file(path, storage_options)
        except Exception as exc:  # noqa: BLE001 - any storage failure is this file's status, never the job's
            rows[schema.STATUS][i] = schema.Status.UNREADABLE.value
            rows[schema.ERROR][i] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        rows[schema.T_READ_MS][i] = (time.perf_counter() - start) * 1000.0
        rows[schema.FILE_SIZE][i] = len(payload[i])
        rows[schema.SHA256][i] = hashlib.sha256(payload[i]).hexdigest()
    if registry is not None:
        read = [i for i in range(n) if payload[i] is not None]
        firsts = ray_get(registry.claim.remote([rows[schema.SHA256][i] for i in read], [paths[i] for i in read]))
        for i, first in zip(read, firsts, strict=True):
            if first is not None:
                rows[schema.STATUS][i] = schema.Status.DUPLICATE.value
                rows[schema.DUPLICATE_OF][i] = first
                payload[i] = None
    images = np.zeros((0 if decode_later else n, size, size, 3), dtype=np.uint8)
    change = perturb.parse(perturbation) if perturbation else None
    for i in range(n) if not decode_later else ():
        if payload[i] is None:
            continue
        decode_into(rows, images, i, payload[i], policy, max_pixels, size, change)
    columns: dict[str, Any] = {
        schema.PATH: pa.array(paths, pa.string()),
        schema.SOURCE: batch.column(schema.SOURCE).cast(pa.string()),
        schema.PREPROCESS: pa.array([policy] * n, pa.string()),
    }
    for name, values in rows.items():
        columns[name] = pa.array(values, schema.SCORES_SCHEMA.field(name).type)
    for name in batch.column_names:
        if name not in columns:
            columns[name] = batch.column(name)
    if decode_later:
        columns[schema.DATA] = pa.array(payload, pa.large_binary())
    else:
        columns[schema.IMAGE] = ArrowTensorArray.from_numpy(images)
    return pa.table(columns)


def decode_into(
    rows: dict[str, list[Any]],
    images: np.ndarray,
    i: int,
    data: bytes,
    policy: str,
    max_pixels: int,
    size: int,
    change: Any,
) -> None:
    """Decode and preprocess file ``i`` on the CPU, filling its decode columns and ``images[i]``.

    The one per-file path of both the decode stage and ``--gpu-decode``'s fallback, so statuses agree.
    """
    start = time.perf_counter()
    result, image = preprocess.decode_and_preprocess(data, policy, max_pixels, size, change)
    for column in (schema.FORMAT, schema.MODE, schema.WIDTH, schema.HEIGHT):
        rows[column][i] = getattr(result, column)
    if image is not None:
        images[i] = image
    rows[schema.STATUS][i] = result.status.value
    rows[schema.ERROR][i] = result.error
    rows[schema.T_DECODE_MS][i] = (time.perf_counter() - start) * 1000.0


def ray_get(ref: Any) -> Any:
    """``ray.get`` (imported late: this module is also used where Ray is not started)."""
    import ray

    return ray.get(ref)


def check_output(cfg: ScanConfig) -> None:
    """Refuse a non-empty OUT unless ``overwrite``; then clear only this tool's own entries."""
    claim_output(cfg.out, _OWN_ENTRIES, cfg.overwrite, cfg.storage_options)


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the libraries a result depends on, for ``_run.json``."""
    import importlib.metadata as md

    names = ("aidetect-batch", "ray", "torch", "torchvision", "pyarrow", "pillow", "numpy", "fsspec", "s3fs")
    found = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in names:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = "missing"
    return found


def plan_classifier(cfg: ScanConfig, resources: dict[str, float]) -> dict[str, Any]:
    """Size the Classifier pool and the CPU decode pool together from the cluster's resources.

    GPUs present: one GPU and one CPU per actor, up to one actor per GPU. None: the pool runs on
    CPU. Either way the decode pool gets every CPU the Classifier actors leave (at least one), so
    decoding is as wide as the cluster allows without starving the actors of their CPUs.
    ``decode_cpus_per_actor`` says how many decode CPUs feed each Classifier actor.
    """
    cpus = int(resources.get("CPU", 1))
    gpus = int(resources.get("GPU", 0))
    if gpus > 0:
        actors = cfg.actors or (1, gpus)
        plan = {"device": "cuda", "actors": actors, "num_gpus": 1, "num_cpus": 1, "cpu_threads": None}
    else:
        per_actor = cfg.cpus_per_actor or max(1, cpus // 2)
        actors = cfg.actors or (1, max(1, (cpus - 1) // per_actor))
        if actors[0] * per_actor > cpus - 1:
            raise ConfigError(
                f"--actors {actors[0]},{actors[1]} x {per_actor} CPU(s) each leaves no CPU for decoding on a "
                f"cluster with {cpus} CPU(s); lower --actors or --cpus-per-actor"
            )
        plan = {"device": "cpu", "actors": actors, "num_gpus": 0, "num_cpus": per_actor, "cpu_threads": per_actor}
    decode = cfg.decode_tasks or max(1, cpus - actors[1] * plan["num_cpus"])
    plan.update(decode_tasks=decode, decode_cpus_per_actor=round(decode / actors[1], 2))
    return plan


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


class _Progress:
    """Progress lines every ``PROGRESS_EVERY_S``: files done of all, statuses, rate and ETA. While a
    streamed listing runs the total is not known yet; the line then shows how many files are listed."""

    def __init__(self, total: int | None, skipped: int = 0, listing: Any = None) -> None:
        self.total = total
        self.listing = listing
        self.listed_all = total is not None
        self.done = skipped
        self.ok = 0
        self.duplicates = 0
        self.skipped = skipped
        self.start = time.monotonic()
        self.last = self.start

    def update(self, table: pa.Table) -> None:
        self.done += table.num_rows
        status = table.column(schema.STATUS)
        self.ok += pc.sum(pc.equal(status, schema.Status.OK.value)).as_py() or 0
        self.duplicates += pc.sum(pc.equal(status, schema.Status.DUPLICATE.value)).as_py() or 0
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY_S and self.done != self.total:
            return
        self.last = now
        if not self.listed_all:
            snapshot = ray_get(self.listing.snapshot.remote())
            self.total = snapshot["listed"]
            self.listed_all = snapshot["finished"] is not None
        rate = (self.done - self.skipped) / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 and self.listed_all else math.inf
        _logger.info(
            "progress: %d/%d%s files (%.1f%%), ok %d, failed %d, duplicates %d, %.1f img/s, ETA %s",
            self.done,
            self.total,
            "" if self.listed_all else " listed so far",
            100.0 * self.done / max(self.total or 0, 1),
            self.ok,
            self.done - self.skipped - self.ok - self.duplicates,
            self.duplicates,
            rate,
            f"{eta:.0f}s" if math.isfinite(eta) else "unknown",
        )


def _streamed_identity(cfg: ScanConfig, units: list[tuple[str, bool]]) -> dict[str, Any]:
    """What fixes a streamed listing's rows before it has run: the sources and the selection."""
    return {
        "sources": [uri for uri, _ in units],
        "extensions": list(cfg.extensions),
        "all_files": cfg.all_files,
        "sample": cfg.sample,
        "limit": cfg.limit,
        "seed": cfg.seed,
    }


def list_inputs(cfg: ScanConfig) -> pa.Table:
    """The scan's input rows (listing or manifest), after ``--sample`` and ``--limit``."""
    if cfg.manifest:
        table = inputs.read_manifest(cfg.manifest, cfg.storage_options)
    else:
        table = sources.list_sources(cfg.sources, cfg.extensions, cfg.all_files, cfg.storage_options)
    table = inputs.select(table, cfg.sample, cfg.limit, cfg.seed)
    if table.num_rows == 0:
        raise sources.SourceError("no inputs left after --sample/--limit")
    return table


def previous_run(cfg: ScanConfig) -> dict[str, Any]:
    """The ``_run.json`` of the scan to resume; raises :class:`ConfigError` when there is none."""
    try:
        return read_json(join(cfg.out, schema.RUN_FILE), cfg.storage_options)
    except FileNotFoundError:
        raise ConfigError(f"--resume: {cfg.out} holds no scan to resume (no {schema.RUN_FILE})") from None


def check_resumable(previous: dict[str, Any], identity: dict[str, Any]) -> None:
    """Refuse to resume when the inputs, the model or the preprocessing differ from the stopped scan."""
    before = previous.get("identity") or {}
    changed = [k for k in identity if before.get(k) != identity[k]]
    if changed:
        details = "; ".join(f"{k}: was {before.get(k)!r}, now {identity[k]!r}" for k in changed)
        raise ConfigError(
            f"--resume refused: the scan in this OUT used other settings ({details}). Resume with the same "
            "inputs, --checkpoint, --preprocess, --sample/--limit and --dedup, or start over with --overwrite."
        )


def run_scan(cfg: ScanConfig, listing: pa.Table | None = None) -> ScanResult:
    """Run a whole scan: validate, list, score on Ray, write scores, report and ``_run.json``.

    ``listing`` replaces listing ``cfg.sources``: a table with ``path``,
    ``source`` and any extra columns (labels, groups), which are written next
    to the scores. ``evaluate`` scores its labelled set this way.

    The input is cut into shards of consecutive rows; scores files hold whole
    shards and name them in their metadata, so ``cfg.resume`` skips exactly
    the shards that were committed before a crash.

    Raises:
        ConfigError: bad arguments, a non-empty OUT, or a resume with other settings (before Ray starts).
        sources.SourceError: a missing source or manifest (before Ray starts).
        model.CheckpointError: an unreadable or mismatched checkpoint (before Ray starts).
    """
    import ray

    from aidetect_batch import dedup, model, report
    from aidetect_batch.sinks import ScoreWriter, committed_shards

    started = datetime.now(timezone.utc)
    previous = previous_run(cfg) if cfg.resume else None
    if previous is None:
        check_output(cfg)
    ckpt_bytes = model.read_checkpoint_bytes(cfg.checkpoint, cfg.storage_options)
    ckpt = model.parse_checkpoint(ckpt_bytes, arch=cfg.arch, ai_class_index=cfg.ai_class_index)
    ckpt.build()
    policy = cfg.preprocess or ckpt.preprocess or preprocess.DEFAULT_POLICY
    threshold = cfg.threshold if cfg.threshold is not None else ckpt.threshold
    if ckpt.info.get("untrained"):
        _logger.warning("checkpoint %s is UNTRAINED (random weights): its scores mean nothing", cfg.checkpoint)
    identity: dict[str, Any] = {}
    units = None
    if listing is None and not cfg.manifest and sources.streamable(cfg.sources):
        units = sources.listing_units(cfg.sources, cfg.storage_options)
        identity["listing"] = _streamed_identity(cfg, units)
        extra_fields: list[pa.Field] = []
        total = None
        _logger.info("listing %d remote source(s) page by page while the scan runs", len(units))
    else:
        if listing is None:
            listing = list_inputs(cfg)
        extra_fields = [f for f in listing.schema if f.name not in (schema.PATH, schema.SOURCE)]
        clash = [f.name for f in extra_fields if f.name in schema.SCORE_COLUMNS or f.name.startswith("_")]
        if clash or schema.IMAGE in listing.column_names:
            raise ConfigError(f"input columns {clash or [schema.IMAGE]} clash with output columns; rename them")
        total = listing.num_rows
        identity.update(inputs=inputs.fingerprint(listing), input_rows=total)
        _logger.info("%d inputs from %s", total, cfg.manifest or f"{len(cfg.sources)} source(s)")
    identity.update(
        model_id=ckpt.model_id,
        preprocess=policy,
        input_size=ckpt.input_size,
        perturbation=cfg.perturbation,
        dedup=cfg.dedup,
    )
    if previous is not None:
        check_resumable(previous, identity)

    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)
    resources = ray.cluster_resources()
    plan = plan_classifier(cfg, resources)
    _logger.info(
        "Classifier: %s-%s actor(s) on %s; decode: %d CPU task(s), %.1f per actor%s",
        *plan["actors"],
        plan["device"],
        plan["decode_tasks"],
        plan["decode_cpus_per_actor"],
        " (read only: --gpu-decode decodes on the GPU)" if cfg.gpu_decode else "",
    )
    scores_dir = join(cfg.out, schema.SCORES_DIR)
    if previous is not None:
        shard_rows = int(previous["shard_rows"])
        done, done_rows, old_files = committed_shards(scores_dir, cfg.storage_options)
        _logger.info("resuming: %d rows in %d committed file(s) are kept and not rescored", done_rows, len(old_files))
    else:
        shard_rows = (
            STREAM_SHARD_ROWS if total is None else block_size(total, int(resources.get("CPU", 1)), cfg.batch_size)
        )
        done, done_rows, old_files = {}, 0, []
    attempt = {"started": started.isoformat(), "rows_kept": done_rows, "files_kept": len(old_files)}
    run: dict[str, Any] = dict(previous or {})
    run.update(
        {
            "status": "running",
            "config": cfg.to_json(),
            "identity": identity,
            "shard_rows": shard_rows,
            "resolved": {
                "preprocess": policy,
                "input_size": ckpt.input_size,
                "threshold": threshold,
                "perturbation": cfg.perturbation,
                "classifier": plan,
            },
            "model": ckpt.metadata(),
            "model_id": ckpt.model_id,
            "versions": versions(),
            "cluster_resources": dict(resources),
            "inputs": total,
            "started": run.get("started", started.isoformat()),
            "attempts": [*run.get("attempts", []), attempt],
        }
    )
    run_uri = join(cfg.out, schema.RUN_FILE)
    fs, root = filesystem(cfg.out, cfg.storage_options)
    fs.makedirs(root, exist_ok=True)
    write_json(run_uri, run, cfg.storage_options)

    state = None
    if units is not None:
        state = ray.remote(num_cpus=0)(inputs.ListingState).remote()
        expected: dict[int, int] = {}
        inputs_ds = streamed_inputs(cfg, units, shard_rows, done, state)
    else:
        assert listing is not None and total is not None
        todo = [k for k in range(math.ceil(total / shard_rows)) if k not in done]
        expected = {}
        blocks = []
        for k in todo:
            block = listing.slice(k * shard_rows, shard_rows)
            expected[k] = block.num_rows
            blocks.append(block.append_column(schema.SHARD, pa.array(np.full(block.num_rows, k, np.int64))))
        inputs_ds = ray.data.from_arrow(blocks) if blocks else None
    registry = None
    if cfg.dedup:
        registry = dedup.start(dedup.seen_in(scores_dir, old_files, cfg.storage_options))
    writer = ScoreWriter(
        scores_dir,
        cfg.rows_per_file,
        cfg.storage_options,
        table_schema=pa.schema([*schema.SCORES_SCHEMA, *extra_fields]),
        shard_rows=expected,
        commit_every_s=cfg.commit_every_s,
    )
    progress = _Progress(total, skipped=done_rows, listing=state)
    t0 = time.monotonic()
    first_result: float | None = None
    if inputs_ds is not None:
        for batch in delivered(_score(cfg, ckpt, ckpt_bytes, policy, threshold, plan, inputs_ds, registry)):
            if first_result is None:
                first_result = time.monotonic() - t0
            writer.write(batch)
            progress.update(batch)
    files = writer.close()
    wall = time.monotonic() - t0
    if state is not None:
        total = _finish_listing(cfg, ray_get(state.snapshot.remote())["finished"], identity, previous, run, run_uri)
    if done_rows + writer.rows_written != total:
        raise RuntimeError(
            f"invariant broken: {total} inputs but {done_rows} kept + {writer.rows_written} new rows written"
        )

    extra = {
        "wall_seconds": wall,
        "images_per_s": writer.rows_written / wall if wall > 0 else None,
        "first_result_seconds": first_result,
        "threshold": threshold,
        "preprocess": policy,
        "model_id": ckpt.model_id,
        "untrained_model": bool(ckpt.info.get("untrained")),
    }
    summary = report.write_report(cfg.out, cfg.group_depth, cfg.storage_options, extra)
    all_files = sorted([*old_files, *files])
    attempt.update(rows_scored=writer.rows_written, wall_seconds=wall, first_result_seconds=first_result)
    run.update(
        status="complete",
        finished=datetime.now(timezone.utc).isoformat(),
        wall_seconds=wall,
        outputs={"scores": all_files, "rows": total},
        counts={"status": summary["status_counts"], "label": summary["label_counts"]},
    )
    write_json(run_uri, run, cfg.storage_options)
    return ScanResult(cfg.out, all_files, summary, run)


def delivered(ds: Any) -> Iterator[pa.Table]:
    """A dataset's output blocks, each as soon as it is finished.

    ``iter_batches`` prefetches one block by default, and that holds every finished block back
    until the next one is done: the first result, the progress lines and the shard commits then
    lag a whole Classifier task (64 rows scored at 8.0 s reached the driver at 13.1 s). Score
    blocks are small, so fetching them on the driver's thread costs nothing measurable."""
    return ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)


def streamed_inputs(
    cfg: ScanConfig,
    units: list[tuple[str, bool]],
    shard_rows: int,
    done: dict[int, str],
    state: Any,
    block_bytes: int = STREAM_BLOCK_BYTES,
) -> Any:
    """The input stage of a streamed listing: one zero-CPU task lists the sources page by page and
    yields the input shards. Ray Data hands them on in STREAM_BLOCK_BYTES blocks (about a listing
    page each), so reading starts after the first page, not after the whole listing."""
    import ray

    context = ray.data.DataContext.get_current()
    saved = context.target_max_block_size
    context.target_max_block_size = block_bytes
    try:
        ds = ray.data.from_items([{"listing": 0}])
    finally:
        context.target_max_block_size = saved
    return ds.map_batches(
        inputs.stream_shards,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=0,
        fn_kwargs={
            "units": units,
            "extensions": cfg.extensions,
            "all_files": cfg.all_files,
            "storage_options": cfg.storage_options,
            "shard_rows": shard_rows,
            "sample": cfg.sample,
            "limit": cfg.limit,
            "seed": cfg.seed,
            "committed": done,
            "state": state,
        },
    )


def _finish_listing(
    cfg: ScanConfig,
    finished: dict[str, Any] | None,
    identity: dict[str, Any],
    previous: dict[str, Any] | None,
    run: dict[str, Any],
    run_uri: str,
) -> int:
    """Check how a streamed listing ended and record its row count and fingerprint as the scan's inputs.

    Raises:
        RuntimeError: the listing task never reported its end.
        ConfigError: a resumed listing differs from the stopped scan's in a shard that was committed.
        sources.SourceError: the sources held no files at all.
    """
    if finished is None:
        raise RuntimeError("the listing stage ended without reporting its result")
    if finished["changed"]:
        raise ConfigError(
            f"--resume refused: the listing of {', '.join(cfg.sources)} changed since the stopped scan "
            f"({finished['changed']} differs from the committed one). Rows written so far are correct for "
            "the new listing up to that shard; start over with --overwrite, or scan a fixed --manifest."
        )
    if finished["rows"] == 0:
        raise sources.SourceError(f"no files found in {', '.join(cfg.sources)}")
    before = (previous or {}).get("identity", {}).get("inputs")
    if before and before != finished["fingerprint"]:
        _logger.warning("the listing changed since the stopped scan after its committed shards; new files were scanned")
    identity.update(inputs=finished["fingerprint"], input_rows=finished["rows"])
    run.update(identity=identity, inputs=finished["rows"])
    write_json(run_uri, run, cfg.storage_options)
    return int(finished["rows"])


def _score(
    cfg: ScanConfig,
    ckpt: Any,
    ckpt_bytes: bytes,
    policy: str,
    threshold: float,
    plan: dict[str, Any],
    ds: Any,
    registry: Any,
) -> Any:
    """The Ray Data plan: input shards ─► read/decode tasks ─► Classifier actor pool."""
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    from aidetect_batch.classifier import Classifier

    ds = ds.map_batches(
        prepare_batch,
        batch_size=cfg.decode_batch_size,
        batch_format="pyarrow",
        compute=TaskPoolStrategy(size=plan["decode_tasks"]),
        num_cpus=1,
        fn_kwargs={
            "policy": policy,
            "max_pixels": cfg.max_pixels,
            "storage_options": cfg.storage_options,
            "size": ckpt.input_size,
            "perturbation": cfg.perturbation,
            "registry": registry,
            "decode_later": cfg.gpu_decode,
        },
    )
    decode_options = None
    if cfg.gpu_decode:
        decode_options = {
            "policy": policy,
            "max_pixels": cfg.max_pixels,
            "size": ckpt.input_size,
            "perturbation": cfg.perturbation,
        }
    return ds.map_batches(
        Classifier,
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=plan["actors"][0], max_size=plan["actors"][1]),
        num_gpus=plan["num_gpus"],
        num_cpus=plan["num_cpus"],
        memory=CLASSIFIER_MEMORY,
        fn_constructor_kwargs={
            "checkpoint": ray.put(ckpt_bytes),
            "arch": cfg.arch,
            "ai_class_index": cfg.ai_class_index,
            "threshold": threshold,
            "precision": cfg.precision,
            "cpu_threads": plan["cpu_threads"],
            "decode_options": decode_options,
            "compile": cfg.compile,
        },
    )
