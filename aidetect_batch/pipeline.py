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
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aidetect_batch import decode, perturb, preprocess, schema, sources
from aidetect_batch.config import ConfigError, ScanConfig
from aidetect_batch.storage import claim_output, filesystem, join, write_json

_logger = logging.getLogger(__name__)

MAX_BLOCK_ROWS = 256
MIN_BLOCK_ROWS = 16
# Memory reserved per Classifier actor (model, activations, one batch). It also keeps the
# stages apart: Ray Data fuses consecutive map stages whose remote args are equal, which
# would run decoding inside the Classifier actors and leave the remaining CPUs idle.
CLASSIFIER_MEMORY = 1 << 30
PROGRESS_EVERY_S = 10.0
_OWN_ENTRIES = (schema.SCORES_DIR, schema.REPORT_DIR, schema.RUN_FILE)


@dataclasses.dataclass
class ScanResult:
    """What a finished scan produced."""

    out: str
    files: list[str]
    summary: dict[str, Any]
    run: dict[str, Any]


def prepare_batch(
    batch: pa.Table,
    policy: str,
    max_pixels: int,
    storage_options: dict[str, Any],
    size: int = preprocess.CROP,
    perturbation: str | None = None,
) -> pa.Table:
    """CPU stage: read, hash, decode and preprocess each file; failures become statuses.

    Returns an Arrow table typed like the scores schema plus the uint8 ``image``
    tensor column (``size``×``size``×3), so nullable integers stay integers on
    the way to the sink. Columns of the listing other than ``path`` and
    ``source`` (labels, groups, manifest columns) pass through unchanged.
    ``perturbation`` (robustness sweep) is applied to the full-resolution
    decode before the policy.
    """
    from ray.data.extensions import ArrowTensorArray

    paths = batch.column(schema.PATH).to_pylist()
    n = len(paths)
    rows: dict[str, list[Any]] = {
        c: [None] * n
        for c in (
            schema.STATUS,
            schema.ERROR,
            schema.FORMAT,
            schema.MODE,
            schema.WIDTH,
            schema.HEIGHT,
            schema.FILE_SIZE,
            schema.SHA256,
            schema.T_READ_MS,
            schema.T_DECODE_MS,
        )
    }
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    change = perturb.parse(perturbation) if perturbation else None
    need = None if change else preprocess.needed_short_side(policy, size)
    for i, path in enumerate(paths):
        start = time.perf_counter()
        try:
            data = sources.read_file(path, storage_options)
        except OSError as exc:
            rows[schema.STATUS][i] = schema.Status.UNREADABLE.value
            rows[schema.ERROR][i] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        read_done = time.perf_counter()
        rows[schema.T_READ_MS][i] = (read_done - start) * 1000.0
        rows[schema.FILE_SIZE][i] = len(data)
        rows[schema.SHA256][i] = hashlib.sha256(data).hexdigest()
        result = decode.decode_image(data, max_pixels, need)
        for column in (schema.FORMAT, schema.MODE, schema.WIDTH, schema.HEIGHT):
            rows[column][i] = getattr(result, column)
        if result.status is schema.Status.OK:
            image = change.apply(result.image) if change else result.image
            images[i] = preprocess.preprocess_image(image, policy, size)
        rows[schema.STATUS][i] = result.status.value
        rows[schema.ERROR][i] = result.error
        rows[schema.T_DECODE_MS][i] = (time.perf_counter() - read_done) * 1000.0
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
    columns[schema.IMAGE] = ArrowTensorArray.from_numpy(images)
    return pa.table(columns)


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
    """Choose the Classifier pool's size and per-actor resources from the cluster.

    GPUs present: one GPU per actor, up to one actor per GPU. None: the pool runs
    on CPU and leaves at least one CPU for decode tasks.
    """
    cpus = int(resources.get("CPU", 1))
    gpus = int(resources.get("GPU", 0))
    if gpus > 0:
        actors = cfg.actors or (1, gpus)
        return {"device": "cuda", "actors": actors, "num_gpus": 1, "num_cpus": 1, "cpu_threads": None}
    per_actor = cfg.cpus_per_actor or max(1, cpus // 2)
    actors = cfg.actors or (1, max(1, (cpus - 1) // per_actor))
    if actors[0] * per_actor > cpus - 1:
        raise ConfigError(
            f"--actors {actors[0]},{actors[1]} x {per_actor} CPU(s) each leaves no CPU for decoding on a "
            f"cluster with {cpus} CPU(s); lower --actors or --cpus-per-actor"
        )
    return {"device": "cpu", "actors": actors, "num_gpus": 0, "num_cpus": per_actor, "cpu_threads": per_actor}


def block_size(total: int, cpus: int) -> int:
    """Paths per input block: at least 8 blocks per CPU for small scans, so work spreads and
    progress shows early; at most 256 so a huge listing does not become millions of objects."""
    return max(MIN_BLOCK_ROWS, min(MAX_BLOCK_ROWS, total // (8 * max(cpus, 1))))


class _Progress:
    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.ok = 0
        self.start = time.monotonic()
        self.last = self.start

    def update(self, table: pa.Table) -> None:
        self.done += table.num_rows
        self.ok += pc.sum(pc.equal(table.column(schema.STATUS), schema.Status.OK.value)).as_py() or 0
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else math.inf
            _logger.info(
                "progress: %d/%d files (%.1f%%), ok %d, failed %d, %.1f img/s, ETA %s",
                self.done,
                self.total,
                100.0 * self.done / max(self.total, 1),
                self.ok,
                self.done - self.ok,
                rate,
                f"{eta:.0f}s" if math.isfinite(eta) else "unknown",
            )


def run_scan(cfg: ScanConfig, listing: pa.Table | None = None) -> ScanResult:
    """Run a whole scan: validate, list, score on Ray, write scores, report and ``_run.json``.

    ``listing`` replaces listing ``cfg.sources``: a table with ``path``,
    ``source`` and any extra columns (labels, groups), which are written next
    to the scores. ``evaluate`` scores its labelled set this way.

    Raises:
        ConfigError: bad arguments or a non-empty OUT (before Ray starts).
        sources.SourceError: a missing source (before Ray starts).
        model.CheckpointError: an unreadable or mismatched checkpoint (before Ray starts).
    """
    import ray
    from ray.data import ActorPoolStrategy

    from aidetect_batch import model, report
    from aidetect_batch.classifier import Classifier
    from aidetect_batch.sinks import ScoreWriter

    started = datetime.now(timezone.utc)
    check_output(cfg)
    ckpt_bytes = model.read_checkpoint_bytes(cfg.checkpoint, cfg.storage_options)
    ckpt = model.parse_checkpoint(ckpt_bytes, arch=cfg.arch, ai_class_index=cfg.ai_class_index)
    ckpt.build()
    policy = cfg.preprocess or ckpt.preprocess or preprocess.DEFAULT_POLICY
    threshold = cfg.threshold if cfg.threshold is not None else ckpt.threshold
    if ckpt.info.get("untrained"):
        _logger.warning("checkpoint %s is UNTRAINED (random weights): its scores mean nothing", cfg.checkpoint)
    if listing is None:
        listing = sources.list_sources(cfg.sources, cfg.extensions, cfg.all_files, cfg.storage_options)
    extra_fields = [f for f in listing.schema if f.name not in (schema.PATH, schema.SOURCE)]
    clash = [f.name for f in extra_fields if f.name in schema.SCORE_COLUMNS or f.name == schema.IMAGE]
    if clash:
        raise ConfigError(f"listing columns {clash} clash with output columns; rename them")
    total = listing.num_rows
    _logger.info("listed %d files from %d source(s)", total, len(cfg.sources))

    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)
    resources = ray.cluster_resources()
    plan = plan_classifier(cfg, resources)
    run: dict[str, Any] = {
        "status": "running",
        "config": cfg.to_json(),
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
        "started": started.isoformat(),
    }
    run_uri = join(cfg.out, schema.RUN_FILE)
    fs, root = filesystem(cfg.out, cfg.storage_options)
    fs.makedirs(root, exist_ok=True)
    write_json(run_uri, run, cfg.storage_options)

    block_rows = block_size(total, int(resources.get("CPU", 1)))
    blocks = [listing.slice(i, block_rows) for i in range(0, total, block_rows)]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(
        prepare_batch,
        batch_size=cfg.decode_batch_size,
        batch_format="pyarrow",
        num_cpus=1,
        fn_kwargs={
            "policy": policy,
            "max_pixels": cfg.max_pixels,
            "storage_options": cfg.storage_options,
            "size": ckpt.input_size,
            "perturbation": cfg.perturbation,
        },
    )
    ds = ds.map_batches(
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
        },
    )

    writer = ScoreWriter(
        join(cfg.out, schema.SCORES_DIR),
        cfg.rows_per_file,
        cfg.storage_options,
        table_schema=pa.schema([*schema.SCORES_SCHEMA, *extra_fields]),
    )
    progress = _Progress(total)
    t0 = time.monotonic()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        writer.write(batch)
        progress.update(batch)
    files = writer.close()
    wall = time.monotonic() - t0
    if writer.rows_written != total:
        raise RuntimeError(f"invariant broken: {total} inputs but {writer.rows_written} rows written")

    extra = {
        "wall_seconds": wall,
        "images_per_s": total / wall if wall > 0 else None,
        "threshold": threshold,
        "preprocess": policy,
        "model_id": ckpt.model_id,
        "untrained_model": bool(ckpt.info.get("untrained")),
    }
    summary = report.write_report(cfg.out, cfg.group_depth, cfg.storage_options, extra)
    run.update(
        status="complete",
        finished=datetime.now(timezone.utc).isoformat(),
        wall_seconds=wall,
        outputs={"scores": files, "rows": writer.rows_written},
        counts={"status": summary["status_counts"], "label": summary["label_counts"]},
    )
    write_json(run_uri, run, cfg.storage_options)
    return ScanResult(cfg.out, files, summary, run)
