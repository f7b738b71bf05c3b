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
- Local folders are walked by :func:`walk_local`: named pipes, sockets and
  device files are skipped (counted and logged, like hidden entries), links
  to files are scanned, links to folders are followed unless they lead to a
  folder already walked (a loop, or the same folder reached twice), and a
  dangling link is listed so that it becomes an ``unreadable`` row.
- A file name that is not valid UTF-8 keeps its row: its ``path`` escapes each
  byte that is not UTF-8, and every ``%``, as ``%XX`` (so
  ``urllib.parse.unquote_to_bytes(path)`` gives the name's bytes back), and the
  exact bytes travel to the reader in the hidden ``_raw_path`` column.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob as globlib
import logging
import os
import random
import re
import stat
import time
from collections import Counter
from collections.abc import Iterator
from typing import IO, Any, NamedTuple

import pyarrow as pa
from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError

from aidetect_batch import schema
from aidetect_batch.errors import SourceError
from aidetect_batch.storage import filesystem, is_remote, to_uri

# The extensions listed as images; ``--all-files`` sends every file to the decoder instead.
DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "heic", "heif", "avif")

_logger = logging.getLogger(__name__)

_GLOB_CHARS = re.compile(r"[*?\[]")


def _wanted(relative: str, extensions: tuple[str, ...], all_files: bool) -> bool:
    parts = [p for p in relative.split("/") if p]
    if any(p.startswith(".") for p in parts):
        return False
    if all_files:
        return True
    name = (parts[-1] if parts else relative).lower()
    return name.endswith(tuple("." + e for e in extensions))  # a whole suffix, so "tar.gz" matches too


def _list_one(
    source: str, extensions: tuple[str, ...], all_files: bool, *, storage_options: dict[str, Any]
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
                rows += [(p, root) for p, _ in _walk(fs, match, extensions, all_files=all_files)]
            elif _wanted(match.rsplit("/", 1)[-1], extensions, all_files):
                rows.append((to_uri(fs, match), root))
        return rows
    if is_remote(source):
        if _info(fs, path, source)["type"] != "directory":
            return [(to_uri(fs, path), to_uri(fs, path.rsplit("/", 1)[0]))]
        return _walk(fs, path, extensions, all_files=all_files)
    if not os.path.lexists(path):
        raise SourceError(f"source {source!r} does not exist")
    if not os.path.isdir(path):
        return [(path, os.path.dirname(path))]
    return _walk(fs, path, extensions, all_files=all_files)


def _info(fs: Any, path: str, source: str) -> dict[str, Any]:
    """The source's fsspec info; a missing or unreachable source is a :class:`SourceError`."""
    try:
        return fs.info(path)
    except FileNotFoundError:
        raise SourceError(f"source {source!r} does not exist") from None
    except OSError as exc:
        raise SourceError(f"source {source!r} cannot be listed: {exc}") from exc


@dataclasses.dataclass
class LocalWalk:
    """What :func:`walk_local` found under one folder: the files to scan, and what it skipped and why."""

    files: list[str]
    skipped: Counter[str]


def walk_local(root: str, extensions: tuple[str, ...], all_files: bool = False) -> LocalWalk:
    """Walk a local folder without ever opening a file: regular files and dangling links that pass the
    filters, in sorted order. Links to folders are followed once per folder (by device and inode), so a
    link to a parent ends the walk there. Named pipes, sockets and devices are skipped and counted, as are
    folders that cannot be listed."""
    files: list[str] = []
    skipped: Counter[str] = Counter()
    walked = {_folder_key(root)}
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(folder) as scan:
                entries = list(scan)
        except OSError as exc:
            skipped["unlistable folder"] += 1
            _logger.warning("cannot list %r: %s", folder, exc)
            continue
        for entry in entries:
            kind = _entry_kind(entry)
            if kind == "folder" and entry.name[0] != ".":
                key = _folder_key(entry.path)
                if key in walked:
                    skipped["link to a folder already walked"] += 1
                    continue
                walked.add(key)
                pending.append(entry.path)
            elif kind in ("file", "dangling link"):
                if _wanted(entry.name, extensions, all_files):
                    files.append(entry.path)
            elif entry.name[0] != ".":
                skipped[kind] += 1
    files.sort()
    return LocalWalk(files, skipped)


def _folder_key(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "named pipe"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "device"),
    (stat.S_ISBLK, "device"),
    (stat.S_ISDIR, "folder"),
)


def _entry_kind(entry: os.DirEntry[str]) -> str:
    """``folder``, ``file``, ``dangling link`` or the kind of special file, following links."""
    try:
        mode = entry.stat().st_mode
    except OSError:
        return "dangling link" if entry.is_symlink() else "vanished"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISREG(mode):
        return "file"
    return next((name for test, name in _SPECIAL_KINDS if test(mode)), "special file")


def _walk(fs: Any, root: str, extensions: tuple[str, ...], *, all_files: bool) -> list[tuple[str, str]]:
    """``(path, root)`` of every file to scan under a folder or prefix."""
    root = root.rstrip("/")
    root_uri = to_uri(fs, root)
    paths = (
        _walk_remote(fs, root, extensions, all_files)
        if is_remote(root_uri)
        else _walk_folder(root, extensions, all_files)
    )
    if not paths:
        _logger.warning("source %s holds no %sfiles", root_uri, "" if all_files else "image ")
    return [(path, root_uri) for path in paths]


def _walk_folder(root: str, extensions: tuple[str, ...], all_files: bool) -> list[str]:
    walk = walk_local(root, extensions, all_files)
    if walk.skipped:
        skipped = ", ".join(f"{n} {kind}(s)" for kind, n in walk.skipped.items())
        _logger.warning("source %s: skipped %s", escape_path(root)[0], skipped)
    return walk.files


def _walk_remote(fs: Any, root: str, extensions: tuple[str, ...], all_files: bool) -> list[str]:
    paths = []
    for path, info in sorted(fs.find(root, detail=True).items()):
        if info.get("type") == "directory" or (path.endswith("/") and not info.get("size")):
            continue
        if _wanted(path[len(root) :].lstrip("/"), extensions, all_files):
            paths.append(to_uri(fs, path))
    return paths


def list_sources(
    sources: tuple[str, ...],
    extensions: tuple[str, ...],
    *,
    all_files: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> pa.Table:
    """List every file to scan as a table of ``path`` and ``source``, without duplicates.

    Raises:
        SourceError: a source is missing, unlistable, or nothing at all was found.
    """
    seen: dict[str, str] = {}
    for source in sources:
        for path, root in _list_one(source, extensions, all_files, storage_options=storage_options or {}):
            seen.setdefault(path, root)
    if not seen:
        hint = "" if all_files else " (only image extensions are scanned; --all-files sends every file)"
        raise SourceError(f"no files found in {', '.join(sources)}{hint}")
    return paths_table(list(seen), list(seen.values()))


def escape_path(path: str) -> tuple[str, bytes | None]:
    """A name as Arrow can store it, and its raw bytes when it is not valid UTF-8 (else ``None``).

    Python lists such names with surrogate escapes (PEP 383). Each byte that is not UTF-8, and every
    ``%`` of such a name, is written as ``%XX``; valid names are returned unchanged.
    """
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raw = os.fsencode(path)
        text = raw.decode("utf-8", "surrogateescape")
        escaped = "".join(
            f"%{ord(c) - 0xDC00:02X}" if "\udc80" <= c <= "\udcff" else c for c in text.replace("%", "%25")
        )
        return escaped, raw
    return path, None


def paths_table(paths: list[str], roots: list[str]) -> pa.Table:
    """The listing table: ``path`` and ``source``, plus ``_raw_path`` when some name is not valid UTF-8."""
    escaped = [escape_path(p) for p in paths]
    columns = {
        schema.PATH: [e for e, _ in escaped],
        schema.SOURCE: [escape_path(r)[0] for r in roots],
    }
    bad = sum(raw is not None for _, raw in escaped)
    if bad:
        _logger.warning("%d file name(s) are not valid UTF-8: their paths are written with %%XX escapes", bad)
        columns[schema.RAW_PATH] = pa.array([raw for _, raw in escaped], pa.binary())
    return pa.table(columns)


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


def _pages(fs: Any, path: str, page_keys: int) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """``(path, entry)`` of every object under ``path``, one list per listing page, in key order. The
    entry is what the listing says of the object: ``Size``, ``ETag``, ``LastModified`` on S3, fsspec's
    ``info`` elsewhere.

    S3 (anything with s3fs's ``call_s3``) is read with ListObjectsV2 page by page, each request
    retried by s3fs; other filesystems are found in one go.
    """
    if not hasattr(fs, "call_s3"):
        found = fs.find(path, detail=True)
        yield [(p, i) for p, i in sorted(found.items()) if i.get("type") != "directory"]
        return
    bucket, key, _ = fs.split_path(path)
    request = {"Bucket": bucket, "Prefix": key.rstrip("/") + "/" if key else "", "MaxKeys": page_keys}
    while True:
        page = fs.call_s3("list_objects_v2", **request)
        yield [(f"{bucket}/{item['Key']}", item) for item in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


class Page(NamedTuple):
    """One listing page: the paths kept, the source each was found under, and each one's listing entry
    (empty for an object named as a source, which was not listed)."""

    paths: list[str]
    roots: list[str]
    entries: list[dict[str, Any]]


def iter_listing(
    units: list[tuple[str, bool]],
    extensions: tuple[str, ...],
    all_files: bool = False,
    *,
    storage_options: dict[str, Any] | None = None,
    page_keys: int = LIST_PAGE_KEYS,
) -> Iterator[Page]:
    """Yield one :class:`Page` at a time, with the same rules and order as :func:`list_sources`
    (hidden entries, folder markers and extensions filtered, keys sorted)."""
    for uri, is_prefix in units:
        if not is_prefix:
            yield Page([uri], [uri.rsplit("/", 1)[0]], [{}])
            continue
        fs, root = filesystem(uri, storage_options)
        root = root.rstrip("/")
        found = 0
        for page in _pages(fs, root, page_keys):
            kept = [
                (to_uri(fs, p), entry)
                for p, entry in page
                if not (p.endswith("/") and not _size(entry))
                and _wanted(p[len(root) :].lstrip("/"), extensions, all_files)
            ]
            found += len(kept)
            yield Page([p for p, _ in kept], [uri] * len(kept), [e for _, e in kept])
        if not found:
            _logger.warning("source %s holds no %sfiles", uri, "" if all_files else "image ")


def _size(entry: dict[str, Any]) -> int:
    return entry.get("Size", entry.get("size")) or 0


READ_ATTEMPTS = 5
READ_BACKOFF_S = 0.2


class NotRegularFile(OSError):
    """A named pipe, socket or device: never opened for reading, since a pipe blocks forever."""


class FileTooLarge(OSError):
    """A file over the size cap, found from its size before any byte is read."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"file is {size / 2**20:.1f} MiB, over the {limit / 2**20:.0f} MiB cap (--max-file-mb)")
        self.size = size

    def __reduce__(self) -> tuple[Any, ...]:
        """Rebuilt from its message and size, whatever its (or a subclass's) ``__init__`` takes: it crosses the
        decode watchdog's pipe when an archive member is over a cap."""
        return _too_large, (type(self), str(self), self.size)


def _too_large(cls: type[FileTooLarge], message: str, size: int | None) -> FileTooLarge:
    exc = cls.__new__(cls, message)
    OSError.__init__(exc, message)
    exc.size = size
    return exc


PERMANENT_ERRORS = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    NotRegularFile,
    FileTooLarge,
)


TIMEOUT_ERRORS = (TimeoutError, ConnectTimeoutError, ReadTimeoutError)


# Block of a file read by ranges (a video over --max-file-mb): one request per seek, a few per sampled frame.
RANGED_BLOCK_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True)
class Ranged:
    """A file over ``--max-file-mb`` that is read by ranges where its reader seeks, never whole (a long video,
    of which a few frames are sampled): its URI, its size, and how to open it."""

    uri: str
    size: int
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    raw_path: bytes | None = None


@contextlib.contextmanager
def open_ranged(ranged: Ranged) -> Iterator[IO[bytes]]:
    """``ranged`` as a seekable binary file: local, or remote through fsspec in blocks of
    :data:`RANGED_BLOCK_BYTES`, so a seek costs one ranged request and no more than a block is fetched ahead."""
    if not is_remote(ranged.uri):
        with open(ranged.raw_path or filesystem(ranged.uri)[1], "rb") as handle:
            yield handle
        return
    fs, inner = filesystem(ranged.uri, ranged.storage_options)
    with fs.open(inner, "rb", block_size=RANGED_BLOCK_BYTES, cache_type="readahead") as handle:
        yield handle


def read_file(
    path: str,
    storage_options: dict[str, Any] | None = None,
    *,
    max_bytes: int | None = None,
    raw_path: bytes | None = None,
) -> bytes:
    """Read a whole file's bytes, retrying transient failures (throttling, 5xx, dropped connections).

    The size is checked before any byte is read: ``fstat`` of a local file opened without blocking, or
    the object size s3fs fetches when it opens a remote one. ``raw_path`` is a local name's exact bytes
    when ``path`` is its escaped form (:func:`escape_path`). s3fs and botocore retry first (a stalled
    request ends at ``storage.READ_TIMEOUT_S``); this adds up to ``READ_ATTEMPTS`` tries with exponential
    backoff and jitter around them. Missing files, permission errors, special files and files over
    ``max_bytes`` are not retried.

    Raises:
        FileTooLarge: the file is larger than ``max_bytes``.
        NotRegularFile: a named pipe, socket or device.
        OSError: another permanent failure (incl. ``FileNotFoundError``) or the last transient one.
        Exception: whatever the storage client raised last, after every attempt failed.
    """
    for attempt in range(READ_ATTEMPTS):
        try:
            if not is_remote(path):
                return _read_local(raw_path or filesystem(path)[1], max_bytes)
            fs, inner = filesystem(path, storage_options)
            with fs.open(inner, "rb") as handle:
                _check_size(getattr(handle, "size", None), max_bytes)
                return handle.read()
        except PERMANENT_ERRORS:
            raise
        except TIMEOUT_ERRORS:
            raise  # the storage client has already retried the stalled request
        except Exception as exc:
            if attempt == READ_ATTEMPTS - 1:
                raise
            delay = READ_BACKOFF_S * 2**attempt * (0.5 + random.random())
            _logger.info("read %s failed (%s: %s); retrying in %.2fs", path, type(exc).__name__, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _read_local(path: str | bytes, max_bytes: int | None) -> bytes:
    """Read a local file. ``stat`` first (a socket cannot even be opened), then a non-blocking open and
    ``fstat`` of what was opened, so a pipe or an oversized file is never read, even if swapped in between."""
    _check_local(os.stat(path), max_bytes)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as handle:
        _check_local(os.fstat(fd), max_bytes)
        return handle.read()


def _check_local(found: os.stat_result, max_bytes: int | None) -> None:
    if not stat.S_ISREG(found.st_mode):
        kind = next((name for test, name in _SPECIAL_KINDS if test(found.st_mode)), "special file")
        raise NotRegularFile(f"not a regular file: a {kind}")
    _check_size(found.st_size, max_bytes)


def _check_size(size: int | None, max_bytes: int | None) -> None:
    if max_bytes is not None and size is not None and size > max_bytes:
        raise FileTooLarge(size, max_bytes)
