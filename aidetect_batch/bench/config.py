"""The configs of ``benchmark`` and ``demo``.

Every option is declared once, on its field (:func:`aidetect_batch.config.option`); the command line
is derived from the fields. The ``--suite`` choices are the names in :data:`aidetect_batch.bench.suites.SUITES`,
loaded only when the benchmark command looks at them (the suites import torch and Ray).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aidetect_batch.config import (
    JsonConfig,
    check_at_least,
    comma_list,
    option,
    show_comma_list,
    storage_options_field,
)
from aidetect_batch.detectors import registry
from aidetect_batch.errors import ConfigError
from aidetect_batch.scan.config import PRECISIONS


def suite_names() -> tuple[str, ...]:
    """The ``--suite`` choices: the suite table's names."""
    from aidetect_batch.bench.suites import suite_names as names  # the table's module loads torch and Ray

    return names()


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchmarkConfig(JsonConfig):
    """One ``aidetect-batch benchmark`` run. Which suite takes which option is said in the suite table.

    Attributes:
        suite: The suite to run (a name of :data:`aidetect_batch.bench.suites.SUITES`).
        report_rows: Synthetic score rows the report suite aggregates.
        reposts_rows: Synthetic PDQ hashes the reposts suite groups.
        listing_prefix: The ``s3://`` prefix the listing suite lists.
        scan_arch: The model of the scan, policies and gpu suites (random weights).
        precision: Their precision on CUDA.
        photos: Distinct 1080-2048 px JPEGs of the scan and gpu suites.
        repeats: Times the scan suite scans each photo end to end.
        policy_photos: Photographs per policy or check (scan, policies, provenance and reposts suites).
        memory_sizes: Small-image corpus sizes whose peak RSS the scan suite measures.
        corpora_photos: Photographs the corpora suite stores as loose files, tar shards, a zip and Parquet.
        archive_gb: Size of the larger archive whose decode-task memory the corpora suite measures.
        video_seconds: Length of each clip the video suite makes.
        video_copies: Copies of each clip in the corpus the video suite scans.
        video_frames: Frames sampled per clip, each timed by seeking and scanned (``--video-frames``).
        archs: Architectures the training suite trains.
        per_class: Generated images per class of the training suite.
        epochs: Training suite epochs.
        workers: Training suite Ray Train workers.
        batch_size: Training suite batch size.
        json: Where the results go as JSON; ``None``: the suite's own default (the gpu suite's
            ``benchmark-gpu.json``), else nowhere.
        storage_options: fsspec options for the listing suite's prefix.
    """

    suite: str = option("scan", choices=suite_names, help="the suite to run: %(choices)s (default: %(default)s)")
    report_rows: int = option(10_000_000, help="report suite: synthetic score rows to aggregate")
    reposts_rows: int = option(1_000_000, help="reposts suite: synthetic PDQ hashes to group")
    listing_prefix: str | None = option(None, help="listing suite: the s3:// prefix to list (not part of 'all')")
    scan_arch: str = option(registry.DEFAULT_ARCH, help="scan and gpu suites: the model (random weights)")
    precision: str = option("bf16", choices=PRECISIONS, help="scan and gpu suites: precision on CUDA")
    photos: int = option(48, help="scan and gpu suites: distinct 1080-2048 px JPEGs")
    repeats: int = option(5, help="scan suite: times each photo is scanned end to end")
    policy_photos: int = option(8, help="scan, policies and provenance suites: photographs per policy or check")
    memory_sizes: tuple[int, ...] = option(
        (2000, 20000),
        parse=comma_list(int),
        show=show_comma_list,
        help="scan suite: small-image corpus sizes for RSS",
    )
    corpora_photos: int = option(96, help="corpora suite: photographs stored as each input kind")
    archive_gb: float = option(2.0, help="corpora suite: GiB of the larger archive whose memory is measured")
    video_seconds: float = option(20.0, help="video suite: seconds of each clip (default: %(default)s)")
    video_copies: int = option(3, help="video suite: copies of each of its four clips scanned end to end")
    video_frames: tuple[int, ...] = option(
        (8, 32),
        parse=comma_list(int),
        show=show_comma_list,
        help="video suite: frames per clip, each N timed by seeking and scanned (the scan's --video-frames N)",
    )
    archs: tuple[str, ...] = option(
        (registry.SMALL_ARCH, registry.TINY_ARCH, registry.DEFAULT_ARCH),
        parse=comma_list(str),
        show=show_comma_list,
        help="architectures to train",
    )
    per_class: int = option(60, help="generated images per class")
    epochs: int = option(3, help="training suite: epochs (default: %(default)s)")
    workers: int = option(1, help="training suite: Ray Train workers (default: %(default)s)")
    batch_size: int = option(32, help="training batch; the scan suite uses 64")
    json: str | None = option(None, help="write the results here (the gpu suite: benchmark-gpu.json by default)")
    storage_options: dict[str, Any] = storage_options_field()

    def __post_init__(self) -> None:
        if self.suite == "listing" and not (self.listing_prefix or "").startswith("s3://"):
            raise ConfigError("--suite listing needs --listing-prefix s3://bucket/prefix")
        for name in (self.scan_arch, *self.archs):
            registry.check_arch(name)
        sizes = (
            "report_rows",
            "reposts_rows",
            "photos",
            "repeats",
            "policy_photos",
            "per_class",
            "epochs",
            "corpora_photos",
            "video_copies",
        )
        check_at_least(self, (*sizes, "workers", "batch_size"))
        if self.archive_gb <= 0:
            raise ConfigError(f"--archive-gb must be positive, not {self.archive_gb}")
        if self.video_seconds <= 0:
            raise ConfigError(f"--video-seconds must be positive, not {self.video_seconds}")
        if not self.video_frames or min(self.video_frames) < 1:
            raise ConfigError(f"--video-frames must be one or more counts of at least 1, not {self.video_frames}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoConfig(JsonConfig):
    """The offline demo (``aidetect-batch demo``).

    Attributes:
        dir: Where the corpus and every result go.
        epochs: Training epochs of the demo detector.
    """

    dir: str = option("aidetect-demo", help="where to write the corpus and results")
    epochs: int = option(20, help="training epochs of the demo detector")

    def __post_init__(self) -> None:
        check_at_least(self, ("epochs",))
