"""Typed, validated scan configuration.

The config is built from the command line, validated before ``ray.init()`` so
that bad arguments fail in a second instead of after a cluster start, and
written next to the results (``OUT/_run.json``) with secrets redacted.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from aidetect_batch.preprocess import POLICIES

DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
PRECISIONS = ("fp32", "bf16", "fp16")
ARCHS = ("resnet50", "mobilenet_v2", "efficientnet_b0", "resnet_tiny")
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own bomb threshold: ~89 MP, about 9500x9500.

_SECRET_KEY = re.compile(r"secret|token|password|key", re.IGNORECASE)


class ConfigError(ValueError):
    """A user-facing argument error, reported before any work starts."""


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
        max_pixels: Decompression-bomb guard: images whose header announces more are rejected.
        all_files: Send every listed file to the decoder, not only image extensions.
        extensions: Lower-case extensions accepted without ``all_files``.
        storage_options: Extra fsspec options for remote stores (endpoint, profile, ...).
        group_depth: Path components below the source root used for the report's breakdown.
        rows_per_file: Rows per scores Parquet file.
        overwrite: Replace the contents of a non-empty ``out``.
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
    max_pixels: int = DEFAULT_MAX_PIXELS
    all_files: bool = False
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    group_depth: int = 1
    rows_per_file: int = 250_000
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check value ranges and names; raises :class:`ConfigError` with the flag to fix."""
        if not self.sources:
            raise ConfigError("no sources given: name at least one folder, file, glob or s3:// prefix")
        if not self.out:
            raise ConfigError("--out is required")
        if self.preprocess is not None and self.preprocess not in POLICIES:
            raise ConfigError(f"--preprocess must be one of {', '.join(POLICIES)}, not {self.preprocess!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.arch is not None and self.arch not in ARCHS:
            raise ConfigError(f"--arch must be one of {', '.join(ARCHS)}, not {self.arch!r}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"--threshold must be in [0, 1], not {self.threshold}")
        if self.ai_class_index is not None and self.ai_class_index not in (0, 1):
            raise ConfigError("--ai-class-index must be 0 or 1")
        for name in ("batch_size", "decode_batch_size", "max_pixels", "rows_per_file"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.group_depth < 0:
            raise ConfigError("--group-depth must be 0 or more")
        if self.cpus_per_actor is not None and self.cpus_per_actor < 1:
            raise ConfigError("--cpus-per-actor must be at least 1")
        if self.actors is not None:
            lo, hi = self.actors
            if lo < 1 or hi < lo:
                raise ConfigError(f"--actors needs 1 <= MIN <= MAX, got {lo},{hi}")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict with secret-looking storage options redacted."""
        data = dataclasses.asdict(self)
        data["storage_options"] = redact(self.storage_options)
        return data


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
    (``client_kwargs``); ``true``/``false`` and numbers are converted.
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
                value = int(raw)
            except ValueError:
                pass
        if key in ("endpoint_url", "region_name"):
            options.setdefault("client_kwargs", {})[key] = value
        else:
            options[key] = value
    return options
