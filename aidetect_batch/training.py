"""``aidetect-batch train``: fine-tune a detector with Ray Train, fed by Ray Data.

    labelled listing ─► read + hash + decode + preprocess (the scan's CPU stage, Ray Data)
        ─► content-grouped stratified split (driver) ─► train / val datasets (materialised)
        ─► TorchTrainer (N workers, DDP, GPU or CPU) ─► model.pt (scan-ready checkpoint)

The images a model trains on are produced by the same function the scan
uses (:func:`aidetect_batch.prepare.prepare_batch`), at the checkpoint's
input size and preprocess policy, so training, evaluation and deployment see
identical pixels. Augmentations run on each worker, after that stage.

Every epoch each worker reports train/val loss, accuracy and validation
ROC-AUC, and rank 0 saves a Ray Train checkpoint (weights, optimiser,
scheduler, early-stopping state, history). A worker failure restarts the
group from it (``--max-failures``); a killed job continues with ``--resume``,
which reopens the same Ray Train run in ``OUT/ray_train``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import tempfile
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aidetect_batch import datasets, metrics, model, plots, runtime, schema
from aidetect_batch.config import ConfigError, TrainConfig, parse_threshold_rule
from aidetect_batch.inputs import block_size
from aidetect_batch.prepare import PrepareOptions, prepare_batch
from aidetect_batch.storage import (
    claim_output,
    filesystem,
    is_remote,
    join,
    output_entries,
    read_json,
    write_json,
    write_parquet,
)

_logger = logging.getLogger(__name__)

RUN_NAME = "run"
STATE_FILE = "state.pt"
PROGRESS_EVERY_S = 10.0
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
    """What a finished training run produced."""

    out: str
    checkpoint: str
    history: list[dict[str, Any]]
    val_metrics: dict[str, Any]
    threshold: float
    run: dict[str, Any]


def build_augment(names: tuple[str, ...], size: int) -> Any:
    """The training augmentations as a torchvision v2 transform on one uint8 CHW tensor.

    From the fine-tuning studies: horizontal flip, rotation ±10°, colour
    jitter 0.2, affine translation 5%. From the detector literature
    (CNNDetection's blur+JPEG, each with probability 0.5): JPEG re-encoding at
    quality 30-100 and Gaussian blur with sigma 0.1-3.
    """
    import torchvision.transforms.v2 as T

    steps: list[Any] = []
    if "flip" in names:
        steps.append(T.RandomHorizontalFlip())
    if "rotate" in names:
        steps.append(T.RandomRotation(10))
    if "color" in names:
        steps.append(T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2))
    if "translate" in names:
        steps.append(T.RandomAffine(degrees=0, translate=(0.05, 0.05)))
    if "jpeg" in names:
        steps.append(T.RandomApply([T.JPEG((30, 100))], p=0.5))
    if "blur" in names:
        kernel = min(19, (size // 2) * 2 - 1)
        steps.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 3.0))], p=0.5))
    return T.Compose(steps) if steps else None


def select_split_batch(batch: pa.Table, split: str, assignment: Any) -> pa.Table:
    """Keep the decoded rows assigned to ``split``, as ``image`` and float ``target`` (1 = AI)."""
    if not isinstance(assignment, dict):
        import ray

        assignment = ray.get(assignment)
    paths = batch.column(schema.PATH).to_pylist()
    keep = [i for i, p in enumerate(paths) if assignment.get(p) == split]
    rows = batch.take(pa.array(keep, pa.int64()))
    target = pc.cast(pc.equal(rows.column(schema.TRUE_LABEL), schema.LABEL_AI), pa.float32())
    return pa.table({schema.IMAGE: rows.column(schema.IMAGE), "target": target})


def _gather(values: list[Any], world: int) -> list[Any]:
    if world == 1:
        return values
    import torch.distributed as dist

    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, values)
    return [v for part in parts for v in part]


def _sum(values: list[float], world: int) -> list[float]:
    if world == 1:
        return values
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _val_row(loss: float, scores: list[float], targets: list[int]) -> dict[str, float]:
    y, s = np.asarray(targets), np.asarray(scores)
    return {
        "val_loss": loss,
        "val_accuracy": float(np.mean((s >= 0.5) == (y == 1))) if len(y) else math.nan,
        "val_auc": metrics.roc_auc(y, s),
        "val_ap": metrics.average_precision(y, s),
    }


def _best(epoch: int, loss: float, net: Any, *, scores: list[float], targets: list[int]) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "val_loss": loss,
        "state_dict": copy.deepcopy(net.state_dict()),
        "val_scores": scores,
        "val_targets": targets,
    }


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker loop: data-parallel fine-tuning with per-epoch checkpoints."""
    import ray
    import ray.train
    import ray.train.torch
    import torch
    from torch import nn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(config["cpus_per_worker"])

    initial_weights = ray.get(config["initial_weights"])
    net = model.conform(model.build_model(config["arch"], 1, config["input_size"]), initial_weights)
    net.load_state_dict(initial_weights)
    if config["freeze_backbone"]:
        head = {id(p) for p in model.head_parameters(net, config["arch"])}
        for p in net.parameters():
            p.requires_grad_(id(p) in head)
    net = ray.train.torch.prepare_model(net)
    plain = net.module if hasattr(net, "module") else net
    trainable = [p for p in net.parameters() if p.requires_grad]
    masks = [(p, p.detach() != 0) for p in trainable if p.dim() > 1] if config.get("keep_zeros") else []
    optimiser_class = torch.optim.AdamW if config["optimizer"] == "adamw" else torch.optim.Adam
    optimiser = optimiser_class(trainable, lr=config["lr"], weight_decay=config["weight_decay"])
    epochs = config["epochs"]
    if config["schedule"] == "cosine":
        scheduler: Any = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epochs)
    elif config["schedule"] == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimiser, step_size=max(1, epochs // 3), gamma=0.1)
    else:
        scheduler = None
    pos_weight = torch.tensor([config["pos_weight"]], device=device) if config["pos_weight"] else None
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    mean = torch.tensor(model.IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(model.IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255.0
    augment = build_augment(tuple(config["augment"]), config["input_size"])

    start_epoch, history, best, bad_epochs = 0, [], None, 0
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
        plain.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        start_epoch, history, best, bad_epochs = (
            state["epoch"] + 1,
            state["history"],
            state["best"],
            state["bad_epochs"],
        )
        if rank == 0:
            _logger.info("resuming from the checkpoint of epoch %d", state["epoch"] + 1)

    def to_input(images: torch.Tensor, train: bool) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2)
        if train and augment is not None:
            x = torch.stack([augment(img) for img in x])
        x = x.to(device, non_blocking=True).float()
        return (x - mean) / std

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    per_worker = max(1, math.ceil(config["n_train"] / world))

    def validate() -> tuple[list[float], list[int], float]:
        net.eval()
        scores, targets, loss_sum = [], [], 0.0
        with torch.inference_mode():
            for batch in val_shard.iter_torch_batches(batch_size=max(config["batch_size"], 64), device="cpu"):
                logits = plain(to_input(batch[schema.IMAGE], train=False))[:, 0]
                y = batch["target"].to(device)
                loss_sum += float(loss_fn(logits, y)) * len(y)
                scores += torch.sigmoid(logits.float()).cpu().tolist()
                targets += batch["target"].int().tolist()
        scores, targets = _gather(scores, world), _gather(targets, world)
        (loss_sum,) = _sum([loss_sum], world)
        return scores, targets, loss_sum / max(len(targets), 1)

    if config.get("validate_first") and restored is None:
        scores, targets, val_loss = validate()
        nan = math.nan
        history.append(
            {
                "epoch": 0,
                "train_loss": nan,
                "train_accuracy": nan,
                **_val_row(val_loss, scores, targets),
                "lr": nan,
                "images_per_s_per_worker": nan,
                "seconds": 0.0,
            }
        )
        best = _best(0, val_loss, plain, scores=scores, targets=targets)
        if rank == 0:
            _logger.info(
                "before training: val loss %.4f acc %.3f AUC %.3f",
                val_loss,
                history[0]["val_accuracy"],
                history[0]["val_auc"],
            )
    for epoch in range(start_epoch, epochs):
        torch.manual_seed(config["seed"] * 100_003 + epoch * 101 + rank)
        net.train()
        loss_sum, correct, seen, t0, last_log = 0.0, 0, 0, time.monotonic(), time.monotonic()
        for batch in train_shard.iter_torch_batches(
            batch_size=config["batch_size"],
            device="cpu",
            local_shuffle_buffer_size=min(2048, max(config["n_train"], 1)),
            local_shuffle_seed=config["seed"] + epoch,
        ):
            x = to_input(batch[schema.IMAGE], train=True)
            y = batch["target"].to(device)
            logits = net(x)[:, 0]
            loss = loss_fn(logits, y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if masks:
                with torch.no_grad():
                    for parameter, mask in masks:
                        parameter.mul_(mask)
            loss_sum += float(loss.detach()) * len(y)
            correct += int(((logits.detach() >= 0) == (y >= 0.5)).sum())
            seen += len(y)
            now = time.monotonic()
            if rank == 0 and now - last_log >= PROGRESS_EVERY_S:
                last_log = now
                _logger.info(
                    "epoch %d/%d: %d/~%d images on this worker, loss %.4f, %.1f img/s",
                    epoch + 1,
                    epochs,
                    seen,
                    per_worker,
                    loss_sum / seen,
                    seen / (now - t0),
                )
        train_seconds = time.monotonic() - t0
        if scheduler is not None:
            scheduler.step()

        scores, targets, val_loss = validate()
        loss_sum, correct, seen, train_seconds_sum = _sum([loss_sum, correct, seen, train_seconds], world)
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            **_val_row(val_loss, scores, targets),
            "lr": optimiser.param_groups[0]["lr"],
            "images_per_s_per_worker": seen / max(train_seconds_sum, 1e-9),
            "seconds": train_seconds_sum / world,
        }
        history.append(row)
        improved = best is None or row["val_loss"] < best["val_loss"] - 1e-6
        if improved:
            best = _best(epoch + 1, row["val_loss"], plain, scores=scores, targets=targets)
            bad_epochs = 0
        else:
            bad_epochs += 1
        stop = bad_epochs >= config["patience"]
        if rank == 0:
            _logger.info(
                "epoch %d/%d: train loss %.4f acc %.3f | val loss %.4f acc %.3f AUC %.3f | %.1f img/s/worker%s",
                epoch + 1,
                epochs,
                row["train_loss"],
                row["train_accuracy"],
                row["val_loss"],
                row["val_accuracy"],
                row["val_auc"],
                row["images_per_s_per_worker"],
                f" | early stop: no better val loss for {bad_epochs} epochs" if stop else "",
            )
        state = {
            "epoch": epoch,
            "model": plain.state_dict(),
            "optimizer": optimiser.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "history": history,
            "best": best,
            "bad_epochs": bad_epochs,
            "stopped_early": stop,
        }
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if rank == 0:
                torch.save(state, os.path.join(directory, STATE_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(dict(row), checkpoint=checkpoint)
        if config["crash_after_epoch"] == epoch + 1 and restored is None:
            raise RuntimeError(f"fault injection: crash after epoch {epoch + 1} (crash_after_epoch)")
        if stop:
            break


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
    import pyarrow.fs as pafs

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


def prepare_splits(
    cfg: TrainConfig, size: int, listing: pa.Table, *, described: dict[str, Any]
) -> tuple[Any, Any, pa.Table, dict[str, Any]]:
    """Decode the labelled set once on Ray Data, split it, and materialise train and val.

    Returns the train and val datasets, the per-file split table (written as
    ``splits.parquet``) and the dataset description (``dataset.json``).
    """
    import ray

    order = np.random.default_rng(cfg.seed).permutation(listing.num_rows)
    listing = listing.take(order)
    _logger.info("dataset %s: %d labelled files %s", cfg.dataset, listing.num_rows, described["labels"])
    rows = block_size(listing.num_rows, int(ray.cluster_resources().get("CPU", 1)))
    blocks = [listing.slice(i, rows) for i in range(0, listing.num_rows, rows)]
    prepared = (
        ray.data.from_arrow(blocks)
        .map_batches(
            prepare_batch,
            batch_size=16,
            batch_format="pyarrow",
            num_cpus=1,
            fn_kwargs={
                "options": PrepareOptions(
                    policy=cfg.preprocess,
                    max_pixels=cfg.max_pixels,
                    size=size,
                    max_file_bytes=cfg.max_file_bytes,
                    storage_options=cfg.storage_options,
                )
            },
        )
        .materialize()
    )
    keep = [schema.PATH, schema.SOURCE, schema.TRUE_LABEL, schema.GROUP, schema.SPLIT, schema.SHA256]
    keep += [schema.STATUS, schema.ERROR, schema.WIDTH, schema.HEIGHT]
    meta = pa.concat_tables(ray.get(prepared.select_columns(keep).to_arrow_refs()))
    meta = meta.sort_by(schema.PATH)
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
            notes.append("not used: identical bytes carry both labels, or a copy of a val/test image")
    meta = meta.append_column("note", pa.array(notes, pa.string()))
    used = meta.filter(pc.is_valid(meta.column(schema.SPLIT)))
    described.update(
        split=record,
        balance=datasets.balance(used),
        fingerprint=datasets.fingerprint(used),
        statuses=datasets.counts(meta.column(schema.STATUS)),
        not_used=meta.num_rows - used.num_rows,
    )
    counts = described["balance"]
    for name in ("train", "val"):
        if counts.get(name, {}).get("real", 0) + counts.get(name, {}).get("ai", 0) == 0:
            raise ConfigError(f"the {name} split is empty: the dataset is too small or has no usable images")
    for name, entry in counts.items():
        _logger.info(
            "%s: %d real, %d ai (%.1f%% ai)", name, entry["real"], entry["ai"], 100 * (entry["ai_fraction"] or 0)
        )
    if described["not_used"]:
        _logger.warning(
            "%d file(s) not used for training; see the note column of splits.parquet", described["not_used"]
        )
    assignment = ray.put(
        dict(zip(used.column(schema.PATH).to_pylist(), used.column(schema.SPLIT).to_pylist(), strict=True))
    )
    parts = {}
    for name in ("train", "val"):
        parts[name] = prepared.map_batches(
            select_split_batch, batch_format="pyarrow", fn_kwargs={"split": name, "assignment": assignment}
        ).materialize()
    del prepared
    return parts["train"], parts["val"], meta, described


@dataclasses.dataclass
class Prepared:
    """A decoded, split dataset: materialised train and val, the split table and its description."""

    train: Any
    val: Any
    splits: pa.Table
    described: dict[str, Any]


def prepare(cfg: TrainConfig) -> Prepared:
    """List and decode ``cfg.dataset`` and split it once; reusable by several runs (hyperparameter trials)."""

    size = cfg.input_size or model.default_input_size(cfg.arch)
    listing, described = datasets.list_labelled(cfg.dataset, (), cfg.all_files, storage_options=cfg.storage_options)
    runtime.start_ray()
    return Prepared(*prepare_splits(cfg, size, listing, described=described))


def run_train(cfg: TrainConfig, callbacks: list[Any] | None = None, prepared: Prepared | None = None) -> TrainResult:
    """Run a whole training: validate, split, train on Ray Train, write the scan-ready checkpoint.

    ``callbacks`` go to Ray Train's ``RunConfig`` (Ray Tune's report callback
    in a trial); ``prepared`` skips decoding and splitting when several runs
    share one dataset.

    Raises:
        ConfigError: bad arguments, a non-empty OUT, or a changed dataset on ``--resume``.
        sources.SourceError: a missing or unlabelled dataset.
        model.CheckpointError: ``--init`` weights that cannot be had (offline ImageNet, bad file).
        ray.train.TrainingFailedError: training failed (after ``--max-failures`` restarts).
    """
    import ray
    import torch
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = datetime.now(timezone.utc)
    check_train_output(cfg)
    run_uri = join(cfg.out, schema.RUN_FILE)
    previous = read_json(run_uri, cfg.storage_options) if cfg.resume else None
    size = cfg.input_size or model.default_input_size(cfg.arch)
    torch.manual_seed(cfg.seed)
    initial, init_record = model.initial_model(
        cfg.arch, 1, cfg.resolved_init, input_size=size, storage_options=cfg.storage_options
    )
    if prepared is None:
        listing, described = datasets.list_labelled(cfg.dataset, (), cfg.all_files, storage_options=cfg.storage_options)

    resources = runtime.start_ray()
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else resources.get("GPU", 0) >= 1
    if prepared is None:
        prepared = Prepared(*prepare_splits(cfg, size, listing, described=described))
    train_ds, val_ds, split_table, described = prepared.train, prepared.val, prepared.splits, prepared.described
    if previous is not None and previous.get("dataset", {}).get("fingerprint") != described["fingerprint"]:
        raise ConfigError(
            "--resume: the dataset changed since this run started (its content fingerprint differs); "
            "start a new run in a new --out"
        )
    fs, root = filesystem(cfg.out, cfg.storage_options)
    fs.makedirs(root, exist_ok=True)
    write_parquet(join(cfg.out, schema.SPLITS_FILE), split_table, cfg.storage_options)
    write_json(join(cfg.out, schema.DATASET_FILE), described, cfg.storage_options)
    n_train = described["balance"]["train"]["real"] + described["balance"]["train"]["ai"]
    train_counts = described["balance"]["train"]
    pos_weight = train_counts["real"] / max(train_counts["ai"], 1) if cfg.class_weights else None
    run: dict[str, Any] = {
        "status": "running",
        "config": cfg.to_json(),
        "resolved": {"input_size": size, "use_gpu": use_gpu, "init": init_record, "pos_weight": pos_weight},
        "dataset": {k: described[k] for k in ("fingerprint", "balance", "split", "statuses", "not_used")},
        "versions": runtime.versions(),
        "cluster_resources": dict(resources),
        "started": started.isoformat(),
        "resumed_from": previous.get("started") if previous else None,
    }
    write_json(run_uri, run, cfg.storage_options)

    storage_path, storage_fs = _storage(cfg)
    loop_config = {
        "arch": cfg.arch,
        "input_size": size,
        "initial_weights": ray.put(initial.state_dict()),
        "freeze_backbone": cfg.freeze_backbone,
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "schedule": cfg.schedule,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "patience": cfg.patience,
        "seed": cfg.seed,
        "augment": list(cfg.augment),
        "pos_weight": pos_weight,
        "n_train": n_train,
        "cpus_per_worker": cfg.cpus_per_worker,
        "crash_after_epoch": cfg.crash_after_epoch,
        "validate_first": cfg.validate_first,
        "keep_zeros": cfg.keep_zeros,
    }
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        datasets={"train": train_ds, "val": val_ds},
        dataset_config=DataConfig(datasets_to_split="all"),
    )
    t0 = time.monotonic()
    result = trainer.fit()
    wall = time.monotonic() - t0
    if result.checkpoint is None:
        raise RuntimeError("training reported no checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
    best = state["best"]
    y_val, s_val = np.asarray(best["val_targets"]), np.asarray(best["val_scores"], dtype=np.float64)
    threshold = choose_threshold(cfg.threshold_rule, y_val, s_val)
    val_metrics = {
        **metrics.summary(y_val, s_val),
        "at_threshold": metrics.at_threshold(y_val, s_val, threshold),
        "at_0.5": metrics.at_threshold(y_val, s_val, 0.5),
        "epoch": best["epoch"],
        "val_loss": best["val_loss"],
    }
    final = model.conform(model.build_model(cfg.arch, 1, size), best["state_dict"])
    final.load_state_dict(best["state_dict"])
    history = state["history"]
    checkpoint_uri = join(cfg.out, schema.MODEL_FILE)
    model.save_checkpoint(
        checkpoint_uri,
        final,
        cfg.arch,
        num_logits=1,
        preprocess=cfg.preprocess,
        threshold=threshold,
        input_size=size,
        pruning=init_record.get("pruning"),
        info={
            "trained_with": "aidetect-batch train",
            "dataset": cfg.dataset,
            "data_fingerprint": described["fingerprint"],
            "balance": described["balance"],
            "threshold_rule": cfg.threshold_rule,
            "val_metrics": val_metrics,
            "best_epoch": best["epoch"],
            "epochs_run": len(history),
            "stopped_early": bool(state.get("stopped_early")),
            "train_config": cfg.to_json(),
            "init": init_record,
            "versions": runtime.versions(),
        },
        storage_options=cfg.storage_options,
    )
    write_parquet(join(cfg.out, schema.HISTORY_FILE), pa.Table.from_pylist(history), cfg.storage_options)

    plots.history(join(cfg.out, "history.png"), history, best["epoch"], storage_options=cfg.storage_options)
    throughput = [h["images_per_s_per_worker"] for h in history]
    run.update(
        status="complete",
        finished=datetime.now(timezone.utc).isoformat(),
        wall_seconds=wall,
        checkpoint=checkpoint_uri,
        threshold=threshold,
        val_metrics=val_metrics,
        best_epoch=best["epoch"],
        epochs_run=len(history),
        images_per_s_per_worker=float(np.median(throughput)) if throughput else None,
        workers=cfg.workers,
    )
    write_json(run_uri, run, cfg.storage_options)
    return TrainResult(cfg.out, checkpoint_uri, history, val_metrics, threshold, run)
