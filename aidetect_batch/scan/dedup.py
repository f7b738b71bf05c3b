"""``--dedup``: identical bytes are decoded and scored once, across every decode task of a scan.

Social-media dumps are full of reposts. Decode tasks hash each file
(SHA-256, which they compute anyway) and ask one registry actor, in one call
per batch, which hashes were seen before. The first input to claim a hash is
scored; every later copy gets a ``duplicate`` row whose ``duplicate_of``
names that input's ``path`` (which copy comes first depends on task timing).
A path is an Item's identity (:attr:`aidetect_batch.inputs.item.Item.path`),
so an archive member claims and is named as itself, not as its archive. Join on
``duplicate_of`` (or ``sha256``) to give copies their original's score.

The registry holds one entry per distinct hash (about 150 bytes each), so
10 million distinct images take about 1.5 GB on the node that runs it. A
resumed scan seeds it from the committed files, so copies of images scored
before the crash stay duplicates.
"""

from __future__ import annotations

from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as pads

from aidetect_batch import schema
from aidetect_batch.storage import filesystem


class HashRegistry:
    """First path seen per SHA-256 (a Ray actor in a scan; plain object in tests)."""

    def __init__(self, seen: dict[str, str] | None = None) -> None:
        self.seen: dict[str, str] = dict(seen or {})

    def claim(self, hashes: list[str], paths: list[str]) -> list[str | None]:
        """For each (hash, path): ``None`` if this path is the first with the hash, else the first path."""
        result: list[str | None] = []
        for digest, path in zip(hashes, paths, strict=True):
            first = self.seen.setdefault(digest, path)
            result.append(None if first == path else first)
        return result

    def size(self) -> int:
        """Distinct hashes registered."""
        return len(self.seen)


def seen_in(scores_dir: str, files: list[str], storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """SHA-256 → path of the non-duplicate rows in committed score files (for a resumed ``--dedup`` scan)."""
    if not files:
        return {}
    fs, _ = filesystem(scores_dir, storage_options)
    inner = [filesystem(f, storage_options)[1] for f in files]
    dataset = pads.dataset(inner, filesystem=fs, format="parquet")
    seen: dict[str, str] = {}
    for batch in dataset.to_batches(columns=[schema.SHA256, schema.PATH, schema.STATUS]):
        keep = pc.and_(pc.is_valid(batch.column(0)), pc.not_equal(batch.column(2), schema.Status.DUPLICATE.value))
        kept = batch.filter(keep)
        for digest, path in zip(kept.column(0).to_pylist(), kept.column(1).to_pylist(), strict=True):
            seen.setdefault(digest, path)
    return seen


def start(seen: dict[str, str]) -> Any:
    """The registry as a Ray actor that needs no CPU and is restarted (reseeded) if its process dies."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(HashRegistry).remote(seen)
