"""The scan job: the only module that knows the order of the stages.

    sources ─► read + decode + preprocess (CPU tasks) ─► Classifier (actor pool) ─► sink (Parquet) ─► report

Validation happens before Ray starts: config, output directory, checkpoint
and source listing. Every listed file yields exactly one output row.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import ActorPoolStrategy, TaskPoolStrategy

from aidetect_batch import runtime, schema
from aidetect_batch.detectors import checkpoints, policies
from aidetect_batch.detectors import registry as arch_registry
from aidetect_batch.detectors.policies import check_policy
from aidetect_batch.errors import ConfigError
from aidetect_batch.inputs import item, manifest, sources, stamps
from aidetect_batch.inputs.manifest import block_size
from aidetect_batch.report import aggregate
from aidetect_batch.scan import cpu_stage, dedup
from aidetect_batch.scan.classifier import Classifier, ClassifierPlan
from aidetect_batch.scan.config import ScanConfig
from aidetect_batch.scan.sink import ScoreWriter, committed_work
from aidetect_batch.storage import claim_output, join

_logger = logging.getLogger(__name__)

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
STREAM_SHARD_ROWS = manifest.MAX_BLOCK_ROWS
STREAM_BLOCK_BYTES = 64 << 10
# Fault tolerance comes from Ray Data's own defaults, which tests/test_faults.py pins: Classifier
# actors get max_restarts=-1 and max_task_retries=-1 (a killed actor is restarted and its
# in-flight batches re-run), and decode tasks are retried when their worker dies. Passing
# them again as map_batches(**ray_remote_args) is deprecated from Ray 2.60. Per-file errors
# never raise, so retries only ever see system failures.
# Listing rows sampled to tell whether a scan is mostly archives (:func:`mostly_containers`).
CONTAINER_SAMPLE_ROWS = 4096
_OWN_ENTRIES = (schema.SCORES_DIR, schema.FRAMES_DIR, schema.REPORT_DIR, schema.RUN_FILE, schema.REPOSTS_DIR)
# Identity key of the listed archives' stamps (:mod:`aidetect_batch.inputs.stamps`); absent when none is listed.
CONTAINER_STAMPS = "container_stamps"


@dataclasses.dataclass
class ScanResult:
    """What a finished scan produced.

    Attributes:
        out: The output directory.
        files: Every committed scores file, kept ones of a resumed scan included.
        summary: The report's aggregates (``report/summary.json``).
        run: The run record (``_run.json``).
        deliveries: ``(seconds since the plan started, rows written so far)`` at each result block this
            attempt received: the benchmarks' steady-state rates come from it.
    """

    out: str
    files: list[str]
    summary: schema.Summary
    run: dict[str, Any]
    deliveries: list[tuple[float, int]] = dataclasses.field(default_factory=list)


def check_output(cfg: ScanConfig) -> None:
    """Refuse a non-empty OUT unless ``overwrite``; then clear only this tool's own entries."""
    claim_output(cfg.out, _OWN_ENTRIES, cfg.overwrite, storage_options=cfg.storage_options)


def plan_classifier(cfg: ScanConfig, resources: dict[str, float]) -> ClassifierPlan:
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
        device, num_gpus, num_cpus, threads = "cuda", 1, 1, None
    else:
        per_actor = cfg.cpus_per_actor or max(1, cpus // 2)
        actors = cfg.actors or (1, max(1, (cpus - 1) // per_actor))
        if actors[0] * per_actor > cpus - 1:
            raise ConfigError(
                f"--actors {actors[0]},{actors[1]} x {per_actor} CPU(s) each leaves no CPU for decoding on a "
                f"cluster with {cpus} CPU(s); lower --actors or --cpus-per-actor"
            )
        device, num_gpus, num_cpus, threads = "cpu", 0, per_actor, per_actor
    decode = cfg.decode_tasks or max(1, cpus - actors[1] * num_cpus)
    return ClassifierPlan(
        device=device,
        actors=tuple(actors),
        num_gpus=num_gpus,
        num_cpus=num_cpus,
        cpu_threads=threads,
        decode_tasks=decode,
        decode_cpus_per_actor=round(decode / actors[1], 2),
    )


class _Progress:
    """Progress lines every ``PROGRESS_EVERY_S``: inputs done of all, rows written, statuses, rate and ETA.
    An input is a listed unit: an archive counts once, when its last member's row arrives. While a streamed
    listing runs the total is not known yet; the line then shows how many inputs are listed."""

    def __init__(self, total: int | None, skipped: int = 0, listing: Any = None) -> None:
        self.total = total
        self.listing = listing
        self.listed_all = total is not None
        self.done = skipped
        self.rows = 0
        self.ok = 0
        self.duplicates = 0
        self.skipped = skipped
        self.start = time.monotonic()
        self.last = self.start

    def update(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        units = table.column(item.UNIT_ROWS) if item.UNIT_ROWS in table.column_names else None
        self.done += table.num_rows if units is None else pc.sum(pc.greater(units, 0)).as_py() or 0
        status = table.column(schema.STATUS)
        self.ok += pc.sum(pc.equal(status, schema.Status.OK.value)).as_py() or 0
        self.duplicates += pc.sum(pc.equal(status, schema.Status.DUPLICATE.value)).as_py() or 0
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY_S and self.done != self.total:
            return
        self.last = now
        if not self.listed_all:
            snapshot = ray.get(self.listing.snapshot.remote())
            self.total = snapshot["listed"]
            self.listed_all = snapshot["finished"] is not None
        rate = (self.done - self.skipped) / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 and self.listed_all else math.inf
        _logger.info(
            "progress: %d/%d%s inputs (%.1f%%), %d rows: ok %d, failed %d, duplicates %d; %.1f rows/s, ETA %s",
            self.done,
            self.total,
            "" if self.listed_all else " listed so far",
            100.0 * self.done / max(self.total or 0, 1),
            self.rows,
            self.ok,
            self.rows - self.ok - self.duplicates,
            self.duplicates,
            self.rows / max(now - self.start, 1e-9),
            f"{eta:.0f}s" if math.isfinite(eta) else "unknown",
        )


def _streamed_identity(cfg: ScanConfig, units: list[tuple[str, bool]]) -> dict[str, Any]:
    """What fixes a streamed listing's rows before it has run: the sources and the selection."""
    return {
        "sources": [uri for uri, _ in units],
        # Without the built-in archive kinds and the video extensions, so that a scan stopped before they existed
        # still resumes (the shards' path digests still catch a listing that differs).
        "extensions": list(item.listed_extensions(cfg.extensions, item.registered(built_in=False))),
        "all_files": cfg.all_files,
        "sample": cfg.sample,
        "limit": cfg.limit,
        "seed": cfg.seed,
    }


def list_inputs(cfg: ScanConfig) -> pa.Table:
    """The scan's input rows (listing or manifest), after ``--sample`` and ``--limit``."""
    if cfg.manifest:
        table = manifest.read_manifest(cfg.manifest, cfg.storage_options)
    else:
        table = sources.list_sources(
            cfg.sources,
            item.listed_extensions(cfg.media_extensions, cfg.input_kinds),
            all_files=cfg.all_files,
            storage_options=cfg.storage_options,
        )
    table = manifest.select(table, cfg.sample, cfg.limit, seed=cfg.seed)
    if table.num_rows == 0:
        raise sources.SourceError("no inputs left after --sample/--limit")
    return table


def previous_run(cfg: ScanConfig) -> dict[str, Any]:
    """The ``_run.json`` of the scan to resume; raises :class:`ConfigError` when there is none."""
    previous = runtime.RunRecord.previous(cfg.out, cfg.storage_options)
    if previous is None:
        raise ConfigError(f"--resume: {cfg.out} holds no scan to resume (no {schema.RUN_FILE})")
    return previous


def check_resumable(previous: dict[str, Any], identity: dict[str, Any]) -> None:
    """Refuse to resume when the inputs, the model or the preprocessing differ from the stopped scan, or
    when a listed archive was rewritten since (its stamp differs)."""
    before = previous.get("identity") or {}
    changed = [k for k in identity if k != CONTAINER_STAMPS and before.get(k) != identity[k]]
    if changed:
        details = "; ".join(f"{k}: was {before.get(k)!r}, now {identity[k]!r}" for k in changed)
        raise ConfigError(
            f"--resume refused: the scan in this OUT used other settings ({details}). Resume with the same "
            "inputs, --checkpoint, --preprocess (and its --max-tiles or --native-max-pixels), --sample/--limit "
            "and --dedup, or start over with --overwrite."
        )
    _check_archives(before.get(CONTAINER_STAMPS), identity.get(CONTAINER_STAMPS, {}))


def _check_archives(before: dict[str, str] | None, now: dict[str, str]) -> None:
    """Refuse to resume when an archive's stamp differs from the stopped scan's. A scan that recorded no
    stamps (written before they existed) resumes unchecked, as it did then."""
    if before is None:
        if now:
            _logger.warning("the stopped scan recorded no archive stamps: a rewritten archive cannot be detected")
        return
    rewritten = stamps.changed(before, now)
    if rewritten:
        raise ConfigError(
            f"--resume refused: {len(rewritten)} archive(s) changed since the stopped scan (size, modification "
            f"time or ETag): {stamps.named(rewritten)}. The committed rows name the members they held then; "
            "restore them, or start over with --overwrite."
        )


@dataclasses.dataclass
class _Detector:
    """The checkpoint as the scan uses it: parsed once on the driver, its bytes shipped to the actors."""

    ckpt: Any
    data: bytes
    policy: str
    threshold: float


@dataclasses.dataclass
class _Inputs:
    """The scan's inputs: a table listed on the driver, or remote sources a Ray task lists page by page."""

    identity: dict[str, Any]
    listing: pa.Table | None = None
    units: list[tuple[str, bool]] | None = None
    extra_fields: list[pa.Field] = dataclasses.field(default_factory=list)
    containers: bool = False
    carried: tuple[pa.Field, ...] | None = None

    @property
    def total(self) -> int | None:
        return None if self.listing is None else self.listing.num_rows


@dataclasses.dataclass
class _Run:
    """This attempt's ``_run.json``, and the committed work a resume keeps."""

    record: runtime.RunRecord
    attempt: dict[str, Any]
    shard_rows: int
    done: dict[int, str]
    done_rows: int
    old_files: list[str]
    previous_inputs: str | None = None
    done_units: int = 0

    def save(self, **changes: Any) -> None:
        self.record.save(**changes)


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
        CheckpointError: an unreadable or mismatched checkpoint (before Ray starts).
        runtime.Stopped: SIGINT or SIGTERM; finished shards are committed first.
    """
    started = datetime.now(timezone.utc)
    previous = previous_run(cfg) if cfg.resume else None
    if previous is None:
        check_output(cfg)
    detector = load_detector(cfg)
    scan_inputs = resolve_inputs(cfg, listing)
    identity = {**scan_inputs.identity, **_model_identity(cfg, detector)}
    if previous is not None:
        check_resumable(previous, identity)
    resources = runtime.start_ray()
    plan = plan_classifier(cfg, resources)
    _log_plan(cfg, plan)
    run = _open_run(
        cfg,
        previous=previous,
        identity=identity,
        started=started,
        resources=resources,
        plan=plan,
        detector=detector,
        total=scan_inputs.total,
    )
    return _score_and_report(cfg, detector=detector, scan_inputs=scan_inputs, plan=plan, run=run)


def load_detector(cfg: ScanConfig) -> _Detector:
    """Read, parse and build the checkpoint on the driver, so a bad file fails before Ray starts."""
    data = checkpoints.read_checkpoint_bytes(cfg.checkpoint, cfg.storage_options)
    ckpt = checkpoints.parse_checkpoint(data, arch=cfg.arch, ai_class_index=cfg.ai_class_index)
    ckpt.build()
    if ckpt.info.get("untrained"):
        _logger.warning("checkpoint %s is UNTRAINED (random weights): its scores mean nothing", cfg.checkpoint)
    policy = cfg.preprocess or ckpt.preprocess or policies.DEFAULT_POLICY
    check_policy(policy, ckpt.arch, gpu_decode=cfg.gpu_decode)
    return _Detector(
        ckpt=ckpt,
        data=data,
        policy=policy,
        threshold=cfg.threshold if cfg.threshold is not None else ckpt.threshold,
    )


def batch_rows(rows: int, policy: str, framing: policies.Framing) -> int:
    """Rows per batch: ``rows``, fewer for views of any size so a batch of the largest images stays bounded."""
    return policies.get(policy).batch_rows(rows, framing)


def resolve_inputs(cfg: ScanConfig, listing: pa.Table | None) -> _Inputs:
    """List the inputs on the driver, or check remote sources that a Ray task will list page by page."""
    if listing is None and not cfg.manifest and sources.streamable(cfg.sources):
        units = sources.listing_units(cfg.sources, cfg.storage_options)
        _logger.info("listing %d remote source(s) page by page while the scan runs", len(units))
        named = [uri for uri, is_prefix in units if not is_prefix]
        carried = _carried(cfg, pa.table({schema.PATH: pa.array(named, pa.string())}))
        identity = {"listing": _streamed_identity(cfg, units)}
        containers = len(named) == len(units) and mostly_containers(named, cfg)
        return _Inputs(
            identity=identity, units=units, extra_fields=list(carried or ()), carried=carried, containers=containers
        )
    if listing is None:
        listing = list_inputs(cfg)
    passed = [f for f in listing.schema if f.name not in (schema.PATH, schema.SOURCE, schema.RAW_PATH)]
    clash = [f.name for f in passed if f.name in schema.SCORE_COLUMNS or f.name.startswith("_")]
    if clash or schema.IMAGE in listing.column_names:
        raise ConfigError(f"input columns {clash or [schema.IMAGE]} clash with output columns; rename them")
    carried = _carried(cfg, listing)
    twice = sorted({f.name for f in passed} & {f.name for f in carried or ()})
    if twice:
        raise ConfigError(f"manifest columns {twice} are also columns of the Parquet inputs; rename them")
    _logger.info("%d inputs from %s", listing.num_rows, cfg.manifest or f"{len(cfg.sources)} source(s)")
    identity: dict[str, Any] = {"inputs": manifest.fingerprint(listing), "input_rows": listing.num_rows}
    archives = stamps.container_stamps(listing, cfg.input_kinds, cfg.storage_options)
    if archives:
        identity[CONTAINER_STAMPS] = archives
    step = max(1, listing.num_rows // CONTAINER_SAMPLE_ROWS)
    sample = listing.column(schema.PATH).take(pa.array(range(0, listing.num_rows, step))).to_pylist()
    return _Inputs(
        identity=identity,
        listing=listing,
        extra_fields=[*passed, *(carried or ())],
        carried=carried,
        containers=mostly_containers(sample, cfg),
    )


def _carried(cfg: ScanConfig, listing: pa.Table) -> tuple[pa.Field, ...] | None:
    """The columns the listed Parquet inputs carry through, from the first one's footer (read on the driver);
    ``None`` when there is none to read (a streamed listing's files under prefixes carry nothing)."""
    options = item.ReadOptions(cfg.storage_options, cfg.max_file_bytes, cfg.containers)
    carried = item.carried_fields(listing, options, cfg.input_kinds)
    if carried:
        _logger.info("carried through from the Parquet inputs: %s", ", ".join(f.name for f in carried))
    return carried


def mostly_containers(paths: list[str], cfg: ScanConfig) -> bool:
    """Whether a decode batch of ``--decode-batch-size`` of these units would hold an archive on average.
    Each archive then gets a decode task of its own, so archives are read side by side, not one after
    another in a task."""
    containers = sum(not item.is_loose(item.kind_of(item.Item(p), cfg.input_kinds)) for p in paths)
    return containers > 0 and containers * cfg.decode_batch_size >= len(paths)


def _model_identity(cfg: ScanConfig, detector: _Detector) -> dict[str, Any]:
    identity = {
        "model_id": detector.ckpt.model_id,
        "preprocess": detector.policy,
        "input_size": detector.ckpt.input_size,
        "perturbation": cfg.perturbation,
        "dedup": cfg.dedup,
    }
    if cfg.phash:
        identity["phash"] = True
    if cfg.watermark or not cfg.c2pa:
        identity["provenance_checks"] = {"c2pa": cfg.c2pa, "watermark": cfg.watermark}
    for field in policies.get(detector.policy).framing_fields:
        identity[field] = getattr(cfg.framing, field)
    expansion = _expansion(cfg)
    if expansion:
        identity["expansion"] = expansion
    return identity


def _expansion(cfg: ScanConfig) -> dict[str, Any]:
    """The settings that decide which rows a unit expands into, where they differ from the defaults (so a scan
    stopped before they existed still resumes): a resume with others would mix two expansions, or videos and
    frame rows sampled at two ``--video-frames``."""
    defaults = {f.name: f.default for f in dataclasses.fields(ScanConfig)}
    names = ("archives", "max_members", "max_ratio", "archive_depth", "image_column", "video_frames")
    return {name: getattr(cfg, name) for name in names if getattr(cfg, name) != defaults[name]}


def _log_plan(cfg: ScanConfig, plan: ClassifierPlan) -> None:
    _logger.info(
        "Classifier: %s-%s actor(s) on %s; decode: %d CPU task(s), %.1f per actor%s",
        *plan.actors,
        plan.device,
        plan.decode_tasks,
        plan.decode_cpus_per_actor,
        " (read only: --gpu-decode decodes on the GPU)" if cfg.gpu_decode else "",
    )


def _open_run(
    cfg: ScanConfig,
    *,
    previous: dict[str, Any] | None,
    identity: dict[str, Any],
    started: datetime,
    resources: dict[str, float],
    plan: ClassifierPlan,
    detector: _Detector,
    total: int | None,
) -> _Run:
    """Find the work a resume keeps, choose the shard size and write ``_run.json`` as ``running``."""
    scores_dir = join(cfg.out, schema.SCORES_DIR)
    if previous is not None:
        shard_rows = int(previous["shard_rows"])
        kept = committed_work(scores_dir, cfg.storage_options, frames_directory=join(cfg.out, schema.FRAMES_DIR))
        done, done_rows, old_files, done_units = kept.shards, kept.rows, kept.files, kept.units
        _logger.info("resuming: %d rows in %d committed file(s) are kept and not rescored", done_rows, len(old_files))
    else:
        cpus = int(resources.get("CPU", 1))
        shard_rows = STREAM_SHARD_ROWS if total is None else block_size(total, cpus, cfg.batch_size)
        done, done_rows, old_files, done_units = {}, 0, [], 0
    attempt = {"started": started.isoformat(), "rows_kept": done_rows, "files_kept": len(old_files)}
    record: dict[str, Any] = dict(previous or {})
    record.update(
        status="running",
        config=cfg.to_json(),
        identity=identity,
        shard_rows=shard_rows,
        resolved={
            "preprocess": detector.policy,
            "input_size": detector.ckpt.input_size,
            "threshold": detector.threshold,
            "perturbation": cfg.perturbation,
            "classifier": plan.to_json(),
        },
        model=detector.ckpt.metadata(),
        model_id=detector.ckpt.model_id,
        versions=runtime.versions(),
        cluster_resources=resources,
        inputs=total,
        started=record.get("started", started.isoformat()),
        attempts=[*record.get("attempts", []), attempt],
    )
    previous_inputs = (previous or {}).get("identity", {}).get("inputs")
    run = _Run(
        runtime.RunRecord(cfg.out, record, cfg.storage_options),
        attempt,
        shard_rows,
        done,
        done_rows,
        old_files,
        previous_inputs,
        done_units,
    )
    run.save()
    return run


def _score_and_report(
    cfg: ScanConfig, *, detector: _Detector, scan_inputs: _Inputs, plan: ClassifierPlan, run: _Run
) -> ScanResult:
    """Build the plan, drain it into the sink, check the row count, then write the report."""
    scores_dir = join(cfg.out, schema.SCORES_DIR)
    state = ray.remote(num_cpus=0)(manifest.ListingState).remote() if scan_inputs.units is not None else None
    ds, expected = _input_dataset(cfg, scan_inputs, run, state=state)
    registry = dedup.start(dedup.seen_in(scores_dir, run.old_files, cfg.storage_options)) if cfg.dedup else None
    writer = ScoreWriter(
        scores_dir,
        cfg.rows_per_file,
        cfg.storage_options,
        table_schema=pa.schema([*schema.SCORES_SCHEMA, *scan_inputs.extra_fields]),
        shard_rows=expected,
        commit_every_s=cfg.commit_every_s,
        frames_directory=join(cfg.out, schema.FRAMES_DIR),
    )
    progress = _Progress(scan_inputs.total, skipped=run.done_rows, listing=state)
    units_per_task = 1 if scan_inputs.containers else cfg.decode_batch_size
    if scan_inputs.containers:
        _logger.info("the inputs are mostly archives or Parquet files: one per decode task")
    results = None
    if ds is not None:
        results = _score(
            cfg,
            detector=detector,
            plan=plan,
            ds=ds,
            registry=registry,
            carried=scan_inputs.carried,
            units_per_task=units_per_task,
        )
    timing = _drain(cfg, results, writer=writer, progress=progress, run=run)
    total = scan_inputs.total
    if state is not None:
        total = _finish_listing(cfg, ray.get(state.snapshot.remote())["finished"], run)
    if run.done_units + writer.units_written != total:
        raise RuntimeError(
            f"invariant broken: {total} inputs but rows of {run.done_units} kept + {writer.units_written} new "
            "inputs written"
        )
    return _report(cfg, detector=detector, writer=writer, timing=timing, run=run)


def _report(cfg: ScanConfig, *, detector: _Detector, writer: ScoreWriter, timing: _Timing, run: _Run) -> ScanResult:
    """Write the report over every committed file and record the finished run in ``_run.json``."""
    facts = schema.RunFacts(
        wall_seconds=timing.wall,
        images_per_s=writer.rows_written / timing.wall if timing.wall > 0 else None,
        first_result_seconds=timing.first_result,
        threshold=detector.threshold,
        preprocess=detector.policy,
        model_id=detector.ckpt.model_id,
        untrained_model=bool(detector.ckpt.info.get("untrained")),
    )
    summary = aggregate.write_report(cfg.out, cfg.prefix_depth, cfg.storage_options, facts=facts)
    all_files = sorted([*run.old_files, *writer.files])
    run.attempt.update(
        rows_scored=writer.rows_written, wall_seconds=timing.wall, first_result_seconds=timing.first_result
    )
    run.save(
        status="complete",
        finished=datetime.now(timezone.utc).isoformat(),
        wall_seconds=timing.wall,
        outputs={"scores": all_files, "rows": run.done_rows + writer.rows_written},
        counts={"status": summary.status_counts, "label": summary.label_counts},
    )
    return ScanResult(cfg.out, all_files, summary, run.record.data, timing.deliveries)


def _input_dataset(cfg: ScanConfig, scan_inputs: _Inputs, run: _Run, *, state: Any) -> tuple[Any, dict[int, int]]:
    """The input shards not yet committed, as a dataset (``None`` when nothing is left), and their row counts."""
    if scan_inputs.units is not None:
        return streamed_inputs(cfg, scan_inputs.units, shard_rows=run.shard_rows, done=run.done, state=state), {}
    listing = scan_inputs.listing
    assert listing is not None
    expected: dict[int, int] = {}
    blocks = []
    for k in range(math.ceil(listing.num_rows / run.shard_rows)):
        if k in run.done:
            continue
        block = listing.slice(k * run.shard_rows, run.shard_rows)
        expected[k] = block.num_rows
        blocks.append(block.append_column(schema.SHARD, pa.array(np.full(block.num_rows, k, np.int64))))
    return (ray.data.from_arrow(blocks) if blocks else None), expected


@dataclasses.dataclass
class _Timing:
    wall: float
    first_result: float | None
    deliveries: list[tuple[float, int]]


def _drain(cfg: ScanConfig, results: Any, *, writer: Any, progress: _Progress, run: _Run) -> _Timing:
    """Write every result block as it arrives. On SIGINT/SIGTERM, commit the finished shards, record the
    stop in ``_run.json`` and raise :class:`runtime.Stopped` saying what was kept."""
    t0 = time.monotonic()
    deliveries: list[tuple[float, int]] = []
    rows = 0
    try:
        for batch in delivered(results) if results is not None else ():
            rows += batch.num_rows
            deliveries.append((time.monotonic() - t0, rows))
            writer.write(batch)
            progress.update(batch)
        writer.close()
    except (KeyboardInterrupt, runtime.Stopped) as exc:
        stopped = runtime.as_stopped(exc)
        writer.commit_finished()
        kept = run.done_rows + writer.rows_written
        run.save(status="stopped", stopped=datetime.now(timezone.utc).isoformat(), rows_kept=kept)
        stopped.kept = (
            f"kept {kept} scored row(s) of {progress.total if progress.listed_all else 'a listing not finished'} "
            f"in {len(run.old_files) + len(writer.files)} committed file(s) under {join(cfg.out, schema.SCORES_DIR)}"
        )
        raise stopped from None
    first_result = deliveries[0][0] if deliveries else None
    return _Timing(time.monotonic() - t0, first_result, deliveries)


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
    *,
    shard_rows: int,
    done: dict[int, str],
    state: Any,
    block_bytes: int = STREAM_BLOCK_BYTES,
) -> Any:
    """The input stage of a streamed listing: one zero-CPU task lists the sources page by page and
    yields the input shards. Ray Data hands them on in STREAM_BLOCK_BYTES blocks (about a listing
    page each), so reading starts after the first page, not after the whole listing."""
    context = ray.data.DataContext.get_current()
    saved = context.target_max_block_size
    context.target_max_block_size = block_bytes
    try:
        ds = ray.data.from_items([{"listing": 0}])
    finally:
        context.target_max_block_size = saved
    return ds.map_batches(
        manifest.stream_shards,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=0,
        fn_kwargs={
            "units": units,
            "extensions": item.listed_extensions(cfg.media_extensions, cfg.input_kinds),
            "all_files": cfg.all_files,
            "storage_options": cfg.storage_options,
            "shard_rows": shard_rows,
            "sample": cfg.sample,
            "limit": cfg.limit,
            "seed": cfg.seed,
            "committed": done,
            "state": state,
            "kinds": cfg.input_kinds,
        },
    )


def _finish_listing(cfg: ScanConfig, finished: dict[str, Any] | None, run: _Run) -> int:
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
            f"--resume refused: the listing of {', '.join(cfg.sources)} changed since the stopped scan: "
            f"{finished['changed']}. Rows written so far are correct for the new listing up to that shard; "
            "start over with --overwrite, or scan a fixed --manifest."
        )
    if finished["rows"] == 0:
        raise sources.SourceError(f"no files found in {', '.join(cfg.sources)}")
    identity = run.record.data["identity"]
    if run.previous_inputs and run.previous_inputs != finished["fingerprint"]:
        _logger.warning("the listing changed since the stopped scan after its committed shards; new files were scanned")
    identity.update(inputs=finished["fingerprint"], input_rows=finished["rows"])
    run.save(identity=identity, inputs=finished["rows"])
    return int(finished["rows"])


def _score(
    cfg: ScanConfig,
    *,
    detector: _Detector,
    plan: ClassifierPlan,
    ds: Any,
    registry: Any,
    carried: tuple[pa.Field, ...] | None,
    units_per_task: int,
) -> Any:
    """The Ray Data plan: input shards ─► read/decode tasks (``units_per_task`` listed units each, their rows
    handed on in chunks) ─► Classifier actor pool. ``carried``: the Parquet inputs' columns, as the driver
    found them."""
    decode_rows = batch_rows(cfg.decode_batch_size, detector.policy, cfg.framing)
    options = cpu_stage.PrepareOptions(
        policy=detector.policy,
        max_pixels=cfg.max_pixels,
        size=detector.ckpt.input_size,
        max_file_bytes=cfg.max_file_bytes,
        perturbation=cfg.perturbation,
        storage_options=cfg.storage_options,
        decode_later=cfg.gpu_decode,
        framing=cfg.framing,
        checks=cfg.checks,
        phash=cfg.phash,
        kinds=cfg.input_kinds,
        containers=dataclasses.replace(cfg.containers, carried=carried),
        chunk_rows=decode_rows,
        decode_timeout=cfg.watchdog_timeout,
        video_frames=cfg.video_frames,
        video_budget_s=cfg.video_budget_s,
    )
    ds = ds.map_batches(
        cpu_stage.prepare_stream,
        batch_size=min(units_per_task, decode_rows),
        batch_format="pyarrow",
        compute=TaskPoolStrategy(size=plan.decode_tasks),
        num_cpus=1,
        fn_kwargs={"options": options, "registry": registry},
    )
    return ds.map_batches(
        Classifier,
        batch_size=batch_rows(cfg.batch_size, detector.policy, cfg.framing),
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=plan.actors[0], max_size=plan.actors[1]),
        num_gpus=plan.num_gpus,
        num_cpus=plan.num_cpus,
        memory=CLASSIFIER_MEMORY,
        fn_constructor_kwargs={
            "checkpoint": ray.put(detector.data),
            "arch": cfg.arch,
            "ai_class_index": cfg.ai_class_index,
            "threshold": detector.threshold,
            "precision": cfg.precision,
            "cpu_threads": plan.cpu_threads,
            "decode_options": options if cfg.gpu_decode else None,
            "compile": cfg.compile,
            "entry": arch_registry.get(detector.ckpt.arch),
        },
    )
