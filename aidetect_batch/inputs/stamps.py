"""Stamps of container units (archives): what ``--resume`` compares to tell that an archive was rewritten.

A loose file's row names the file itself, so resuming after it changed still gives that path one row. An
archive's rows name its members: rewritten, it may hold other members than the committed rows name, and a
resume would then mix two archives' rows. So a scan records a stamp for each unit a kind other than the loose
file expands, and a resume whose stamps differ is refused. A stamp is what changes when a file is rewritten
and costs no read: the ETag of an object that has one (S3), else size and modification time (a ``stat``, or
the listing entry).

Loose files are never stamped: the units to stamp are picked by the kinds' extensions in one vectorised pass
over the listing, so a listing of 10⁸ loose files costs no more than before. A kind whose units have no
extension is not stamped.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from aidetect_batch import schema
from aidetect_batch.inputs import item, sources
from aidetect_batch.storage import filesystem, is_remote

# Hidden column of a streamed listing's shards: each container unit's stamp (null for a loose file). It travels
# with the unit's rows to the sink, whose shard digests then change when an archive is rewritten.
COLUMN = "_stamp"
# Concurrent stat or HEAD requests when stamping a listing's archives: a HEAD is a round trip, not work.
STAMP_THREADS = 16
MISSING = "missing"
# Archives a refusal names; the rest are counted.
NAMED = 5


def of_info(info: Mapping[str, Any]) -> str:
    """The stamp of an fsspec ``info`` or an S3 listing entry: its ETag (a hub file's blob id or LFS hash) when
    it has one, else size and mtime."""
    etag = info.get("ETag") or info.get("etag") or info.get("blob_id") or (info.get("lfs") or {}).get("sha256")
    if etag:
        return "etag:" + str(etag).strip('"')
    size = info.get("size", info.get("Size"))
    return f"{size}:{info.get('mtime') or info.get('LastModified') or info.get('last_modified')}"


def stamp(unit: item.Item, storage_options: dict[str, Any] | None = None) -> str:
    """The unit's stamp now: size and nanosecond mtime of a local file, :func:`of_info` of a remote one.
    A unit that is gone is ``missing``, so it differs from any stamp it had and matches a unit gone before; one
    that cannot be looked at (a 403) is stamped with why, and its own row will say so when it is read."""
    try:
        if not is_remote(unit.uri):
            found = os.stat(unit.raw_path or filesystem(unit.uri)[1])
            return f"{found.st_size}:{found.st_mtime_ns}"
        fs, inner = filesystem(unit.uri, storage_options)
        return of_info(fs.info(inner))
    except FileNotFoundError:
        return MISSING
    except OSError as exc:
        return f"unavailable:{type(exc).__name__}"


def _extensions(kinds: Sequence[item.Kind]) -> list[str]:
    """The extensions of the units kinds other than the loose file take: only these are stamped."""
    return sorted({e.lower() for k in kinds if not item.is_loose(k) for e in k.extensions})


def _expanded(unit: item.Item, kinds: Sequence[item.Kind]) -> bool:
    return not item.is_loose(item.kind_of(unit, kinds))


def stamped_units(listing: pa.Table, kinds: Sequence[item.Kind]) -> list[item.Item]:
    """The listed units that a kind other than the loose file expands, in listing order."""
    extensions = _extensions(kinds)
    if not extensions or listing.num_rows == 0:
        return []
    pattern = r"\.(" + "|".join(re.escape(e) for e in extensions) + r")$"
    candidates = listing.filter(pc.match_substring_regex(listing.column(schema.PATH), pattern, ignore_case=True))
    return [u for u in item.units_of(candidates) if _expanded(u, kinds)]


def of_page(
    page: sources.Page, kinds: Sequence[item.Kind], storage_options: dict[str, Any] | None = None
) -> list[str | None]:
    """Each unit of a streamed listing's page: its stamp from its listing entry if a kind other than the loose
    file expands it (an object named as a source has no entry: one HEAD), else ``None``."""
    suffixes = tuple("." + e for e in _extensions(kinds))
    return [
        (of_info(entry) if entry else stamp(item.Item(path), storage_options))
        if suffixes and path.lower().endswith(suffixes) and _expanded(item.Item(path), kinds)
        else None
        for path, entry in zip(page.paths, page.entries, strict=True)
    ]


def container_stamps(
    listing: pa.Table, kinds: Sequence[item.Kind], storage_options: dict[str, Any] | None = None
) -> dict[str, str]:
    """Path → stamp of each container unit of a listing (none for loose files)."""
    units = stamped_units(listing, kinds)
    if not units:
        return {}
    with ThreadPoolExecutor(min(STAMP_THREADS, len(units))) as pool:
        found = list(pool.map(lambda unit: stamp(unit, storage_options), units))
    return dict(zip((u.uri for u in units), found, strict=True))


def changed(before: Mapping[str, str], now: Mapping[str, str]) -> list[str]:
    """The units whose stamp differs from (or was not in) ``before``, in ``now``'s order."""
    return [uri for uri, found in now.items() if before.get(uri) != found]


def named(uris: Sequence[str]) -> str:
    """The first :data:`NAMED` of ``uris`` and how many more, for a refusal."""
    more = f" and {len(uris) - NAMED} more" if len(uris) > NAMED else ""
    return ", ".join(uris[:NAMED]) + more
