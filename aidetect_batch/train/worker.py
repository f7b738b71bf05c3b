"""The Ray Train worker loop of ``aidetect-batch train``: one data-parallel worker's epochs.

Every epoch each worker trains on its shard, the workers validate together
(logits gathered, so ROC-AUC covers the whole validation set, scored per
file: a video's frames as one score, as the scan gives it), and rank 0
reports a Ray Train checkpoint holding the weights, optimiser, scheduler,
history, early-stopping state and that epoch's validation scores. Ray Train
keeps the lowest-validation-loss checkpoint and the latest one
(``CheckpointConfig(checkpoint_score_attribute="val_loss")``): the latest
resumes a run, the best becomes ``model.pt``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import tempfile
import time
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torchvision.transforms.v2 as T
from torch import nn

from aidetect_batch import schema
from aidetect_batch.detectors import checkpoints, policies, registry
from aidetect_batch.train import metrics
from aidetect_batch.train.config import TrainConfig

_logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
PROGRESS_EVERY_S = 10.0
# What Ray Train keeps: the checkpoint with the lowest validation loss, and always the latest one.
SCORE_ATTRIBUTE = "val_loss"


# The native-pixel window a training crop is drawn from; see train_window.
BOX_COLUMNS = ("_box_top", "_box_left", "_box_height", "_box_width")
FULL_RESOLUTION = ("blur", "jpeg")
# Each example's file (file_id): validation scores the frames of one video together, as the scan does.
FILE_COLUMN = "_file"


def file_id(path: str) -> int:
    """A file's id among the examples, from its path: the same on every worker, and an integer, which a
    torch batch can carry where a string cannot."""
    return int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "little", signed=True)


def file_scores(files: list[int], logits: list[float], targets: list[int]) -> tuple[list[float], list[int]]:
    """Each file's P(AI) and target from its examples' logits, as the scan scores a row: the sigmoid of the
    mean log-odds of its frames (a still's is its one view's own score). Files come in order of first example."""
    if not files:
        return [], []
    _, first, which = np.unique(np.asarray(files, np.int64), return_index=True, return_inverse=True)
    mean = np.bincount(which, weights=np.asarray(logits, np.float64)) / np.bincount(which)
    order = np.argsort(first)
    scores = torch.sigmoid(torch.from_numpy(mean[order]).float()).tolist()
    return scores, [int(targets[i]) for i in first[order]]


def train_window(policy: str, size: int) -> int:
    """Side of the window of native pixels kept per training image, from which each epoch draws a random
    ``size`` crop (``resize``: the view itself). The margin is even, so the window's central crop is
    exactly the scan's ``center-crop`` view, padding included."""
    if policies.get(policy).resamples:
        return size
    return size + 2 * math.ceil(size / 4)


def window_boxes(heights: list[int | None], widths: list[int | None], window: int) -> dict[str, list[int]]:
    """Where each image's pixels sit in its ``window``-side view (centred and padded when smaller)."""
    boxes: dict[str, list[int]] = {name: [] for name in BOX_COLUMNS}
    for height, width in zip(heights, widths, strict=True):
        rows, cols = min(height or window, window), min(width or window, window)
        for name, value in zip(BOX_COLUMNS, ((window - rows) // 2, (window - cols) // 2, rows, cols), strict=True):
            boxes[name].append(value)
    return boxes


def native_crop(
    image: torch.Tensor, box: list[int], *, size: int, window: int, train: bool, full_res: Any = None
) -> torch.Tensor:
    """A ``size`` crop of an image's native pixels in its ``window`` view (CHW uint8, pixels at ``box``).

    Training draws a random crop, after ``full_res`` (blur, JPEG) acts on the whole image; validation
    takes the central crop, which equals the scan's ``center-crop`` view. An image smaller than
    ``size`` gives its padded central view either way.
    """
    top, left, rows, cols = box
    if train and full_res is not None:
        image = image.clone()
        pixels = (slice(None), slice(top, top + rows), slice(left, left + cols))
        image[pixels] = full_res(image[pixels])

    def offset(start: int, extent: int) -> int:
        if extent < size:
            return (window - size) // 2
        if train:
            return start + int(torch.randint(0, extent - size + 1, ()))
        return start + int(round((extent - size) / 2.0))

    y, x = offset(top, rows), offset(left, cols)
    return image[:, y : y + size, x : x + size]


def build_augment(names: tuple[str, ...], size: int) -> Any:
    """The training augmentations as a torchvision v2 transform on one uint8 CHW tensor.

    From the fine-tuning studies: horizontal flip, rotation ±10°, colour
    jitter 0.2, affine translation 5%. From the detector literature, in
    CNNDetection's order and ranges: Gaussian blur with sigma 0.1-3, then JPEG
    re-encoding at quality 30-100, each with probability 0.5. Under the
    native-pixel policies, blur and JPEG act on the full-resolution window
    before the crop (:class:`WorkerLoop`).
    """
    steps: list[Any] = []
    if "flip" in names:
        steps.append(T.RandomHorizontalFlip())
    if "rotate" in names:
        steps.append(T.RandomRotation(10))
    if "color" in names:
        steps.append(T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2))
    if "translate" in names:
        steps.append(T.RandomAffine(degrees=0, translate=(0.05, 0.05)))
    if "blur" in names:
        kernel = min(19, (size // 2) * 2 - 1)
        steps.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 3.0))], p=0.5))
    if "jpeg" in names:
        steps.append(T.RandomApply([T.JPEG((30, 100))], p=0.5))
    return T.Compose(steps) if steps else None


def _gather(values: list[Any], world: int) -> list[Any]:
    if world == 1:
        return values
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, values)
    return [v for part in parts for v in part]


def _sum(values: list[float], world: int) -> list[float]:
    if world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def val_row(loss: float, scores: list[float], targets: list[int]) -> dict[str, float]:
    """The validation columns of a history row."""
    y, s = np.asarray(targets), np.asarray(scores)
    return {
        "val_loss": loss,
        "val_accuracy": float(np.mean((s >= 0.5) == (y == 1))) if len(y) else math.nan,
        "val_auc": metrics.roc_auc(y, s),
        "val_ap": metrics.average_precision(y, s),
    }


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """What every worker's loop reads: the run's config and what the driver resolved for it (``train.trainer``).

    Attributes:
        train: The training run's config; the loop reads its optimiser, schedule, augmentation and sizes.
        entry: The registry entry of the architecture, registered again in each worker's process.
        mean: Normalisation mean the model is trained with; the saved checkpoint records the same.
        std: Normalisation standard deviation, likewise.
        input_size: The model's input side.
        window: Side of the native-pixel window training crops are drawn from (:func:`train_window`).
        initial_weights: A Ray ObjectRef to the starting state dict.
        pos_weight: The positive class's loss weight (``--class-weights``), else ``None``.
        n_train: Training examples (a video's sampled frames each), for the progress lines and the shuffle buffer.
    """

    train: TrainConfig
    entry: registry.Arch
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int
    window: int
    initial_weights: Any
    pos_weight: float | None
    n_train: int

    @property
    def arch(self) -> str:
        return self.entry.name


# Ray Train passes the loop a dict; the typed settings travel under this one key.
SETTINGS_KEY = "settings"


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker entry point: data-parallel fine-tuning with per-epoch checkpoints."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    WorkerLoop(config[SETTINGS_KEY]).run()


class WorkerLoop:
    """One worker's model, optimiser and data shards, and the epochs it runs."""

    def __init__(self, config: LoopSettings) -> None:
        registry.register(config.entry)
        self.config = config
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cpu":
            torch.set_num_threads(config.train.cpus_per_worker)
        self.net, self.plain = self._model()
        trainable = [p for p in self.net.parameters() if p.requires_grad]
        self.masks = [(p, p.detach() != 0) for p in trainable if p.dim() > 1] if config.train.keep_zeros else []
        optimiser_class = torch.optim.AdamW if config.train.optimizer == "adamw" else torch.optim.Adam
        self.optimiser = optimiser_class(trainable, lr=config.train.resolved_lr, weight_decay=config.train.weight_decay)
        self.scheduler = self._scheduler()
        pos_weight = torch.tensor([config.pos_weight], device=self.device) if config.pos_weight else None
        self.loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(config.mean, device=self.device).view(shape) * 255.0
        self.std = torch.tensor(config.std, device=self.device).view(shape) * 255.0
        self.size, self.window = config.input_size, config.window
        names = tuple(config.train.augment)
        self.full_res: Any = None
        if self.window > self.size:
            self.full_res = build_augment(tuple(n for n in names if n in FULL_RESOLUTION), self.size)
            names = tuple(n for n in names if n not in FULL_RESOLUTION)
        self.augment = build_augment(names, self.size)
        self.train_shard = ray.train.get_dataset_shard("train")
        self.val_shard = ray.train.get_dataset_shard("val")
        self.history: list[dict[str, Any]] = []
        self.best_loss: float | None = None
        self.bad_epochs = 0
        self.start_epoch = 0

    def _model(self) -> tuple[nn.Module, nn.Module]:
        """The network as trained (DDP-wrapped when several workers) and as saved (the bare module)."""
        weights = ray.get(self.config.initial_weights)
        net = checkpoints.conform(checkpoints.build_model(self.config.arch, 1, self.config.input_size), weights)
        net.load_state_dict(weights)
        if self.config.train.freeze_backbone:
            head = {id(p) for p in checkpoints.head_parameters(net, self.config.arch)}
            for p in net.parameters():
                p.requires_grad_(id(p) in head)
        net = ray.train.torch.prepare_model(net)
        return net, (net.module if hasattr(net, "module") else net)

    def _scheduler(self) -> Any:
        epochs = self.config.train.resolved_epochs
        if self.config.train.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimiser, T_max=epochs)
        if self.config.train.schedule == "step":
            return torch.optim.lr_scheduler.StepLR(self.optimiser, step_size=max(1, epochs // 3), gamma=0.1)
        return None

    def run(self) -> None:
        restored = self.restore()
        if self.config.train.validate_first and not restored:
            self.report_before_training()
        for epoch in range(self.start_epoch, self.config.train.resolved_epochs):
            row = self.train_epoch(epoch)
            scores, targets, val_loss = self.validate()
            row.update(val_row(val_loss, scores, targets))
            stop = self.update_early_stopping(row)
            self.log_epoch(row, stop)
            self.report(row, scores=scores, targets=targets, stopped_early=stop)
            if self.config.train.crash_after_epoch == epoch + 1 and not restored:
                raise RuntimeError(f"fault injection: crash after epoch {epoch + 1} (crash_after_epoch)")
            if stop:
                break

    def restore(self) -> bool:
        """Continue from the latest checkpoint when Ray Train hands one over (a restart or ``--resume``)."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return False
        with checkpoint.as_directory() as directory:
            state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
        self.plain.load_state_dict(state["model"])
        self.optimiser.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        self.start_epoch = state["epoch"] + 1
        self.history, self.best_loss, self.bad_epochs = state["history"], state["best_loss"], state["bad_epochs"]
        if self.rank == 0:
            _logger.info("resuming from the checkpoint of epoch %d", state["epoch"] + 1)
        return True

    def to_input(self, batch: dict[str, torch.Tensor], *, train: bool) -> torch.Tensor:
        """The model's normalised input: each image's training view (a random crop of native pixels, or the
        central one to validate), augmented when training."""
        x = batch[schema.IMAGE].permute(0, 3, 1, 2)
        if self.window > self.size:
            boxes = torch.stack([batch[name] for name in BOX_COLUMNS], 1).tolist()
            x = torch.stack([self.crop(img, box, train=train) for img, box in zip(x, boxes, strict=True)])
        if train and self.augment is not None:
            x = torch.stack([self.augment(img) for img in x])
        x = x.to(self.device, non_blocking=True).float()
        return (x - self.mean) / self.std

    def crop(self, image: torch.Tensor, box: list[int], *, train: bool) -> torch.Tensor:
        return native_crop(image, box, size=self.size, window=self.window, train=train, full_res=self.full_res)

    def validate(self) -> tuple[list[float], list[int], float]:
        """Per-file scores and targets of the whole validation set (examples gathered from every worker, a
        video's frames scored together: :func:`file_scores`) and its mean loss per example."""
        self.net.eval()
        logits_seen: list[float] = []
        targets: list[int] = []
        files: list[int] = []
        loss_sum = 0.0
        with torch.inference_mode():
            batches = self.val_shard.iter_torch_batches(batch_size=max(self.config.train.batch_size, 64), device="cpu")
            for batch in batches:
                logits = self.plain(self.to_input(batch, train=False))[:, 0]
                y = batch["target"].to(self.device)
                loss_sum += float(self.loss_fn(logits, y)) * len(y)
                logits_seen += logits.float().cpu().tolist()
                targets += batch["target"].int().tolist()
                files += batch[FILE_COLUMN].tolist()
        logits_seen, targets = _gather(logits_seen, self.world), _gather(targets, self.world)
        files = _gather(files, self.world)
        (loss_sum,) = _sum([loss_sum], self.world)
        scores, file_targets = file_scores(files, logits_seen, targets)
        return scores, file_targets, loss_sum / max(len(targets), 1)

    def report_before_training(self) -> None:
        """Epoch 0: the starting model validated and checkpointed, so it can win if training makes it worse."""
        scores, targets, val_loss = self.validate()
        nan = math.nan
        row = {"epoch": 0, "train_loss": nan, "train_accuracy": nan, **val_row(val_loss, scores, targets)}
        row.update(lr=nan, images_per_s_per_worker=nan, seconds=0.0)
        self.best_loss = val_loss
        if self.rank == 0:
            _logger.info(
                "before training: val loss %.4f acc %.3f AUC %.3f", val_loss, row["val_accuracy"], row["val_auc"]
            )
        self.report(row, scores=scores, targets=targets, stopped_early=False, epoch=-1)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over this worker's shard; the history row's training columns, summed over workers."""
        config = self.config
        torch.manual_seed(config.train.seed * 100_003 + epoch * 101 + self.rank)
        self.net.train()
        loss_sum, correct, seen, t0, last_log = 0.0, 0, 0, time.monotonic(), time.monotonic()
        for batch in self.train_shard.iter_torch_batches(
            batch_size=config.train.batch_size,
            device="cpu",
            local_shuffle_buffer_size=min(2048, max(config.n_train, 1)),
            local_shuffle_seed=config.train.seed + epoch,
        ):
            loss, hits, size = self.step(batch)
            loss_sum, correct, seen = loss_sum + loss * size, correct + hits, seen + size
            if self.rank == 0 and time.monotonic() - last_log >= PROGRESS_EVERY_S:
                last_log = time.monotonic()
                per_worker = max(1, math.ceil(config.n_train / self.world))
                _logger.info(
                    "epoch %d/%d: %d/~%d images on this worker, loss %.4f, %.1f img/s",
                    epoch + 1,
                    config.train.resolved_epochs,
                    seen,
                    per_worker,
                    loss_sum / seen,
                    seen / (last_log - t0),
                )
        seconds = time.monotonic() - t0
        if self.scheduler is not None:
            self.scheduler.step()
        loss_sum, correct, seen, seconds_sum = _sum([loss_sum, correct, seen, seconds], self.world)
        return {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            "lr": self.optimiser.param_groups[0]["lr"],
            "images_per_s_per_worker": seen / max(seconds_sum, 1e-9),
            "seconds": seconds_sum / self.world,
        }

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[float, int, int]:
        """One optimiser step: the batch's mean loss, correct predictions and size."""
        x = self.to_input(batch, train=True)
        y = batch["target"].to(self.device)
        logits = self.net(x)[:, 0]
        loss = self.loss_fn(logits, y)
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        self.optimiser.step()
        if self.masks:
            with torch.no_grad():
                for parameter, mask in self.masks:
                    parameter.mul_(mask)
        return float(loss.detach()), int(((logits.detach() >= 0) == (y >= 0.5)).sum()), len(y)

    def update_early_stopping(self, row: dict[str, Any]) -> bool:
        """Count epochs without a lower validation loss; True when patience has run out."""
        if self.best_loss is None or row["val_loss"] < self.best_loss - 1e-6:
            self.best_loss, self.bad_epochs = row["val_loss"], 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.config.train.resolved_patience

    def log_epoch(self, row: dict[str, Any], stop: bool) -> None:
        if self.rank != 0:
            return
        _logger.info(
            "epoch %d/%d: train loss %.4f acc %.3f | val loss %.4f acc %.3f AUC %.3f | %.1f img/s/worker%s",
            row["epoch"],
            self.config.train.resolved_epochs,
            row["train_loss"],
            row["train_accuracy"],
            row["val_loss"],
            row["val_accuracy"],
            row["val_auc"],
            row["images_per_s_per_worker"],
            f" | early stop: no better val loss for {self.bad_epochs} epochs" if stop else "",
        )

    def report(
        self,
        row: dict[str, Any],
        *,
        scores: list[float],
        targets: list[int],
        stopped_early: bool,
        epoch: int | None = None,
    ) -> None:
        """Add ``row`` to the history and report it with rank 0's checkpoint of this epoch."""
        self.history.append(row)
        state = {
            "epoch": row["epoch"] - 1 if epoch is None else epoch,
            "model": self.plain.state_dict(),
            "optimizer": self.optimiser.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "history": self.history,
            "best_loss": self.best_loss,
            "bad_epochs": self.bad_epochs,
            "stopped_early": stopped_early,
            "val_scores": scores,
            "val_targets": targets,
        }
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if self.rank == 0:
                torch.save(state, os.path.join(directory, STATE_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(dict(row), checkpoint=checkpoint)
