"""Turn what the user names into the list of files to scan.

Sources are local folders (walked recursively), single files, globs and
``s3://bucket/prefix`` URIs. The result is a table of ``path`` and ``source``
(the root it was found under, for the report's per-prefix breakdown).

Rules:
- Hidden entries (a component starting with ``.``) below a folder or prefix
  are skipped: ``.DS_Store``, AppleDouble ``._x.jpg`` files, ``.git``.
- Zero-length S3 "folder marker" keys ending in ``/`` are skipped; other
  zero-byte files are kept and become ``empty`` rows.
- Folders and prefixes keep only image extensions unless ``all_files``;
  a file named explicitly is always scanned.
- A source that does not exist is an error; one that exists but holds no
  matching files is logged.
"""

from __future__ import annotations

import glob as globlib
import logging
import random
import re
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from aidetect_batch import schema
from aidetect_batch.storage import filesystem, is_remote, to_uri

_logger = logging.getLogger(__name__)

_GLOB_CHARS = re.compile(r"[*?\[]")


class SourceError(ValueError):
    """A source that does not exist or cannot be listed."""


def _wanted(relative: str, extensions: tuple[str, ...], all_files: bool) -> bool:
    parts = [p for p in relative.split("/") if p]
    if any(p.startswith(".") for p in parts):
        return False
    if all_files:
        return True
    name = parts[-1] if parts else relative
    return "." in name and name.rsplit(".", 1)[1].lower() in extensions


def _list_one(
    source: str, extensions: tuple[str, ...], all_files: bool, storage_options: dict[str, Any]
) -> list[tuple[str, str]]:
    fs, path = filesystem(source, storage_options)
    if _GLOB_CHARS.search(source):
        matches = sorted(fs.glob(path)) if is_remote(source) else sorted(globlib.glob(path, recursive=True))
        if not matches:
            raise SourceError(f"source {source!r}: the glob matches nothing")
        root = to_uri(fs, path[: _GLOB_CHARS.search(path).start()].rsplit("/", 1)[0])
        rows = []
        for match in matches:
            if fs.isdir(match):
                rows += [(p, root) for p, _ in _walk(fs, match, extensions, all_files)]
            elif _wanted(match.rsplit("/", 1)[-1], extensions, all_files):
                rows.append((to_uri(fs, match), root))
        return rows
    if _info(fs, path, source)["type"] != "directory":
        return [(to_uri(fs, path), to_uri(fs, path.rsplit("/", 1)[0]))]
    return _walk(fs, path, extensions, all_files)


def _info(fs: Any, path: str, source: str) -> dict[str, Any]:
    """The source's fsspec info; a missing or unreachable source is a :class:`SourceError`."""
    try:
        return fs.info(path)
    except FileNotFoundError:
        raise SourceError(f"source {source!r} does not exist") from None
    except OSError as exc:
        raise SourceError(f"source {source!r} cannot be listed: {exc}") from exc


def _walk(fs: Any, root: str, extensions: tuple[str, ...], all_files: bool) -> list[tuple[str, str]]:
    root = root.rstrip("/")
    root_uri = to_uri(fs, root)
    rows = []
    for path, info in sorted(fs.find(root, detail=True).items()):
        if info.get("type") == "directory" or (path.endswith("/") and not info.get("size")):
            continue
        relative = path[len(root) :].lstrip("/")
        if _wanted(relative, extensions, all_files):
            rows.append((to_uri(fs, path), root_uri))
    if not rows:
        _logger.warning("source %s holds no %sfiles", root_uri, "" if all_files else "image ")
    return rows


def list_sources(
    sources: tuple[str, ...],
    extensions: tuple[str, ...],
    all_files: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> pa.Table:
    """List every file to scan as a table of ``path`` and ``source``, without duplicates.

    Raises:
        SourceError: a source is missing, unlistable, or nothing at all was found.
    """
    seen: dict[str, str] = {}
    for source in sources:
        for path, root in _list_one(source, extensions, all_files, storage_options or {}):
            seen.setdefault(path, root)
    if not seen:
        hint = "" if all_files else " (only image extensions are scanned; --all-files sends every file)"
        raise SourceError(f"no files found in {', '.join(sources)}{hint}")
    return pa.table({schema.PATH: list(seen), schema.SOURCE: list(seen.values())})


LIST_PAGE_KEYS = 1000


def streamable(sources: tuple[str, ...]) -> bool:
    """True when every source is a remote URI without glob characters: these are listed page by page
    inside the job (:func:`iter_listing`) instead of all up front on the driver."""
    return bool(sources) and all(is_remote(s) and not _GLOB_CHARS.search(s) for s in sources)


def listing_units(sources: tuple[str, ...], storage_options: dict[str, Any] | None = None) -> list[tuple[str, bool]]:
    """Check remote sources on the driver with one request each: ``(uri, is_prefix)`` in order.

    A source inside another source's prefix is dropped (its files are listed once).

    Raises:
        SourceError: a source does not exist or cannot be reached.
    """
    units: list[tuple[str, bool]] = []
    for source in dict.fromkeys(s.rstrip("/") for s in sources):
        fs, path = filesystem(source, storage_options)
        units.append((to_uri(fs, path), _info(fs, path, source)["type"] == "directory"))
    prefixes = [uri + "/" for uri, is_prefix in units if is_prefix]
    return [(uri, p) for uri, p in units if not any(uri.startswith(q) and uri + "/" != q for q in prefixes)]


def _pages(fs: Any, path: str, page_keys: int) -> Iterator[list[tuple[str, int]]]:
    """``(path, size)`` of every object under ``path``, one list per listing page, in key order.

    S3 (anything with s3fs's ``call_s3``) is read with ListObjectsV2 page by page, each request
    retried by s3fs; other filesystems are found in one go.
    """
    if not hasattr(fs, "call_s3"):
        found = fs.find(path, detail=True)
        yield [(p, i.get("size") or 0) for p, i in sorted(found.items()) if i.get("type") != "directory"]
        return
    bucket, key, _ = fs.split_path(path)
    request = {"Bucket": bucket, "Prefix": key.rstrip("/") + "/" if key else "", "MaxKeys": page_keys}
    while True:
        page = fs.call_s3("list_objects_v2", **request)
        yield [(f"{bucket}/{item['Key']}", item.get("Size", 0)) for item in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def iter_listing(
    units: list[tuple[str, bool]],
    extensions: tuple[str, ...],
    all_files: bool = False,
    storage_options: dict[str, Any] | None = None,
    page_keys: int = LIST_PAGE_KEYS,
) -> Iterator[tuple[list[str], list[str]]]:
    """Yield ``(paths, roots)`` one listing page at a time, with the same rules and order as
    :func:`list_sources` (hidden entries, folder markers and extensions filtered, keys sorted)."""
    for uri, is_prefix in units:
        if not is_prefix:
            yield [uri], [uri.rsplit("/", 1)[0]]
            continue
        fs, root = filesystem(uri, storage_options)
        root = root.rstrip("/")
        found = 0
        for page in _pages(fs, root, page_keys):
            paths = [
                to_uri(fs, p)
                for p, size in page
                if not (p.endswith("/") and not size) and _wanted(p[len(root) :].lstrip("/"), extensions, all_files)
            ]
            found += len(paths)
            yield paths, [uri] * len(paths)
        if not found:
            _logger.warning("source %s holds no %sfiles", uri, "" if all_files else "image ")


READ_ATTEMPTS = 5
READ_BACKOFF_S = 0.2
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def read_file(path: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """Read a whole file's bytes, retrying transient failures (throttling, 5xx, dropped connections).

    s3fs and botocore retry first; this adds up to ``READ_ATTEMPTS`` tries
    with exponential backoff and jitter around them. Missing files and
    permission errors are not retried.

    Raises:
        OSError: a permanent failure (incl. ``FileNotFoundError``) or the last transient one.
        Exception: whatever the storage client raised last, after every attempt failed.
    """
    for attempt in range(READ_ATTEMPTS):
        try:
            fs, inner = filesystem(path, storage_options)
            with fs.open(inner, "rb") as handle:
                return handle.read()
        except PERMANENT_ERRORS:
            raise
        except Exception as exc:
            if attempt == READ_ATTEMPTS - 1:
                raise
            delay = READ_BACKOFF_S * 2**attempt * (0.5 + random.random())
            _logger.info("read %s failed (%s: %s); retrying in %.2fs", path, type(exc).__name__, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
