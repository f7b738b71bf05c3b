"""The configs of ``report`` (rebuild a scan's report) and ``reposts`` (near-duplicate groups).

Every option is declared once, on its field (:func:`aidetect_batch.config.option`); the command line
is derived from the fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aidetect_batch.config import JsonConfig, check_at_least, option, storage_options_field
from aidetect_batch.errors import ConfigError
from aidetect_batch.media.pdq import MATCH_DISTANCE, MIN_QUALITY

# Manifest columns that say when a file was posted; reposts reports a group's first and last.
TIME_COLUMNS = ("timestamp", "posted_at", "created_at", "time", "date")


def prefix_depth_field(help: str) -> Any:
    """``--prefix-depth`` (old name ``--group-depth``): path components below the source root."""
    return option(1, aliases=("--group-depth",), help=f"{help} (--group-depth: old name)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReportConfig(JsonConfig):
    """How ``report`` re-creates ``OUT/report`` from a finished scan's scores.

    Attributes:
        out: A scan's output directory, or an evaluation's (its plots are included).
        thumbnails: Images per thumbnail grid of the HTML page.
        storage_options: fsspec options for a remote ``out``.
    """

    out: str = option(positional=True, help="a scan's --out, or an evaluation's (its plots are included)")
    thumbnails: int = option(24, help="images per thumbnail grid")
    storage_options: dict[str, Any] = storage_options_field()

    def __post_init__(self) -> None:
        check_at_least(self, ("thumbnails",), low=0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RepostsConfig(JsonConfig):
    """How ``reposts`` groups a scan's rows.

    Attributes:
        out: The scan's output directory (local or ``s3://``).
        distance: Largest Hamming distance between two hashes of one group.
        min_quality: Hashes of lower PDQ quality join no group.
        prefix_depth: Path components below the source root kept as each group's prefixes.
        time_column: A listing column with when each file was posted; ``None`` picks one of
            :data:`TIME_COLUMNS` if the scores carry it.
        storage_options: fsspec options for a remote ``out``.
    """

    out: str = option(positional=True, help="a scan's --out, scanned with --phash")
    distance: int = option(MATCH_DISTANCE, help="largest PDQ Hamming distance within a group")
    min_quality: int = option(MIN_QUALITY, help="hashes of lower PDQ quality join no group")
    prefix_depth: int = prefix_depth_field("path components kept as each group's prefixes")
    time_column: str | None = option(None, help="a manifest column with when each file was posted (first/last seen)")
    storage_options: dict[str, Any] = storage_options_field()

    def __post_init__(self) -> None:
        check_at_least(self, ("prefix_depth",), low=0)
        if not 0 <= self.distance <= 64:
            raise ConfigError(f"--distance must be between 0 and 64 bits, not {self.distance}")
        if not 0 <= self.min_quality <= 100:
            raise ConfigError(f"--min-quality must be between 0 and 100, not {self.min_quality}")
