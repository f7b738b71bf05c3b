"""The configs of ``train``, ``evaluate`` and ``prune``, and the training facts their options name.

Every option is declared once, on its field (:func:`aidetect_batch.config.option`); the command line
is derived from the fields.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from aidetect_batch.config import (
    DEFAULT_MAX_FILE_MB,
    DEFAULT_MAX_PIXELS,
    Flag,
    JsonConfig,
    check_at_least,
    check_fraction,
    check_max_file_mb,
    comma_list,
    internal,
    option,
    show_comma_list,
    storage_options_field,
)
from aidetect_batch.detectors import registry
from aidetect_batch.detectors.policies import DEFAULT_TRAIN_POLICY, POLICIES
from aidetect_batch.errors import ConfigError
from aidetect_batch.inputs.sources import DEFAULT_EXTENSIONS
from aidetect_batch.media import perturb, video
from aidetect_batch.scan.config import ScanOptions, arch_field, check_detector, media_extensions

AUGMENTATIONS = ("flip", "rotate", "color", "translate", "jpeg", "blur")
# Flip moves pixels without resampling them; rotation and sub-pixel translation resample every image,
# and blur and JPEG wipe the traces out of the very crops they touch, so they are opt-in.
DEFAULT_AUGMENT = ("flip",)
# (from scratch, fine-tuning): a from-scratch network needs a larger step and more epochs.
DEFAULT_LR = (1e-3, 1e-4)
DEFAULT_EPOCHS = (30, 5)
DEFAULT_PATIENCE = (5, 3)
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("cosine", "step", "none")
SPLITS = ("train", "val", "test", "all")
PRUNE_METHODS = ("structured", "unstructured")


def parse_threshold_rule(rule: str) -> tuple[str, float]:
    """``f1`` → best F1 on validation; ``fpr:0.01`` → 1% of real images flagged; ``0.5`` → fixed."""
    if rule == "f1":
        return "f1", math.nan
    if rule.startswith("fpr:"):
        try:
            value = float(rule[4:])
        except ValueError:
            value = -1.0
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"--threshold-rule fpr:X needs 0 <= X < 1, not {rule!r}")
        return "fpr", value
    try:
        value = float(rule)
    except ValueError:
        raise ConfigError(f"--threshold-rule is f1, fpr:RATE or a number in [0, 1], not {rule!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"--threshold-rule {rule}: a fixed threshold lies in [0, 1]")
    return "fixed", value


def parse_augment(text: str) -> tuple[str, ...]:
    """``--augment``: a comma list, or ``none``."""
    return () if text.strip().lower() == "none" else comma_list(str)(text)


def parse_fractions(text: str) -> tuple[float, float, float]:
    """``--split``: three train,val,test fractions."""
    try:
        parts = comma_list(float)(text)
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise ConfigError(f"--split takes three fractions like 0.7225,0.1275,0.15, not {text!r}")
    return parts  # type: ignore[return-value]


def parse_amounts(text: str) -> tuple[float, ...]:
    """``--amount``: fractions to prune."""
    try:
        return comma_list(float)(text)
    except ValueError:
        raise ConfigError(f"--amount takes fractions like 0.1,0.2,0.3,0.4, not {text!r}") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainOptions(JsonConfig):
    """The training settings that ``prune`` passes through to its fine-tuning runs.

    Attributes:
        workers: Ray Train workers (data-parallel replicas).
    """

    workers: int = option(1, help="Ray Train workers (data parallel)")

    def __post_init__(self) -> None:
        self.validate()

    def as_kwargs(self) -> dict[str, Any]:
        """These options as keyword arguments of :class:`TrainConfig`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainOptions)}

    def validate(self) -> None:
        """Check value ranges; raises :class:`ConfigError` with the flag to fix."""
        check_at_least(self, ("workers",))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(TrainOptions):
    """Everything one training run needs; defaults follow the EfficientNet-B0 study.

    Attributes (beyond :class:`TrainOptions`):
        dataset: Labelled folder tree or manifest, local or ``s3://``.
        out: Output directory (checkpoint, splits, history, Ray Train state).
        arch: Detector architecture.
        init: ``imagenet`` (torchvision weights), ``none``, or a weights file; ``None`` means
            ``imagenet`` where torchvision has ImageNet weights, else ``none``.
        freeze_backbone: Train only the classification head (the studies' ablation).
        input_size: Model input side; ``None`` means the architecture's (its registry entry's ``input_size``).
        preprocess: Preprocess policy, stored in the checkpoint and used by every later scan. Under
            ``center-crop``, ``tiles`` and ``native`` training sees random crops of native pixels.
        augment: Training augmentations, a subset of :data:`AUGMENTATIONS`; the default (flip) never resamples.
        optimizer: ``adam`` or ``adamw``.
        lr: Learning rate; ``None``: 1e-3 from scratch (``--init none``), 1e-4 when fine-tuning.
        weight_decay: Weight decay (L2 for Adam, decoupled for AdamW).
        schedule: ``cosine`` (to 0 over the epochs), ``step`` (×0.1 every third of the epochs) or ``none``.
        epochs: Maximum epochs; ``None``: 30 from scratch, 5 when fine-tuning.
        batch_size: Images per optimisation step per worker.
        patience: Stop after this many epochs without a lower validation loss; ``None``: 5 from scratch, 3
            when fine-tuning.
        seed: Seed of splits, initialisation, shuffling and augmentation.
        fractions: Train/val/test fractions when the dataset has no split folders (``--split``).
        class_weights: Weight the loss by inverse class frequency.
        threshold_rule: How the checkpoint's threshold is chosen on validation (see
            :func:`parse_threshold_rule`).
        use_gpu: One GPU per worker; ``None`` means when the cluster has GPUs.
        cpus_per_worker: CPUs per training worker.
        max_failures: Worker-group restarts from the last epoch's checkpoint before failing.
        resume: Continue a stopped run in ``out`` from its last epoch.
        overwrite: Replace a previous run in ``out``.
        near_duplicates: Keep every near-duplicate group (PDQ) in one split, not only identical bytes.
        video_frames: Frames sampled from each video or animated image (``--video-frames``), each a training
            example labelled as its file; 0 leaves videos out and reads an animation's first frame.
        crash_after_epoch: Fault injection for tests: fail the first attempt after this epoch.
        validate_first: Measure the initial model on validation as epoch 0 (pruning's "before").
        keep_zeros: Keep weights that start at zero at zero (fine-tuning an unstructured-pruned model).
    """

    dataset: str = option(
        positional=True, help="labelled folder tree (real/ + ai/ or fake/, ...) or manifest, local or s3://"
    )
    out: str = option(help="output directory for model.pt, splits, history")
    arch: str = arch_field(registry.DEFAULT_ARCH, help="detector architecture (default: %(default)s)")
    init: str | None = option(
        None, help="imagenet (torchvision weights), none, or a weights file (default: imagenet where available)"
    )
    freeze_backbone: bool = option(False, help="train only the classification head")
    input_size: int | None = option(None, help="model input side (default: the architecture's, e.g. 224)")
    preprocess: str = option(
        DEFAULT_TRAIN_POLICY,
        choices=POLICIES,
        help="stored in the checkpoint; center-crop, tiles and native train on random crops of native pixels "
        "(default: %(default)s)",
    )
    augment: tuple[str, ...] = option(
        DEFAULT_AUGMENT,
        parse=parse_augment,
        show=lambda values: show_comma_list(values) or "none",
        help=f"comma list from {','.join(AUGMENTATIONS)}, or none (default: %(default)s; rotate and translate "
        "resample pixels, blur and jpeg act on the full-resolution image before the crop)",
    )
    optimizer: str = option("adam", choices=OPTIMIZERS, help="(default: %(default)s)")
    lr: float | None = option(None, help="default: 1e-3 from scratch (--init none), 1e-4 when fine-tuning")
    weight_decay: float = option(1e-5, help="(default: %(default)s)")
    schedule: str = option("cosine", choices=SCHEDULES, help="(default: %(default)s)")
    epochs: int | None = option(None, help="default: 30 from scratch, 5 when fine-tuning")
    batch_size: int = option(32, help="images per step per worker")
    patience: int | None = option(
        None, help="early stopping: epochs without lower val loss (default: 5 from scratch, else 3)"
    )
    seed: int = option(0, help="seed of splits, initialisation, shuffling and augmentation")
    fractions: tuple[float, float, float] = option(
        (0.7225, 0.1275, 0.15),
        flag="--split",
        parse=parse_fractions,
        show=show_comma_list,
        help="train,val,test fractions when the dataset has no split folders",
    )
    class_weights: bool = option(False, help="weight the loss by inverse class frequency")
    threshold_rule: str = option("f1", help="checkpoint threshold on validation: f1, fpr:RATE, or a number")
    use_gpu: bool | None = option(
        None,
        const=(
            Flag("--gpu", True, "one GPU per worker"),
            Flag("--cpu", False, "train on CPU even if GPUs exist"),
        ),
    )
    cpus_per_worker: int = option(1, help="CPUs per training worker")
    max_failures: int = option(0, help="worker-group restarts from the last epoch")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, help="decompression-bomb guard")
    max_file_mb: float = option(
        DEFAULT_MAX_FILE_MB, help="files larger than this are never read (default: %(default)s)"
    )
    all_files: bool = option(False, help="use every file, not only image extensions")
    video_frames: int = option(
        video.DEFAULT_FRAMES,
        help="frames sampled evenly over each video or animated GIF/WebP/APNG, each a training example with the "
        "file's label (the file stays in one split); 0 leaves videos out (default: %(default)s)",
    )
    storage_options: dict[str, Any] = storage_options_field()
    resume: bool = option(False, help="continue the stopped run in --out")
    overwrite: bool = option(False, help="replace a previous run in --out")
    near_duplicates: bool = option(True, help="split by identical bytes only, not also by PDQ near-duplicate groups")
    crash_after_epoch: int | None = internal(None, "fault injection for tests")
    validate_first: bool = internal(False, "set by prune: validation before fine-tuning")
    keep_zeros: bool = internal(False, "set by prune: fine-tuning an unstructured-pruned model")

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 2**20)

    @property
    def extensions(self) -> tuple[str, ...]:
        """The extensions the dataset's folders are listed with: the images', and the videos' as the scan's."""
        return media_extensions(DEFAULT_EXTENSIONS, self.video_frames)

    @property
    def resolved_init(self) -> str:
        if self.init is not None:
            return self.init
        return "imagenet" if registry.get(self.arch).imagenet else "none"

    @property
    def from_scratch(self) -> bool:
        return self.resolved_init == "none"

    def _by_init(self, given: Any, defaults: tuple[Any, Any]) -> Any:
        return given if given is not None else defaults[0 if self.from_scratch else 1]

    @property
    def resolved_lr(self) -> float:
        return float(self._by_init(self.lr, DEFAULT_LR))

    @property
    def resolved_epochs(self) -> int:
        return int(self._by_init(self.epochs, DEFAULT_EPOCHS))

    @property
    def resolved_patience(self) -> int:
        return int(self._by_init(self.patience, DEFAULT_PATIENCE))

    def validate(self) -> None:
        """Check names and ranges; raises :class:`ConfigError` with the flag to fix."""
        super().validate()
        if not self.dataset:
            raise ConfigError("name a labelled dataset: a folder with real/ and ai/ (or fake/) or a manifest")
        if not self.out:
            raise ConfigError("--out is required")
        check_detector(self.preprocess, self.arch)
        unknown = [a for a in self.augment if a not in AUGMENTATIONS]
        if unknown:
            raise ConfigError(f"--augment: unknown {unknown}; choose from {', '.join(AUGMENTATIONS)} or none")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule must be one of {', '.join(SCHEDULES)}")
        if (self.lr is not None and not self.lr > 0) or self.weight_decay < 0:
            raise ConfigError("--lr must be above 0 and --weight-decay at least 0")
        check_at_least(self, ("epochs", "batch_size", "patience", "cpus_per_worker", "max_pixels"))
        check_at_least(self, ("video_frames",), low=0)
        if self.input_size is not None and self.input_size < 16:
            raise ConfigError("--input-size must be at least 16")
        if self.max_failures < -1:
            raise ConfigError("--max-failures is -1 (no limit) or at least 0")
        self._check_fractions()
        parse_threshold_rule(self.threshold_rule)
        check_max_file_mb(self.max_file_mb)
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in --out; --overwrite replaces it: pick one")
        if self.resolved_init == "imagenet" and not registry.get(self.arch).imagenet:
            raise ConfigError(f"--init imagenet: torchvision has no ImageNet weights for {self.arch}")

    def _check_fractions(self) -> None:
        fractions = self.fractions
        if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
            raise ConfigError(f"--split needs three non-negative fractions summing to 1, got {fractions}")
        if fractions[0] <= 0 or fractions[1] <= 0:
            raise ConfigError("--split needs a train and a validation share above 0")

    def json_extra(self) -> dict[str, Any]:
        return {"resolved_init": self.resolved_init}


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig(JsonConfig):
    """One evaluation: a labelled set scored through the scan pipeline, then measured.

    Attributes:
        dataset: Labelled folder tree or manifest (a training run's ``splits.parquet``).
        checkpoint: Detector checkpoint to evaluate.
        out: Output directory for metrics, plots and the per-image scores.
        split: Which split to score; ``None`` means ``test`` when the dataset has splits, else all.
        target_fpr: False-positive rate on real images for the FPR-targeted threshold.
        perturb: Robustness sweep specs (``jpeg:95,75 blur:1,2 downscale:0.5``).
        preprocess: Override the checkpoint's preprocess policy.
        scan_options: The scans' batch size, actors, framing, provenance checks and video frames.
    """

    dataset: str = option(
        positional=True, help="labelled folder tree or manifest (e.g. a training run's splits.parquet)"
    )
    checkpoint: str = option(help="detector checkpoint, local or s3://")
    out: str = option(help="output directory for metrics, plots and per-image scores")
    split: str | None = option(None, choices=SPLITS, help="default: test if any, else all")
    target_fpr: float = option(0.01, help="FPR on real images for the targeted threshold")
    perturb: tuple[str, ...] = option(
        (), nargs="*", show=list, parse=tuple, help="robustness sweep, e.g. jpeg:95,75,50,30 blur:1,2 downscale:0.5"
    )
    preprocess: str | None = option(None, choices=POLICIES, help="override the checkpoint's policy")
    all_files: bool = option(False, help="use every file, not only image extensions")
    storage_options: dict[str, Any] = storage_options_field()
    overwrite: bool = option(False, help="replace a previous evaluation in --out")
    scan_options: ScanOptions = dataclasses.field(default_factory=ScanOptions)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def extensions(self) -> tuple[str, ...]:
        """The extensions the dataset's folders are listed with: the images', and the videos' as the scan's."""
        return media_extensions(DEFAULT_EXTENSIONS, self.scan_options.video_frames)

    def validate(self) -> None:
        """Check names and ranges; raises :class:`ConfigError`."""
        if not self.dataset or not self.checkpoint or not self.out:
            raise ConfigError("evaluate needs DATASET, --checkpoint and --out")
        if self.split is not None and self.split not in SPLITS:
            raise ConfigError(f"--split must be train, val, test or all, not {self.split!r}")
        check_fraction("--target-fpr", self.target_fpr, closed=False)
        check_detector(self.preprocess, None)
        try:
            perturb.parse_sweep(self.perturb)
        except ValueError as exc:
            raise ConfigError(f"--perturb: {exc}") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneConfig(JsonConfig):
    """One pruning study: each amount is pruned, fine-tuned, measured and saved.

    Attributes:
        checkpoint: The detector to prune (any format ``scan`` loads).
        dataset: Labelled dataset for fine-tuning and validation (folder tree or manifest).
        out: Output directory: one fine-tuned run per amount plus the report.
        amounts: Fractions to prune, each in [0, 1); 0 (the unpruned baseline) is always added.
        method: ``structured`` (remove channels) or ``unstructured`` (zero weights).
        epochs: Fine-tuning epochs per amount.
        lr: Fine-tuning learning rate.
        batch_size: Fine-tuning batch size per worker.
        bench_batch_size: Batch size of the inference throughput measurement (the scan's default).
        bench_batches: Timed batches per model in the throughput measurement.
        tune: Search lr, weight decay, batch size and epochs per amount with Ray Tune (ASHA).
        tune_trials: Trials per amount when ``tune``.
        train_options: The fine-tuning runs' training options (workers).
    """

    checkpoint: str = option(help="the detector to prune")
    dataset: str = option(help="labelled dataset for fine-tuning and validation")
    out: str = option(help="output directory: a fine-tuned run per amount and the report")
    amounts: tuple[float, ...] = option(
        (0.1, 0.2, 0.3, 0.4),
        flag="--amount",
        parse=parse_amounts,
        show=show_comma_list,
        help="fractions to prune (the unpruned 0 is added)",
    )
    method: str = option(
        "structured",
        const=(
            Flag("--structured", "structured", "remove channels (default)"),
            Flag("--unstructured", "unstructured", "zero weights"),
        ),
    )
    epochs: int = option(2, help="fine-tuning epochs per amount")
    lr: float = option(1e-4, help="fine-tuning learning rate (default: %(default)s)")
    batch_size: int = option(32, help="fine-tuning batch size per worker")
    bench_batch_size: int = option(64, help="batch of the throughput measurement")
    bench_batches: int = option(5, help="timed batches per model")
    tune: bool = option(False, help="Ray Tune search (ASHA) of lr, weight decay, batch, epochs")
    tune_trials: int = option(4, help="trials per amount with --tune")
    storage_options: dict[str, Any] = storage_options_field()
    overwrite: bool = option(False, help="replace a previous study in --out")
    train_options: TrainOptions = dataclasses.field(default_factory=TrainOptions)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check names and ranges; raises :class:`ConfigError`."""
        if not self.checkpoint or not self.dataset or not self.out:
            raise ConfigError("prune needs --checkpoint, --dataset and --out")
        if self.method not in PRUNE_METHODS:
            raise ConfigError(f"--method must be structured or unstructured, not {self.method!r}")
        if not self.amounts or any(not 0.0 <= a < 1.0 for a in self.amounts):
            raise ConfigError(f"--amount takes fractions in [0, 1), e.g. 0.1,0.2,0.3,0.4; got {self.amounts}")
        check_at_least(self, ("epochs", "batch_size", "bench_batch_size", "bench_batches", "tune_trials"))
        if not self.lr > 0:
            raise ConfigError("--lr must be above 0")

    @property
    def all_amounts(self) -> tuple[float, ...]:
        """The amounts with the unpruned baseline (0) first."""
        return tuple(sorted({0.0, *self.amounts}))
