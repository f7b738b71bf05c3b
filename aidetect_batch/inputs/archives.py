"""What the archive kinds (:mod:`.zips`, :mod:`.tars`) share: which members they admit, how a member is named
and read under the caps, and the failures a hostile archive becomes.

Nothing is ever extracted: a member's name (``../x.jpg``, ``/etc/x.jpg``) is only a label. A member's size
is counted while its bytes are read, never taken from its header.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections import Counter
from collections.abc import Iterator
from typing import IO, Any

from aidetect_batch.inputs import item, sources
from aidetect_batch.storage import filesystem, is_remote

# Extensions of the units the archive kinds take; ``.tar.gz`` is matched as a whole suffix.
ZIP_EXTENSIONS = ("zip",)
TAR_EXTENSIONS = ("tar", "tar.gz", "tgz")
EXTENSIONS = (*ZIP_EXTENSIONS, *TAR_EXTENSIONS)

# Most member bytes one decode batch may hold, shared by its archives. The CPU stage returns a batch's rows in
# one table, so every member read is held at once; past this budget the rest of an archive becomes one
# too_large row instead of an out-of-memory worker. Streaming partial tables would lift it.
BATCH_BUDGET_BYTES = 2 << 30
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


class OverBudget(sources.FileTooLarge):
    """The members read so far fill the archive's memory budget: the rest of it is one ``too_large`` row."""

    def __init__(self, size: int, budget: int) -> None:
        OSError.__init__(self, f"{size} bytes of members read, over the {budget >> 20} MiB one decode batch may hold")
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
        return unit.member is None and has_extension(unit.uri, self.extensions)


def has_extension(name: str, extensions: tuple[str, ...]) -> bool:
    """Whether ``name`` ends with one of ``extensions`` (``tar.gz`` included), ignoring case."""
    return name.lower().endswith(tuple("." + e for e in extensions))


def admitted(name: str, options: item.ContainerOptions) -> bool:
    """Whether a regular member is scanned: by the extension rule, or every one with ``--all-files``."""
    return options.extensions is None or has_extension(name, options.extensions)


def member_name(name: str) -> str:
    """A member's name as a column holds it; bytes that are not UTF-8 (surrogate-escaped) as ``%XX``."""
    return sources.escape_path(name)[0]


def nested(name: str, depth: int) -> item.NotExpanded | None:
    """Why an archive member is not expanded at this depth, or ``None`` for an ordinary member."""
    if not has_extension(name, EXTENSIONS):
        return None
    return item.NotExpanded(f"archive inside an archive is not expanded beyond --archive-depth {depth}")


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
def open_unit(unit: item.Item, options: item.ReadOptions, **remote: Any) -> Iterator[IO[bytes]]:
    """The archive as a seekable binary file: local, or through fsspec (ranged reads on ``s3://``), opened
    with the ``remote`` options (a Parquet file turns fsspec's read-ahead off)."""
    if is_remote(unit.uri):
        fs, inner = filesystem(unit.uri, options.storage_options)
        with fs.open(inner, "rb", **remote) as handle:
            yield handle
        return
    path: Any = unit.raw_path or filesystem(unit.uri)[1]
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise sources.NotRegularFile(f"{unit.uri} is not a regular file")
    with open(path, "rb") as handle:
        yield handle


class Tally:
    """Members skipped (directories, links, devices) and admitted members beyond ``--max-members``."""

    def __init__(self, unit: item.Item, options: item.ReadOptions) -> None:
        self.unit, self.cap = unit, options.containers.max_members
        self.budget = options.budget or item.Budget(BATCH_BUDGET_BYTES)
        self.skipped: Counter[str] = Counter()
        self.admitted = 0

    def take(self) -> bool:
        """Count one admitted member; whether it is within the cap (and so read)."""
        self.admitted += 1
        return self.admitted <= self.cap

    def spend(self, read: item.Read) -> item.Read:
        """Count a member's bytes against the archive's memory budget; over it, raise :class:`OverBudget`."""
        if not self.budget.spend(len(read.data or b"")):
            raise OverBudget(self.budget.held, self.budget.limit)
        return read

    def close(self) -> Iterator[item.Read]:
        """Log what was skipped; the unit's row when members were over the cap."""
        if self.skipped:
            _logger.info("%s: skipped %s", self.unit.uri, dict(self.skipped))
        beyond = self.admitted - self.cap
        if beyond > 0:
            _logger.warning("%s: %d members beyond --max-members %d not scanned", self.unit.uri, beyond, self.cap)
            yield item.Read(self.unit, failure=TooManyMembers(beyond, self.cap))
