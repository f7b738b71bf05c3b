"""``aidetect-batch train``: fine-tune a detector with Ray Train, fed by Ray Data.

    labelled listing ─► read + hash + decode + preprocess (the scan's CPU stage, Ray Data)
        ─► content-grouped stratified split (driver) ─► train / val datasets (materialised)
        ─► TorchTrainer (N workers, DDP, GPU or CPU) ─► model.pt (scan-ready checkpoint)

The images a model trains on are produced by the same function the scan
uses (:func:`aidetect_batch.scan.cpu_stage.prepare_batch`), at the checkpoint's
input size and preprocess policy, so training, evaluation and deployment see
identical pixels. Augmentations run on each worker, after that stage.

A video or an animated image (``--video-frames N``) is one file of the split,
like a still; after the split each of its sampled frames becomes a training
example with its label, and validation scores the file as the scan does (the
sigmoid of its frames' mean log-odds), so the checkpoint's threshold is chosen
on per-file scores.

The workers' loop is :mod:`aidetect_batch.train.worker`. Every epoch rank 0
reports a Ray Train checkpoint; Ray Train keeps the one with the lowest
validation loss (it becomes ``model.pt``) and the latest. A worker failure
restarts the group from the latest (``--max-failures``); a killed job
continues with ``--resume``, which reopens the same Ray Train run in
``OUT/ray_train``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray
import torch
from ray.data.extensions import ArrowTensorArray
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from aidetect_batch import runtime, schema
from aidetect_batch.detectors import checkpoints, policies, registry
from aidetect_batch.errors import ConfigError
from aidetect_batch.inputs.manifest import block_size
from aidetect_batch.scan.cpu_stage import PrepareOptions, pixels_of, prepare_batch
from aidetect_batch.storage import (
    claim_output,
    filesystem,
    is_remote,
    join,
    output_entries,
    write_json,
    write_parquet,
)
from aidetect_batch.train import datasets, metrics, plots, worker
from aidetect_batch.train.config import TrainConfig, parse_threshold_rule
from aidetect_batch.train.worker import train_window, window_boxes

_logger = logging.getLogger(__name__)

RUN_NAME = "run"
_OWN_ENTRIES = (
    schema.MODEL_FILE,
    schema.SPLITS_FILE,
    schema.DATASET_FILE,
    schema.HISTORY_FILE,
    "history.png",
    schema.RUN_FILE,
    schema.TRAIN_STATE_DIR,
)


@dataclasses.dataclass
class TrainResult:
    """What a finished training run produced.

    Attributes:
        run: The run record as written to ``_run.json``.
        dataset: The split dataset's description (``dataset.json``).
    """

    out: str
    checkpoint: str
    history: list[dict[str, Any]]
    val_metrics: dict[str, Any]
    threshold: float
    run: dict[str, Any]
    dataset: datasets.Description
    input_size: int
    use_gpu: bool


def select_split_batch(batch: pa.Table, split: str, assignment: Any, *, side: int, boxes: bool = False) -> pa.Table:
    """The training examples of the decoded rows assigned to ``split``: each view of a row (a still's one, each
    sampled frame of a video) is an ``image`` (``side``×``side``) with the row's float ``target`` (1 = AI) and
    its file's id (:func:`worker.file_id`), by which validation scores a video as the scan does; with ``boxes``
    (a native-pixel window), where the image's pixels sit in it (:func:`worker.window_boxes`).

    Frames are expanded only here, after each file's split was chosen, so a video's frames share its split.
    """
    if not isinstance(assignment, dict):
        assignment = ray.get(assignment)
    paths = batch.column(schema.PATH).to_pylist()
    keep = [i for i, p in enumerate(paths) if assignment.get(p) == split]
    rows = batch.take(pa.array(keep, pa.int64()))
    images, owner = _views(rows, side)
    index = pa.array(owner, pa.int64())
    labels, files = (rows.column(name).take(index) for name in (schema.TRUE_LABEL, schema.PATH))
    columns = {
        schema.IMAGE: images,
        "target": pc.cast(pc.equal(labels, schema.LABEL_AI), pa.float32()),
        worker.FILE_COLUMN: pa.array([worker.file_id(f) for f in files.to_pylist()], pa.int64()),
    }
    if boxes:
        heights, widths = (rows.column(name).take(index).to_pylist() for name in (schema.HEIGHT, schema.WIDTH))
        columns.update({name: pa.array(v, pa.int32()) for name, v in window_boxes(heights, widths, side).items()})
    return pa.table(columns)


def _views(rows: pa.Table, side: int) -> tuple[Any, np.ndarray]:
    """Every view of ``rows`` as one image column, and the row each view belongs to. Rows hold one ``image``
    each, or (when the CPU stage carried views: ``--video-frames``) a stack of them in ``_pixels``."""
    if schema.IMAGE in rows.column_names:
        return rows.column(schema.IMAGE), np.arange(rows.num_rows)
    stacks = [p if p.ndim == 4 else p[None] for p in pixels_of(rows)]
    owner = np.repeat(np.arange(len(stacks)), [len(p) for p in stacks])
    pixels = np.concatenate(stacks) if stacks else np.zeros((0, side, side, 3), np.uint8)
    return ArrowTensorArray.from_numpy(pixels), owner


def check_train_output(cfg: TrainConfig) -> None:
    """Refuse a non-empty OUT unless resuming or overwriting; clear only a run's own entries."""
    if cfg.resume:
        try:
            entries = output_entries(cfg.out, cfg.storage_options)
        except NotADirectoryError as exc:
            raise ConfigError(str(exc)) from None
        if schema.RUN_FILE not in entries:
            raise ConfigError(f"--resume: {cfg.out!r} holds no training run to continue")
        return
    claim_output(
        cfg.out,
        _OWN_ENTRIES,
        cfg.overwrite,
        storage_options=cfg.storage_options,
        keep_hint=", --resume to continue that run,",
    )


def _storage(cfg: TrainConfig) -> tuple[str, Any]:
    """Ray Train's storage path and filesystem for ``OUT/ray_train`` (local or remote through fsspec)."""
    uri = join(cfg.out, schema.TRAIN_STATE_DIR)
    if not is_remote(uri):
        return filesystem(uri)[1], None
    fs, path = filesystem(uri, cfg.storage_options)
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def choose_threshold(rule: str, y: np.ndarray, scores: np.ndarray) -> float:
    """The checkpoint's decision threshold from validation scores by ``--threshold-rule``."""
    kind, value = parse_threshold_rule(rule)
    if kind == "fixed":
        return value
    if kind == "fpr":
        chosen = metrics.threshold_for_fpr(y, scores, value)
        return 0.5 if math.isnan(chosen) else min(chosen, 1.0)
    return metrics.best_f1_threshold(y, scores)


@dataclasses.dataclass
class Prepared:
    """A decoded, split dataset: materialised train and val, the split table and its description."""

    train: Any
    val: Any
    splits: pa.Table
    described: datasets.Description


def prepare_splits(cfg: TrainConfig, size: int, table: pa.Table, *, listing: datasets.Listing) -> Prepared:
    """Decode the labelled set once on Ray Data, split it, and materialise train and val.

    The split table is written as ``splits.parquet`` and the description as ``dataset.json``.
    """
    table = table.take(np.random.default_rng(cfg.seed).permutation(table.num_rows))
    _logger.info("dataset %s: %d labelled files %s", cfg.dataset, table.num_rows, listing.labels)
    decoded = _decode_labelled(cfg, size, table)
    meta = _split_table(cfg, decoded, listing=listing)
    described = _describe(meta.table, listing=listing, record=meta.record)
    _log_balance(described)
    used = meta.table.filter(pc.is_valid(meta.table.column(schema.SPLIT)))
    assignment = ray.put(
        dict(zip(used.column(schema.PATH).to_pylist(), used.column(schema.SPLIT).to_pylist(), strict=True))
    )
    window = train_window(cfg.preprocess, size)
    parts = {}
    for name in ("train", "val"):
        parts[name] = decoded.map_batches(
            select_split_batch,
            batch_format="pyarrow",
            fn_kwargs={"split": name, "assignment": assignment, "side": window, "boxes": window > size},
        ).materialize()
    del decoded
    return Prepared(parts["train"], parts["val"], meta.table, described)


def _decode_labelled(cfg: TrainConfig, size: int, table: pa.Table) -> Any:
    """The labelled files read, decoded and preprocessed by the CPU stage, materialised once: the scan's
    ``resize`` view, or for the native-pixel policies the central window training crops are drawn from. A video
    or an animated image is one row holding its sampled frames, each framed as a still of its pixels would be."""
    rows = block_size(table.num_rows, int(ray.cluster_resources().get("CPU", 1)))
    blocks = [table.slice(i, rows) for i in range(0, table.num_rows, rows)]
    options = PrepareOptions(
        policy=policies.get(cfg.preprocess).train_view,
        max_pixels=cfg.max_pixels,
        size=train_window(cfg.preprocess, size),
        max_file_bytes=cfg.max_file_bytes,
        storage_options=cfg.storage_options,
        phash=cfg.near_duplicates,
        video_frames=cfg.video_frames,
    )
    return (
        ray.data.from_arrow(blocks)
        .map_batches(prepare_batch, batch_size=16, batch_format="pyarrow", num_cpus=1, fn_kwargs={"options": options})
        .materialize()
    )


@dataclasses.dataclass(frozen=True)
class _SplitTable:
    table: pa.Table
    record: dict[str, Any]


def _split_table(cfg: TrainConfig, decoded: Any, *, listing: datasets.Listing) -> _SplitTable:
    """One row per labelled file with its split, or a note saying why it is not used."""
    keep = [schema.PATH, schema.SOURCE, schema.TRUE_LABEL, schema.GROUP, schema.SPLIT, schema.SHA256]
    keep += [schema.STATUS, schema.ERROR, schema.WIDTH, schema.HEIGHT, schema.N_FRAMES, schema.PDQ, schema.PDQ_QUALITY]
    meta = pa.concat_tables(ray.get(decoded.select_columns(keep).to_arrow_refs())).sort_by(schema.PATH)
    split, record = datasets.assign_splits(meta, cfg.fractions, cfg.seed)
    meta = meta.set_column(meta.schema.get_field_index(schema.SPLIT), schema.SPLIT, split)
    notes = []
    for status, error, chosen in zip(
        meta.column(schema.STATUS).to_pylist(), meta.column(schema.ERROR).to_pylist(), split.to_pylist(), strict=True
    ):
        if chosen is not None:
            notes.append(None)
        elif status != schema.Status.OK.value:
            notes.append(f"not used: {status}: {error}")
        else:
            notes.append("not used: identical bytes carry both labels, or a copy or near-duplicate of a val/test image")
    meta = meta.drop_columns([schema.PDQ, schema.PDQ_QUALITY])
    return _SplitTable(meta.append_column("note", pa.array(notes, pa.string())), record)


def _describe(meta: pa.Table, *, listing: datasets.Listing, record: dict[str, Any]) -> datasets.Description:
    """The dataset's description; refuses an empty train or val split."""
    used = meta.filter(pc.is_valid(meta.column(schema.SPLIT)))
    described = datasets.Description(
        listing=listing,
        split=record,
        balance=datasets.balance(used),
        fingerprint=datasets.fingerprint(used),
        statuses=datasets.counts(meta.column(schema.STATUS)),
        not_used=meta.num_rows - used.num_rows,
        examples=datasets.balance(used, per_frame=True),
    )
    for name in ("train", "val"):
        if described.counts(name).images == 0:
            raise ConfigError(f"the {name} split is empty: the dataset is too small or has no usable images")
    return described


def _log_balance(described: datasets.Description) -> None:
    for name, entry in described.balance.items():
        _logger.info("%s: %d real, %d ai (%.1f%% ai)", name, entry.real, entry.ai, 100 * (entry.ai_fraction or 0))
        examples = described.examples_in(name)
        if examples.images != entry.images:
            _logger.info(
                "%s: %d real, %d ai examples with the videos' sampled frames", name, examples.real, examples.ai
            )
    if described.not_used:
        _logger.warning("%d file(s) not used for training; see the note column of splits.parquet", described.not_used)


def prepare(cfg: TrainConfig) -> Prepared:
    """List and decode ``cfg.dataset`` and split it once; reusable by several runs (hyperparameter trials)."""

    size = cfg.input_size or checkpoints.default_input_size(cfg.arch)
    table, listing = datasets.list_labelled(
        cfg.dataset, cfg.extensions, cfg.all_files, storage_options=cfg.storage_options
    )
    runtime.start_ray()
    return prepare_splits(cfg, size, table, listing=listing)


def run_train(cfg: TrainConfig, callbacks: list[Any] | None = None, prepared: Prepared | None = None) -> TrainResult:
    """Run a whole training: validate, split, train on Ray Train, write the scan-ready checkpoint.

    ``callbacks`` go to Ray Train's ``RunConfig`` (Ray Tune's report callback
    in a trial); ``prepared`` skips decoding and splitting when several runs
    share one dataset.

    Raises:
        ConfigError: bad arguments, a non-empty OUT, or a changed dataset on ``--resume``.
        sources.SourceError: a missing or unlabelled dataset.
        CheckpointError: ``--init`` weights that cannot be had (offline ImageNet, bad file).
        ray.train.TrainingFailedError: training failed (after ``--max-failures`` restarts).
    """
    started = datetime.now(timezone.utc)
    check_train_output(cfg)
    previous = runtime.RunRecord.previous(cfg.out, cfg.storage_options) if cfg.resume else None
    size = cfg.input_size or checkpoints.default_input_size(cfg.arch)
    torch.manual_seed(cfg.seed)
    initial, init_record = checkpoints.initial_model(
        cfg.arch, 1, cfg.resolved_init, input_size=size, storage_options=cfg.storage_options
    )
    listed = None
    if prepared is None:
        listed = datasets.list_labelled(cfg.dataset, cfg.extensions, cfg.all_files, storage_options=cfg.storage_options)
    resources = runtime.start_ray()
    if listed is not None:
        prepared = prepare_splits(cfg, size, listed[0], listing=listed[1])
    assert prepared is not None
    _check_same_dataset(previous, prepared.described)
    _write_dataset_files(cfg, prepared)
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else resources.get("GPU", 0) >= 1
    pos_weight = _pos_weight(cfg, prepared.described)
    run = runtime.RunRecord(cfg.out, {}, cfg.storage_options)
    run.save(
        status="running",
        config=cfg.to_json(),
        resolved={"input_size": size, "use_gpu": use_gpu, "init": init_record, "pos_weight": pos_weight},
        dataset=prepared.described.run_json(),
        versions=runtime.versions(),
        cluster_resources=dict(resources),
        started=started.isoformat(),
        resumed_from=previous.get("started") if previous else None,
    )
    loop_config = _loop_config(cfg, size=size, initial=initial, pos_weight=pos_weight, described=prepared.described)
    t0 = time.monotonic()
    result = _fit(_trainer(cfg, loop_config, prepared=prepared, use_gpu=use_gpu, callbacks=callbacks), cfg, run)
    wall = time.monotonic() - t0
    kept = _kept_epoch(result)
    threshold = choose_threshold(cfg.threshold_rule, kept.targets, kept.scores)
    val_metrics = _val_metrics(kept, threshold)
    checkpoint_uri = _save_model(
        cfg,
        kept,
        size=size,
        threshold=threshold,
        val_metrics=val_metrics,
        init_record=init_record,
        described=prepared.described,
    )
    write_parquet(join(cfg.out, schema.HISTORY_FILE), pa.Table.from_pylist(kept.history), cfg.storage_options)
    plots.history(join(cfg.out, "history.png"), kept.history, kept.epoch, storage_options=cfg.storage_options)
    _record_complete(cfg, run, kept, wall=wall, checkpoint=checkpoint_uri, threshold=threshold, val_metrics=val_metrics)
    return TrainResult(
        cfg.out,
        checkpoint_uri,
        kept.history,
        val_metrics,
        threshold,
        run.data,
        dataset=prepared.described,
        input_size=size,
        use_gpu=use_gpu,
    )


def _record_complete(
    cfg: TrainConfig,
    run: runtime.RunRecord,
    kept: _KeptEpoch,
    *,
    wall: float,
    checkpoint: str,
    threshold: float,
    val_metrics: dict[str, Any],
) -> None:
    """``_run.json`` of a finished run: the kept epoch, its threshold and metrics, and the throughput."""
    throughput = [h["images_per_s_per_worker"] for h in kept.history]
    run.save(
        status="complete",
        finished=datetime.now(timezone.utc).isoformat(),
        wall_seconds=wall,
        checkpoint=checkpoint,
        threshold=threshold,
        val_metrics=val_metrics,
        best_epoch=kept.epoch,
        epochs_run=len(kept.history),
        images_per_s_per_worker=float(np.median(throughput)) if throughput else None,
        workers=cfg.workers,
    )


def _val_metrics(kept: _KeptEpoch, threshold: float) -> dict[str, Any]:
    """The kept epoch's validation metrics: threshold-free ones, at the chosen threshold and at 0.5."""
    return {
        **metrics.summary(kept.targets, kept.scores),
        "at_threshold": metrics.at_threshold(kept.targets, kept.scores, threshold),
        "at_0.5": metrics.at_threshold(kept.targets, kept.scores, 0.5),
        "epoch": kept.epoch,
        "val_loss": kept.val_loss,
    }


def _fit(trainer: TorchTrainer, cfg: TrainConfig, run: runtime.RunRecord) -> Any:
    """``trainer.fit()``; on SIGINT/SIGTERM the run is recorded as stopped and the checkpoints of the
    finished epochs stay in ``OUT/ray_train``, where ``--resume`` continues from the latest.

    ``fit`` runs in a thread: in the main thread Ray Train replaces the SIGINT handler with its own,
    which aborts the run and exits the process with status 1 and no word of what was kept. The
    workers go on until Ray shuts down, which the CLI does right after its message."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread as it is
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(timeout=0.2)
    except (KeyboardInterrupt, runtime.Stopped) as exc:
        stopped = runtime.as_stopped(exc)
        run.save(status="stopped", stopped=datetime.now(timezone.utc).isoformat())
        stopped.kept = f"the checkpoints of finished epochs are kept in {join(cfg.out, schema.TRAIN_STATE_DIR)}"
        raise stopped from None
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _check_same_dataset(previous: dict[str, Any] | None, described: datasets.Description) -> None:
    if previous is not None and previous.get("dataset", {}).get("fingerprint") != described.fingerprint:
        raise ConfigError(
            "--resume: the dataset changed since this run started (its content fingerprint differs); "
            "start a new run in a new --out"
        )


def _write_dataset_files(cfg: TrainConfig, prepared: Prepared) -> None:
    fs, root = filesystem(cfg.out, cfg.storage_options)
    fs.makedirs(root, exist_ok=True)
    write_parquet(join(cfg.out, schema.SPLITS_FILE), prepared.splits, cfg.storage_options)
    write_json(join(cfg.out, schema.DATASET_FILE), prepared.described.to_json(), cfg.storage_options)


def _pos_weight(cfg: TrainConfig, described: datasets.Description) -> float | None:
    """``--class-weights``: the loss weight of the AI class, real over AI training examples (frames of videos)."""
    train = described.examples_in("train")
    return train.real / max(train.ai, 1) if cfg.class_weights else None


def _loop_config(
    cfg: TrainConfig, *, size: int, initial: Any, pos_weight: float | None, described: datasets.Description
) -> dict[str, Any]:
    """What every worker's loop reads (:class:`aidetect_batch.train.worker.LoopSettings`), in the dict
    Ray Train passes on."""
    entry = registry.get(cfg.arch)
    settings = worker.LoopSettings(
        train=cfg,
        entry=entry,
        mean=entry.mean,
        std=entry.std,
        input_size=size,
        window=train_window(cfg.preprocess, size),
        initial_weights=ray.put(initial.state_dict()),
        pos_weight=pos_weight,
        n_train=described.examples_in("train").images,
    )
    return {worker.SETTINGS_KEY: settings}


def _trainer(
    cfg: TrainConfig, loop_config: dict[str, Any], *, prepared: Prepared, use_gpu: bool, callbacks: list[Any] | None
) -> TorchTrainer:
    """The TorchTrainer of this run. Ray Train keeps the lowest-validation-loss checkpoint and the latest
    (which it never deletes), so the best epoch needs no second copy of the weights and a resume continues
    from the latest."""
    storage_path, storage_fs = _storage(cfg)
    return TorchTrainer(
        worker.train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=1,
                checkpoint_score_attribute=worker.SCORE_ATTRIBUTE,
                checkpoint_score_order="min",
            ),
            callbacks=callbacks,
        ),
        datasets={"train": prepared.train, "val": prepared.val},
        dataset_config=DataConfig(datasets_to_split="all"),
    )


@dataclasses.dataclass
class _KeptEpoch:
    """The epoch whose weights become ``model.pt``, and the history of the whole run."""

    epoch: int
    val_loss: float
    weights: dict[str, Any]
    scores: np.ndarray
    targets: np.ndarray
    history: list[dict[str, Any]]
    stopped_early: bool


def _kept_epoch(result: Any) -> _KeptEpoch:
    """The lowest-validation-loss checkpoint Ray Train kept (the earliest of equals), with the history of
    the latest one."""
    if result.checkpoint is None:
        raise RuntimeError("training reported no checkpoint")
    latest = _load_state(result.checkpoint)
    candidates = result.best_checkpoints or [(result.checkpoint, latest["history"][-1])]
    chosen, row = min(candidates, key=lambda c: (c[1][worker.SCORE_ATTRIBUTE], c[1]["epoch"]))
    best = latest if chosen.path == result.checkpoint.path else _load_state(chosen)
    return _KeptEpoch(
        epoch=int(row["epoch"]),
        val_loss=float(row[worker.SCORE_ATTRIBUTE]),
        weights=best["model"],
        scores=np.asarray(best["val_scores"], dtype=np.float64),
        targets=np.asarray(best["val_targets"]),
        history=latest["history"],
        stopped_early=bool(latest.get("stopped_early")),
    )


def _load_state(checkpoint: Any) -> dict[str, Any]:
    with checkpoint.as_directory() as directory:
        return torch.load(os.path.join(directory, worker.STATE_FILE), map_location="cpu", weights_only=True)


def _save_model(
    cfg: TrainConfig,
    kept: _KeptEpoch,
    *,
    size: int,
    threshold: float,
    val_metrics: dict[str, Any],
    init_record: dict[str, Any],
    described: datasets.Description,
) -> str:
    """Write the kept epoch as the scan-ready ``model.pt``; returns its URI."""
    final = checkpoints.conform(checkpoints.build_model(cfg.arch, 1, size), kept.weights)
    final.load_state_dict(kept.weights)
    uri = join(cfg.out, schema.MODEL_FILE)
    entry = registry.get(cfg.arch)
    checkpoints.save_checkpoint(
        uri,
        final,
        cfg.arch,
        num_logits=1,
        mean=entry.mean,
        std=entry.std,
        preprocess=cfg.preprocess,
        threshold=threshold,
        input_size=size,
        pruning=init_record.get("pruning"),
        info={
            "trained_with": "aidetect-batch train",
            "dataset": cfg.dataset,
            "data_fingerprint": described.fingerprint,
            "balance": described.balance_json(),
            "threshold_rule": cfg.threshold_rule,
            "val_metrics": val_metrics,
            "best_epoch": kept.epoch,
            "epochs_run": len(kept.history),
            "stopped_early": kept.stopped_early,
            "train_config": cfg.to_json(),
            "init": init_record,
            "versions": runtime.versions(),
        },
        storage_options=cfg.storage_options,
    )
    return uri
