"""Typed, validated configuration of scan, train, evaluate, prune and serve.

The config is built from the command line, validated before ``ray.init()`` so
that bad arguments fail in a second instead of after a cluster start, and
written next to the results (``OUT/_run.json``) with secrets redacted.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from typing import Any

from aidetect_batch.detectors import registry
from aidetect_batch.detectors.policies import (
    DEFAULT_MAX_TILES,
    DEFAULT_NATIVE_MAX_PIXELS,
    POLICIES,
    Framing,
    check_policy,
)
from aidetect_batch.errors import ConfigError
from aidetect_batch.media import perturb, provenance
from aidetect_batch.media.pdq import MATCH_DISTANCE, MIN_QUALITY

DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "heic", "heif", "avif")
PRECISIONS = ("fp32", "bf16", "fp16")
ARCHS = registry.ARCHS
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own bomb threshold: ~89 MP, about 9500x9500.
# Files above this are too_large rows, never read. 256 MiB is DEFAULT_MAX_PIXELS as uncompressed
# 8-bit RGB, the largest image the pixel guard admits in the plainest encoding; a decode task
# holds at most --decode-batch-size such files at once.
DEFAULT_MAX_FILE_MB = 256

_SECRET_KEY = re.compile(r"secret|token|password|key", re.IGNORECASE)


def check_max_file_mb(value: float) -> None:
    """``--max-file-mb`` must be a positive size; raises :class:`ConfigError`."""
    if not value > 0:
        raise ConfigError(f"--max-file-mb must be above 0, not {value}")


@dataclasses.dataclass(frozen=True)
class ScanConfig:
    """Everything one scan needs. Immutable so every stage sees the same values.

    Attributes:
        sources: Local folders, files, globs or ``s3://bucket/prefix`` URIs.
        out: Output directory, local or ``s3://``.
        checkpoint: Detector checkpoint path or URI.
        arch: Architecture, used only for plain state dicts without metadata.
        ai_class_index: Which of two logits means "AI"; only for plain state dicts.
        preprocess: Preprocess policy; ``None`` means the checkpoint's, else ``resize``.
        threshold: Decision threshold on P(AI); ``None`` means the checkpoint's.
        batch_size: Images per Classifier forward pass.
        decode_batch_size: Files per CPU decode task batch.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast on CUDA).
        actors: (min, max) Classifier actors; ``None`` chooses from cluster resources.
        cpus_per_actor: CPUs reserved per Classifier actor when it runs on CPU.
        decode_tasks: Concurrent CPU read/decode tasks; ``None``: every CPU the Classifier pool leaves.
        max_pixels: Decompression-bomb guard: images whose header announces more are rejected.
        max_file_mb: Files larger than this are ``too_large`` rows, checked before any byte is read.
        all_files: Send every listed file to the decoder, not only image extensions.
        extensions: Lower-case extensions accepted without ``all_files``.
        storage_options: Extra fsspec options for remote stores (endpoint, profile, ...).
        group_depth: Path components below the source root used for the report's breakdown.
        rows_per_file: Rows per scores Parquet file.
        overwrite: Replace the contents of a non-empty ``out``.
        perturbation: A robustness perturbation (``jpeg:75``) applied before preprocessing;
            set by ``evaluate --perturb``.
        manifest: A manifest of paths (Parquet, CSV/TSV or text) instead of ``sources``.
        limit: Scan only the first N inputs (after ``sample``).
        sample: Keep each input with this probability (seeded by position), for trial runs.
        seed: Seed of ``sample``.
        resume: Continue the stopped scan in ``out``: skip the shards its committed files hold.
        dedup: Decode and score identical bytes (SHA-256) once; copies get ``duplicate`` rows.
        commit_every_s: Commit finished shards at least this often (bounds the work a crash loses).
        gpu_decode: Decode JPEGs in the Classifier actor (nvJPEG on CUDA, CPU fallback per file).
        compile: ``torch.compile`` the model in each Classifier actor.
        native_max_pixels: ``native``: larger images are center-cropped to this many pixels, never resized.
        max_tiles: ``tiles``: at most this many tiles per image, spread evenly over it.
        c2pa: Read and validate a C2PA manifest wherever the bytes carry its marker.
        watermark: Also look for the Stable Diffusion invisible watermark (costly; needs the ``watermark`` extra).
        phash: Compute each decoded image's PDQ hash and quality, for ``aidetect-batch reposts``.
    """

    sources: tuple[str, ...]
    out: str
    checkpoint: str
    arch: str | None = None
    ai_class_index: int | None = None
    preprocess: str | None = None
    threshold: float | None = None
    batch_size: int = 64
    decode_batch_size: int = 16
    precision: str = "fp32"
    actors: tuple[int, int] | None = None
    cpus_per_actor: int | None = None
    decode_tasks: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_file_mb: float = DEFAULT_MAX_FILE_MB
    all_files: bool = False
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    group_depth: int = 1
    rows_per_file: int = 250_000
    overwrite: bool = False
    perturbation: str | None = None
    manifest: str | None = None
    limit: int | None = None
    sample: float | None = None
    seed: int = 0
    resume: bool = False
    dedup: bool = False
    commit_every_s: float = 60.0
    gpu_decode: bool = False
    compile: bool = False
    native_max_pixels: int = DEFAULT_NATIVE_MAX_PIXELS
    max_tiles: int = DEFAULT_MAX_TILES
    c2pa: bool = True
    watermark: bool = False
    phash: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @property
    def framing(self) -> Framing:
        return Framing(native_max_pixels=self.native_max_pixels, max_tiles=self.max_tiles)

    @property
    def checks(self) -> provenance.Checks:
        return provenance.Checks(c2pa=self.c2pa, watermark=self.watermark, max_pixels=self.max_pixels)

    def validate(self) -> None:
        """Check value ranges and names; raises :class:`ConfigError` with the flag to fix."""
        if self.watermark:
            check_watermark()
        if not self.sources and not self.manifest:
            raise ConfigError(
                "no sources given: name at least one folder, file, glob or s3:// prefix, or --manifest FILE"
            )
        if self.sources and self.manifest:
            raise ConfigError("give either sources or --manifest, not both")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("--limit must be at least 1")
        if self.sample is not None and not 0.0 < self.sample <= 1.0:
            raise ConfigError(f"--sample takes a fraction in (0, 1], not {self.sample}")
        if self.commit_every_s < 0:
            raise ConfigError("--commit-every must be 0 or more seconds")
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the scan in --out and --overwrite replaces it; pick one")
        if not self.out:
            raise ConfigError("--out is required")
        if self.preprocess is not None and self.preprocess not in POLICIES:
            raise ConfigError(f"--preprocess must be one of {', '.join(POLICIES)}, not {self.preprocess!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.arch is not None:
            registry.check_arch(self.arch)
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"--threshold must be in [0, 1], not {self.threshold}")
        if self.ai_class_index is not None and self.ai_class_index not in (0, 1):
            raise ConfigError("--ai-class-index must be 0 or 1")
        positive = ("batch_size", "decode_batch_size", "max_pixels", "rows_per_file", "native_max_pixels", "max_tiles")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.preprocess is not None:
            check_policy(self.preprocess, self.arch, gpu_decode=self.gpu_decode)
        check_max_file_mb(self.max_file_mb)
        if self.group_depth < 0:
            raise ConfigError("--group-depth must be 0 or more")
        if self.cpus_per_actor is not None and self.cpus_per_actor < 1:
            raise ConfigError("--cpus-per-actor must be at least 1")
        if self.decode_tasks is not None and self.decode_tasks < 1:
            raise ConfigError("--decode-tasks must be at least 1")
        if self.actors is not None:
            lo, hi = self.actors
            if lo < 1 or hi < lo:
                raise ConfigError(f"--actors needs 1 <= MIN <= MAX, got {lo},{hi}")
        if self.perturbation is not None:
            try:
                perturb.parse(self.perturbation)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 2**20)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict with secret-looking storage options redacted."""
        data = dataclasses.asdict(self)
        data["storage_options"] = redact(self.storage_options)
        return data


def check_watermark() -> None:
    """``--watermark`` needs the optional invisible-watermark package; say how to get it."""
    if importlib.util.find_spec("imwatermark") is None:
        raise ConfigError("--watermark needs the invisible-watermark package: pip install 'aidetect-batch[watermark]'")


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def redact(options: dict[str, Any]) -> dict[str, Any]:
    """Replace values whose key looks like a credential, recursively."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, dict):
            out[key] = redact(value)
        elif _SECRET_KEY.search(key):
            out[key] = "***"
        else:
            out[key] = value
    return out


def parse_actors(text: str) -> tuple[int, int]:
    """Parse ``--actors``: ``N`` or ``MIN,MAX``."""
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError as exc:
        raise ConfigError(f"--actors takes N or MIN,MAX, not {text!r}") from exc
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise ConfigError(f"--actors takes N or MIN,MAX, not {text!r}")


def parse_storage_options(pairs: list[str]) -> dict[str, Any]:
    """Parse repeated ``--storage-option key=value`` into fsspec options.

    ``endpoint_url`` and ``region_name`` go where s3fs expects them
    (``client_kwargs``), ``connect_timeout`` and ``read_timeout`` (seconds) into botocore's
    ``config_kwargs``; ``true``/``false`` and numbers are converted.
    """
    options: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--storage-option takes key=value, not {pair!r}")
        key, raw = pair.split("=", 1)
        value: Any = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            try:
                value = float(raw) if key.endswith("_timeout") else int(raw)
            except ValueError:
                pass
        if key in ("endpoint_url", "region_name"):
            options.setdefault("client_kwargs", {})[key] = value
        elif key in ("connect_timeout", "read_timeout"):
            options.setdefault("config_kwargs", {})[key] = value
        else:
            options[key] = value
    return options


AUGMENTATIONS = ("flip", "rotate", "color", "translate", "jpeg", "blur")
# Flip moves pixels without resampling them; rotation and sub-pixel translation resample every image,
# and blur and JPEG wipe the traces out of the very crops they touch, so they are opt-in.
DEFAULT_AUGMENT = ("flip",)
# The policy of newly trained checkpoints: native pixels at the cost of one view (BENCHMARKS.md, README).
DEFAULT_TRAIN_POLICY = "center-crop"
# (from scratch, fine-tuning): a from-scratch network needs a larger step and more epochs.
DEFAULT_LR = (1e-3, 1e-4)
DEFAULT_EPOCHS = (30, 5)
DEFAULT_PATIENCE = (5, 3)
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("cosine", "step", "none")


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


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; defaults follow the EfficientNet-B0 study.

    Attributes:
        dataset: Labelled folder tree or manifest, local or ``s3://``.
        out: Output directory (checkpoint, splits, history, Ray Train state).
        arch: Detector architecture.
        init: ``imagenet`` (torchvision weights), ``none``, or a weights file; ``None`` means
            ``imagenet`` where torchvision has ImageNet weights, else ``none``.
        freeze_backbone: Train only the classification head (the studies' ablation).
        input_size: Model input side; ``None`` means the architecture's (224, or 32 for cifake_cnn).
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
        fractions: Train/val/test fractions when the dataset has no split folders.
        class_weights: Weight the loss by inverse class frequency.
        threshold_rule: How the checkpoint's threshold is chosen on validation (see
            :func:`parse_threshold_rule`).
        workers: Ray Train workers (data-parallel replicas).
        use_gpu: One GPU per worker; ``None`` means when the cluster has GPUs.
        cpus_per_worker: CPUs per training worker.
        max_failures: Worker-group restarts from the last epoch's checkpoint before failing.
        resume: Continue a stopped run in ``out`` from its last epoch.
        overwrite: Replace a previous run in ``out``.
        near_duplicates: Keep every near-duplicate group (PDQ) in one split, not only identical bytes.
        crash_after_epoch: Fault injection for tests: fail the first attempt after this epoch.
        validate_first: Measure the initial model on validation as epoch 0 (pruning's "before").
        keep_zeros: Keep weights that start at zero at zero (fine-tuning an unstructured-pruned model).
    """

    dataset: str
    out: str
    arch: str = "resnet50"
    init: str | None = None
    freeze_backbone: bool = False
    input_size: int | None = None
    preprocess: str = DEFAULT_TRAIN_POLICY
    augment: tuple[str, ...] = DEFAULT_AUGMENT
    optimizer: str = "adam"
    lr: float | None = None
    weight_decay: float = 1e-5
    schedule: str = "cosine"
    epochs: int | None = None
    batch_size: int = 32
    patience: int | None = None
    seed: int = 0
    fractions: tuple[float, float, float] = (0.7225, 0.1275, 0.15)
    class_weights: bool = False
    threshold_rule: str = "f1"
    workers: int = 1
    use_gpu: bool | None = None
    cpus_per_worker: int = 1
    max_failures: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_file_mb: float = DEFAULT_MAX_FILE_MB
    all_files: bool = False
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    resume: bool = False
    overwrite: bool = False
    near_duplicates: bool = True
    crash_after_epoch: int | None = None
    validate_first: bool = False
    keep_zeros: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 2**20)

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
        if not self.dataset:
            raise ConfigError("name a labelled dataset: a folder with real/ and ai/ (or fake/) or a manifest")
        if not self.out:
            raise ConfigError("--out is required")
        registry.check_arch(self.arch)
        if self.preprocess not in POLICIES:
            raise ConfigError(f"--preprocess must be one of {', '.join(POLICIES)}, not {self.preprocess!r}")
        unknown = [a for a in self.augment if a not in AUGMENTATIONS]
        if unknown:
            raise ConfigError(f"--augment: unknown {unknown}; choose from {', '.join(AUGMENTATIONS)} or none")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule must be one of {', '.join(SCHEDULES)}")
        if (self.lr is not None and not self.lr > 0) or self.weight_decay < 0:
            raise ConfigError("--lr must be above 0 and --weight-decay at least 0")
        for name in ("epochs", "batch_size", "patience", "workers", "cpus_per_worker", "max_pixels"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.input_size is not None and self.input_size < 16:
            raise ConfigError("--input-size must be at least 16")
        if self.max_failures < -1:
            raise ConfigError("--max-failures is -1 (no limit) or at least 0")
        if len(self.fractions) != 3 or any(f < 0 for f in self.fractions) or abs(sum(self.fractions) - 1) > 1e-6:
            raise ConfigError(f"--split needs three non-negative fractions summing to 1, got {self.fractions}")
        if self.fractions[0] <= 0 or self.fractions[1] <= 0:
            raise ConfigError("--split needs a train and a validation share above 0")
        parse_threshold_rule(self.threshold_rule)
        check_max_file_mb(self.max_file_mb)
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in --out; --overwrite replaces it: pick one")
        init = self.resolved_init
        if init == "imagenet":
            if not registry.get(self.arch).imagenet:
                raise ConfigError(f"--init imagenet: torchvision has no ImageNet weights for {self.arch}")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict with secret-looking storage options redacted."""
        data = dataclasses.asdict(self)
        data["storage_options"] = redact(self.storage_options)
        data["resolved_init"] = self.resolved_init
        return data


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """One evaluation: a labelled set scored through the scan pipeline, then measured.

    Attributes:
        dataset: Labelled folder tree or manifest (a training run's ``splits.parquet``).
        checkpoint: Detector checkpoint to evaluate.
        out: Output directory for metrics, plots and the per-image scores.
        split: Which split to score; ``None`` means ``test`` when the dataset has splits, else all.
        target_fpr: False-positive rate on real images for the FPR-targeted threshold.
        perturb: Robustness sweep specs (``jpeg:95,75 blur:1,2 downscale:0.5``).
        preprocess: Override the checkpoint's preprocess policy.
        scan_options: Other :class:`ScanConfig` fields (batch size, actors, precision, ...).
    """

    dataset: str
    checkpoint: str
    out: str
    split: str | None = None
    target_fpr: float = 0.01
    perturb: tuple[str, ...] = ()
    preprocess: str | None = None
    all_files: bool = False
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    overwrite: bool = False
    scan_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check names and ranges; raises :class:`ConfigError`."""
        if not self.dataset or not self.checkpoint or not self.out:
            raise ConfigError("evaluate needs DATASET, --checkpoint and --out")
        if self.split is not None and self.split not in ("train", "val", "test", "all"):
            raise ConfigError(f"--split must be train, val, test or all, not {self.split!r}")
        if not 0.0 <= self.target_fpr < 1.0:
            raise ConfigError("--target-fpr must be in [0, 1)")
        if self.preprocess is not None and self.preprocess not in POLICIES:
            raise ConfigError(f"--preprocess must be one of {', '.join(POLICIES)}")
        try:
            perturb.parse_sweep(self.perturb)
        except ValueError as exc:
            raise ConfigError(f"--perturb: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict with secret-looking storage options redacted."""
        data = dataclasses.asdict(self)
        data["storage_options"] = redact(self.storage_options)
        return data


@dataclasses.dataclass(frozen=True)
class PruneConfig:
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
        train_options: Other :class:`TrainConfig` fields (workers, augment, seed, ...).
    """

    checkpoint: str
    dataset: str
    out: str
    amounts: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4)
    method: str = "structured"
    epochs: int = 2
    lr: float = 1e-4
    batch_size: int = 32
    bench_batch_size: int = 64
    bench_batches: int = 5
    tune: bool = False
    tune_trials: int = 4
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    overwrite: bool = False
    train_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check names and ranges; raises :class:`ConfigError`."""
        if not self.checkpoint or not self.dataset or not self.out:
            raise ConfigError("prune needs --checkpoint, --dataset and --out")
        if self.method not in ("structured", "unstructured"):
            raise ConfigError(f"--method must be structured or unstructured, not {self.method!r}")
        if not self.amounts or any(not 0.0 <= a < 1.0 for a in self.amounts):
            raise ConfigError(f"--amount takes fractions in [0, 1), e.g. 0.1,0.2,0.3,0.4; got {self.amounts}")
        for name in ("epochs", "batch_size", "bench_batch_size", "bench_batches", "tune_trials"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if not self.lr > 0:
            raise ConfigError("--lr must be above 0")

    @property
    def all_amounts(self) -> tuple[float, ...]:
        """The amounts with the unpruned baseline (0) first."""
        return tuple(sorted({0.0, *self.amounts}))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict with secret-looking storage options redacted."""
        data = dataclasses.asdict(self)
        data["storage_options"] = redact(self.storage_options)
        return data


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """The upload page (``aidetect-batch serve``): one Ray Serve application.

    Attributes:
        checkpoint: Detector checkpoint path or URI.
        host: Interface to listen on; loopback unless the operator opens it up.
        port: HTTP port.
        threshold: Decision threshold on P(AI); ``None`` means the checkpoint's.
        preprocess: Preprocess policy; ``None`` means the checkpoint's, else ``resize``.
        arch: Architecture, only for plain state dicts without metadata.
        ai_class_index: Which of two logits means "AI"; only for plain state dicts.
        max_pixels: Decompression-bomb guard, as in the scan.
        max_upload_bytes: Largest accepted upload; larger bodies get HTTP 413 before they are read.
        replicas: Ray Serve replicas of the detector.
        gpus_per_replica: GPUs per replica; ``None``: 1 when the cluster has GPUs, else 0.
        max_batch_size: Concurrent uploads scored in one forward pass.
        storage_options: Extra fsspec options for a remote checkpoint.
        native_max_pixels: ``native``: larger uploads are center-cropped to this many pixels.
        max_tiles: ``tiles``: at most this many tiles per upload.
        token: A bearer token the scoring endpoint requires (``--token`` or ``AIDETECT_TOKEN``); never
            printed, logged or written.
        insecure: Allow a non-loopback ``host`` without a token: the page sits behind the operator's own
            authentication.
    """

    checkpoint: str
    host: str = "127.0.0.1"
    port: int = 8000
    threshold: float | None = None
    preprocess: str | None = None
    arch: str | None = None
    ai_class_index: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_upload_bytes: int = 50 * 1024 * 1024
    replicas: int = 1
    gpus_per_replica: float | None = None
    max_batch_size: int = 16
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    native_max_pixels: int = DEFAULT_NATIVE_MAX_PIXELS
    max_tiles: int = DEFAULT_MAX_TILES
    token: str | None = dataclasses.field(default=None, repr=False)
    insecure: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @property
    def framing(self) -> Framing:
        return Framing(native_max_pixels=self.native_max_pixels, max_tiles=self.max_tiles)

    @property
    def loopback(self) -> bool:
        """The page listens on this machine only."""
        return self.host in LOOPBACK_HOSTS or self.host.startswith("127.")

    def validate(self) -> None:
        """Check names and ranges; raises :class:`ConfigError`."""
        if not self.checkpoint:
            raise ConfigError("serve needs --checkpoint")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be 1-65535, not {self.port}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError("--threshold must be in [0, 1]")
        if self.preprocess is not None and self.preprocess not in POLICIES:
            raise ConfigError(f"--preprocess must be one of {', '.join(POLICIES)}")
        if self.arch is not None:
            registry.check_arch(self.arch)
        if self.ai_class_index is not None and self.ai_class_index not in (0, 1):
            raise ConfigError("--ai-class-index must be 0 or 1")
        if self.max_pixels < 1 or self.max_upload_bytes < 1:
            raise ConfigError("--max-pixels and --max-upload-mb must be positive")
        if self.replicas < 1 or self.max_batch_size < 1:
            raise ConfigError("--replicas and --max-batch-size must be at least 1")
        if self.native_max_pixels < 1 or self.max_tiles < 1:
            raise ConfigError("--native-max-pixels and --max-tiles must be at least 1")
        if self.token is not None and not self.token.strip():
            raise ConfigError("--token is empty")
        if not self.loopback and self.token is None and not self.insecure:
            raise ConfigError(
                f"--host {self.host} opens the upload page to the network, and it has no --token: set --token "
                "(or AIDETECT_TOKEN), or pass --insecure if it sits behind your own authentication"
            )
        if self.gpus_per_replica is not None and self.gpus_per_replica < 0:
            raise ConfigError("--gpus-per-replica must be 0 or more")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict with the token and secret-looking storage options redacted."""
        data = dataclasses.asdict(self)
        data["storage_options"] = redact(self.storage_options)
        data["token"] = "***" if self.token else None
        return data


# Manifest columns that say when a file was posted; reposts reports a group's first and last.
TIME_COLUMNS = ("timestamp", "posted_at", "created_at", "time", "date")


@dataclasses.dataclass(frozen=True)
class RepostsConfig:
    """How ``reposts`` groups a scan's rows.

    Attributes:
        out: The scan's output directory (local or ``s3://``).
        distance: Largest Hamming distance between two hashes of one group.
        min_quality: Hashes of lower PDQ quality join no group.
        group_depth: Path components below the source root kept as each group's prefixes.
        time_column: A listing column with when each file was posted; ``None`` picks one of
            :data:`TIME_COLUMNS` if the scores carry it.
        storage_options: fsspec options for a remote ``out``.
    """

    out: str
    distance: int = MATCH_DISTANCE
    min_quality: int = MIN_QUALITY
    group_depth: int = 1
    time_column: str | None = None
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.group_depth < 0:
            raise ConfigError("--group-depth must be 0 or more")
        if not 0 <= self.distance <= 64:
            raise ConfigError(f"--distance must be between 0 and 64 bits, not {self.distance}")
        if not 0 <= self.min_quality <= 100:
            raise ConfigError(f"--min-quality must be between 0 and 100, not {self.min_quality}")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict with secret-looking storage options redacted."""
        return {**dataclasses.asdict(self), "storage_options": redact(self.storage_options)}
