"""What the archive kinds (:mod:`.zips`, :mod:`.tars`) share: which members they admit, how a member is named
and read under the caps, and the failures a hostile archive becomes.

Nothing is ever extracted: a member's name (``../x.jpg``, ``/etc/x.jpg``) is only a label. A member's size
is counted while its bytes are read, never taken from its header.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import stat
from collections import Counter
from collections.abc import Callable, Iterator
from typing import IO, Any

from aidetect_batch.inputs import item, sources
from aidetect_batch.storage import filesystem, is_remote

# Extensions of the units the archive kinds take; ``.tar.gz`` is matched as a whole suffix.
ZIP_EXTENSIONS = ("zip",)
TAR_EXTENSIONS = ("tar", "tar.gz", "tgz")
EXTENSIONS = (*ZIP_EXTENSIONS, *TAR_EXTENSIONS)

# Below this many decompressed bytes the ratio cap is not applied: small, flat files compress far and are harmless.
RATIO_FLOOR_BYTES = 1 << 20
_CHUNK = 1 << 20

_logger = logging.getLogger(__name__)


class EncryptedMember(PermissionError):
    """An encrypted member: the scanner has no password, so the row is ``unreadable``."""


class CompressionBomb(sources.FileTooLarge):
    """A member (or a compressed stream) that inflates past ``--max-ratio``: ``too_large``."""

    def __init__(self, size: int, ratio: float) -> None:
        OSError.__init__(self, f"decompresses over {ratio:g}:1 after {size} bytes (--max-ratio): a zip bomb?")
        self.size = size


class TooManyMembers(sources.FileTooLarge):
    """The unit's row when it holds more admitted members than ``--max-members``: ``too_large``."""

    def __init__(self, beyond: int, cap: int) -> None:
        OSError.__init__(self, f"{beyond} members beyond the first {cap} were not scanned (--max-members)")
        self.size = None


class ArchiveKind:
    """What both archive kinds are: a whole listed unit with one of their extensions, one view per member."""

    extensions: tuple[str, ...] = ()
    views = False

    def accepts(self, unit: item.Item) -> bool:
        return unit.member is None and has_extension(item.leaf(unit.uri), self.extensions)


def has_extension(name: str, extensions: tuple[str, ...]) -> bool:
    """Whether ``name`` ends with one of ``extensions`` (``tar.gz`` included), ignoring case."""
    return name.lower().endswith(tuple("." + e for e in extensions))


def admitted(name: str, options: item.ContainerOptions) -> bool:
    """Whether a regular member is scanned: by the extension rule, or every one with ``--all-files``."""
    return options.extensions is None or has_extension(name, options.extensions)


def member_name(name: str) -> str:
    """A member's name as a column holds it; bytes that are not UTF-8 (surrogate-escaped) as ``%XX``."""
    return sources.escape_path(name)[0]


def is_archive(name: str) -> bool:
    """Whether a member is itself an archive, by its name."""
    return has_extension(name, EXTENSIONS)


def expand(found: item.Item, data: Callable[[], bytes], options: item.ReadOptions) -> Iterator[item.Read]:
    """The rows of ``found``, an archive inside an archive: its own members, read from its bytes (``data``,
    read under the caps) one level further down, or one row for it when ``--archive-depth`` stops here or
    it cannot be read. Its members' paths chain: ``zip://a.jpg::zip://inner.zip::/data/outer.tar``."""
    depth = options.containers.depth
    if depth <= 0:
        yield item.Read(found, failure=item.NotExpanded("archive nested deeper than --archive-depth"))
        return
    inner = item.Item(found.path)
    deeper = dataclasses.replace(options, containers=dataclasses.replace(options.containers, depth=depth - 1))
    rows = 0
    try:
        for read in item.kind_of(inner).read_all(inner, deeper, data=data()):  # type: ignore[attr-defined]
            rows += 1
            yield read
        if not rows:
            raise item.NoItems("archive member holds no items")
    except Exception as exc:  # noqa: BLE001 - a bad inner archive is its own row; the outer one goes on
        yield item.Read(found, failure=exc)


def read_capped(handle: IO[bytes], options: item.ReadOptions, *, compressed: int | None = None) -> bytes:
    """Read a member's bytes, counting them: over ``--max-file-mb``, or over ``--max-ratio`` times its
    ``compressed`` size, it stops and raises (``too_large``)."""
    chunks: list[bytes] = []
    size = 0
    ratio = options.containers.max_ratio
    while chunk := handle.read(_CHUNK):
        size += len(chunk)
        options.check_size(size)
        if compressed is not None and size > RATIO_FLOOR_BYTES and size > ratio * max(compressed, 1):
            raise CompressionBomb(size, ratio)
        chunks.append(chunk)
    return b"".join(chunks)


@contextlib.contextmanager
def open_unit(
    unit: item.Item, options: item.ReadOptions, data: bytes | None = None, **remote: Any
) -> Iterator[IO[bytes]]:
    """The archive as a seekable binary file: local, through fsspec (ranged reads on ``s3://``) opened with the
    ``remote`` options (a Parquet file turns fsspec's read-ahead off), or from its bytes (``data``, or read back
    when the archive is itself a member)."""
    if data is None and item.parse(unit.uri).member is not None:
        data = item.read_path(unit.uri, options)  # type: ignore[assignment]
    if data is not None:
        yield io.BytesIO(data)
        return
    if is_remote(unit.uri):
        fs, inner = filesystem(unit.uri, options.storage_options)
        with fs.open(inner, "rb", **remote) as handle:
            _check_not_empty(unit, getattr(handle, "size", None))
            yield handle
        return
    path: Any = unit.raw_path or filesystem(unit.uri)[1]
    found = os.stat(path)
    if not stat.S_ISREG(found.st_mode):
        raise sources.NotRegularFile(f"{unit.uri} is not a regular file")
    _check_not_empty(unit, found.st_size)
    with open(path, "rb") as handle:
        yield handle


def _check_not_empty(unit: item.Item, size: int | None) -> None:
    """A zero-byte archive or Parquet file is ``empty``, as a zero-byte loose file is."""
    if size == 0:
        raise item.NoItems(f"{unit.uri} has zero bytes")


def nth(members: Iterator[tuple[str, Any]], found: item.Item) -> Any:
    """The entry of ``members`` (regular ones, as ``(name, entry)`` in archive order) that ``found`` names."""
    seen = 0
    for name, entry in members:
        if name == found.member:
            seen += 1
            if seen == found.occurrence:
                return entry
    raise FileNotFoundError(f"no member {found.member!r} (occurrence {found.occurrence}) in {found.uri}")


class Tally:
    """Members skipped (directories, links, devices) and admitted members beyond ``--max-members``."""

    def __init__(self, unit: item.Item, options: item.ReadOptions) -> None:
        self.unit, self.cap = unit, options.containers.max_members
        self.skipped: Counter[str] = Counter()
        self.admitted = 0
        self.names: Counter[str] = Counter()

    def name(self, kind: str, member: str) -> item.Item:
        """The Item of the next regular member called ``member``: its occurrence counts earlier ones."""
        self.names[member] += 1
        return self.unit.at(kind, member, self.names[member])

    def take(self) -> bool:
        """Count one admitted member; whether it is within the cap (and so read)."""
        self.admitted += 1
        return self.admitted <= self.cap

    def close(self) -> Iterator[item.Read]:
        """Log what was skipped; the unit's row when members were over the cap."""
        if self.skipped:
            _logger.info("%s: skipped %s", self.unit.uri, dict(self.skipped))
        beyond = self.admitted - self.cap
        if beyond > 0:
            _logger.warning("%s: %d members beyond --max-members %d not scanned", self.unit.uri, beyond, self.cap)
            yield item.Read(self.unit, failure=TooManyMembers(beyond, self.cap))
