"""Zip archives as inputs: each admitted member is one Item, ``zip://<member>::<archive uri>``.

A zip is read by random access from its central directory, so on ``s3://`` only the directory and the
members' own byte ranges are fetched (fsspec file objects do ranged reads).
"""

from __future__ import annotations

import stat
import zipfile
from collections.abc import Iterator
from typing import IO

from aidetect_batch.inputs import archives, item

# Entries a central directory may list, as a multiple of --max-members, before it is parsed at all: zipfile
# holds every entry in memory (hundreds of bytes each), so a directory of ten million entries is refused.
DIRECTORY_FACTOR = 10
# Bytes of one central-directory entry with a typical name: a directory's size over this counts as entries.
DIRECTORY_ENTRY_BYTES = 128


def check_directory(handle: IO[bytes], options: item.ReadOptions) -> None:
    """Refuse (``too_large``) a zip whose end record lists far more entries than ``--max-members`` reads."""
    # zipfile's own end-record reader (zip64 included); it is private, but stable since Python 2.
    end = zipfile._EndRecData(handle)  # type: ignore[attr-defined]
    if end is None:
        return
    cap = DIRECTORY_FACTOR * options.containers.max_members
    entries = end[zipfile._ECD_ENTRIES_TOTAL]  # type: ignore[attr-defined]
    # zipfile reads as many bytes as the record says the directory holds, whatever count it gives.
    entries = max(entries, end[zipfile._ECD_SIZE] // DIRECTORY_ENTRY_BYTES)  # type: ignore[attr-defined]
    if entries > cap:
        raise HugeDirectory(entries, cap)


class HugeDirectory(archives.TooManyMembers):
    """A central directory too large to parse: the zip's one row is ``too_large`` and no member is read."""

    def __init__(self, entries: int, cap: int) -> None:
        OSError.__init__(self, f"central directory holds {entries} entries, over {cap} (10 x --max-members): not read")
        self.size = None


def _name(info: zipfile.ZipInfo) -> str:
    """The member's name; a name without the UTF-8 flag that is not UTF-8 either keeps its bytes as ``%XX``."""
    if info.flag_bits & 0x800:
        return archives.member_name(info.filename)
    raw = info.filename.encode("cp437")
    return archives.member_name(raw.decode("utf-8", "surrogateescape"))


def _skipped(info: zipfile.ZipInfo) -> str | None:
    """Why a member is not a regular file (directory, symlink, device), from its Unix mode when it has one."""
    if info.is_dir():
        return "directory"
    mode = info.external_attr >> 16
    if mode and stat.S_ISLNK(mode):
        return "symlink"
    if mode and not stat.S_ISREG(mode) and stat.S_IFMT(mode):
        return "device or special file"
    return None


def _read(archive: zipfile.ZipFile, info: zipfile.ZipInfo, options: item.ReadOptions) -> bytes:
    if info.flag_bits & 0x1:
        raise archives.EncryptedMember("encrypted zip member (no password is given)")
    with archive.open(info) as handle:
        return archives.read_capped(handle, options, compressed=info.compress_size)


class Zip(archives.ArchiveKind):
    """``*.zip``: members by random access from the central directory."""

    name = "zip"
    extensions = archives.ZIP_EXTENSIONS

    def items(self, unit: item.Item, options: item.ReadOptions) -> list[item.Item]:
        return [read.item for read in self.read_all(unit, options, read=False)]

    def read(self, found: item.Item, options: item.ReadOptions) -> bytes:
        with archives.open_unit(found, options) as handle, zipfile.ZipFile(handle) as archive:
            regular = ((_name(info), info) for info in archive.infolist() if _skipped(info) is None)
            return _read(archive, archives.nth(regular, found), options)

    def read_all(
        self, unit: item.Item, options: item.ReadOptions, *, read: bool = True, data: bytes | None = None
    ) -> Iterator[item.Read]:
        """Every admitted member in central-directory order, read one at a time; an archive member is
        expanded in place (:func:`archives.expand`). ``data``: the zip's bytes, when it is itself a member."""
        tally = archives.Tally(unit, options)
        with archives.open_unit(unit, options, data) as handle:
            check_directory(handle, options)
            handle.seek(0)
            archive = zipfile.ZipFile(handle)
            yield from self._members(archive, tally, options, read=read)
        yield from tally.close()

    def _members(
        self, archive: zipfile.ZipFile, tally: archives.Tally, options: item.ReadOptions, *, read: bool
    ) -> Iterator[item.Read]:
        with archive:
            for info in archive.infolist():
                why = _skipped(info)
                if why is not None:
                    tally.skipped[why] += 1
                elif archives.admitted(info.filename, options.containers) and tally.take():
                    found = tally.name(self.name, _name(info))
                    if read and archives.is_archive(info.filename):
                        yield from archives.expand(found, lambda info=info: _read(archive, info, options), options)
                    else:
                        yield self._member(archive, info, found, options, read=read)

    def _member(
        self,
        archive: zipfile.ZipFile,
        info: zipfile.ZipInfo,
        found: item.Item,
        options: item.ReadOptions,
        *,
        read: bool,
    ) -> item.Read:
        if not read:
            return item.Read(found)
        try:
            return item.Read(found, _read(archive, info, options))
        except Exception as exc:  # noqa: BLE001 - a corrupt member (lzma, struct, ...) is its own row, not the rest's
            return item.Read(found, failure=exc)
