"""The upload page's config (``aidetect-batch serve``), apart from :mod:`aidetect_batch.serve` so that the
command line can be built without loading torch or Ray Serve.

Every option is declared once, on its field (:func:`aidetect_batch.config.option`); the command line
is derived from the fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aidetect_batch.config import DEFAULT_MAX_PIXELS, JsonConfig, check_at_least, option, storage_options_field
from aidetect_batch.detectors.policies import POLICIES, Framing
from aidetect_batch.errors import ConfigError
from aidetect_batch.scan.config import (
    NO_CHECKPOINT,
    arch_field,
    check_detector,
    check_model_choices,
    max_tiles_field,
    native_max_pixels_field,
)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
TOKEN_ENV = "AIDETECT_TOKEN"
_MB = 2**20


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServeConfig(JsonConfig):
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
        max_upload_bytes: Largest accepted upload (``--max-upload-mb``); larger bodies get HTTP 413
            before they are read.
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

    checkpoint: str = option(missing=NO_CHECKPOINT, help="detector checkpoint (local path or s3:// URI)")
    host: str = option("127.0.0.1", help="interface to listen on (0.0.0.0 opens it to the network)")
    token: str | None = option(
        None,
        env=TOKEN_ENV,
        secret=True,
        parse=lambda text: text or None,
        help=f"bearer token the scoring endpoint requires (default: ${TOKEN_ENV}); needed off loopback",
    )
    insecure: bool = option(False, help="allow a non-loopback --host without a token (your own auth in front)")
    port: int = option(8000, help="HTTP port (default: %(default)s)")
    threshold: float | None = option(None, help="decision threshold on P(AI) (default: the checkpoint's)")
    preprocess: str | None = option(None, choices=POLICIES, help="preprocess policy (default: the checkpoint's)")
    arch: str | None = arch_field(help="architecture of a plain state dict without metadata")
    ai_class_index: int | None = option(None, help="which of two logits is AI, for plain state dicts")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, help="decompression-bomb guard")
    max_upload_bytes: int = option(
        50 * _MB,
        flag="--max-upload-mb",
        parse=lambda mb: int(float(mb) * _MB),
        show=lambda size: size / _MB,
        help="largest accepted upload, in MiB",
    )
    replicas: int = option(1, help="Ray Serve replicas of the detector")
    gpus_per_replica: float | None = option(None, help="default: 1 when the cluster has GPUs, else 0")
    max_batch_size: int = option(16, help="concurrent uploads scored in one forward pass")
    native_max_pixels: int = native_max_pixels_field()
    max_tiles: int = max_tiles_field()
    storage_options: dict[str, Any] = storage_options_field()

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
        check_model_choices(self.threshold, self.ai_class_index)
        check_detector(self.preprocess, self.arch)
        check_at_least(self, ("max_pixels", "max_upload_bytes", "replicas", "max_batch_size"))
        check_at_least(self, ("native_max_pixels", "max_tiles"))
        check_at_least(self, ("gpus_per_replica",), low=0)
        self._check_token()

    def _check_token(self) -> None:
        if self.token is not None and not self.token.strip():
            raise ConfigError("--token is empty")
        if not self.loopback and self.token is None and not self.insecure:
            raise ConfigError(
                f"--host {self.host} opens the upload page to the network, and it has no --token: set --token "
                "(or AIDETECT_TOKEN), or pass --insecure if it sits behind your own authentication"
            )
