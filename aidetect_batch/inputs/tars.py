"""Tar archives (``.tar``, ``.tar.gz``, ``.tgz``) as inputs: each admitted member is one Item,
``tar://<member>::<archive uri>``.

A tar is streamed once, start to end, in the task that scans it (:meth:`Tar.read_all`): never indexed
per member and never extracted. WebDataset shards are tars whose members share a sample key
(``dir/000123.jpg``, ``dir/000123.txt``, ``dir/000123.json``, written next to each other): an image
member's row carries its key, the ``.txt`` caption and the ``.json`` ``url``. Reopening one member
(:meth:`Tar.read`, for thumbnails) streams the tar up to it.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from typing import IO, Any

from aidetect_batch import schema
from aidetect_batch.inputs import archives, item, sources

# Most bytes of a WebDataset ``.txt`` or ``.json`` sibling read for its columns.
SIDECAR_BYTES = 1 << 20
STREAM_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


class _Counting:
    """A file object that counts the (compressed) bytes read through it, for the stream's ratio cap."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle, self.count = handle, 0

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.count += len(data)
        return data


def sample_key(name: str) -> tuple[str, str]:
    """A WebDataset member's sample key and extension: the base name splits at its first dot."""
    folder, base = posixpath.split(name)
    stem, _, extension = base.partition(".")
    return posixpath.join(folder, stem), extension.lower()


class _Sample:
    """The members of one sample key seen so far: image rows wait for their caption and url."""

    def __init__(self, key: str | None) -> None:
        self.key = key
        self.rows: list[item.Read] = []
        self.columns: dict[str, Any] = {}
        self.siblings = 0

    def take_sidecar(self, extension: str, data: bytes) -> None:
        self.siblings += 1
        text = data.decode("utf-8", "replace")
        if extension == "txt":
            self.columns[schema.WDS_CAPTION] = text
        elif extension == "json":
            try:
                found = json.loads(text)
            except ValueError:
                return
            if isinstance(found, dict) and found.get("url") is not None:
                self.columns[schema.WDS_URL] = str(found["url"]).encode("utf-8", "replace").decode("utf-8")

    def flush(self) -> Iterator[item.Read]:
        """The rows held so far, with the sample's columns as they stand; the sample keeps its columns."""
        shared = {**self.columns, schema.WDS_KEY: self.key} if self.siblings else {}
        rows, self.rows = self.rows, []
        for read in rows:
            yield item.Read(read.item, read.data, read.failure, {**read.columns, **shared})


def _stream(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """A streamed tar's members; tarfile keeps every header it passes, so each is dropped once passed and
    memory does not grow with the member count."""
    for member in tar:
        yield member
        tar.members = []


class Tar(archives.ArchiveKind):
    """``*.tar``, ``*.tar.gz``, ``*.tgz``: members streamed in one sequential pass."""

    name = "tar"
    extensions = archives.TAR_EXTENSIONS

    def items(self, unit: item.Item, options: item.ReadOptions) -> list[item.Item]:
        return [read.item for read in self.read_all(unit, options)]

    def read(self, found: item.Item, options: item.ReadOptions) -> bytes:
        with archives.open_unit(found, options) as handle, self._open(handle) as tar:
            regular = ((archives.member_name(m.name), m) for m in _stream(tar) if m.isreg())
            return archives.read_capped(tar.extractfile(archives.nth(regular, found)), options)

    def read_all(self, unit: item.Item, options: item.ReadOptions, *, data: bytes | None = None) -> Iterator[item.Read]:
        """Every admitted member in stream order, each read as the stream passes it; an archive member is
        expanded in place (:func:`archives.expand`). ``data``: the tar's bytes, when it is itself a member."""
        tally = archives.Tally(unit, options)
        sample = _Sample(None)
        with archives.open_unit(unit, options, data) as handle:
            counted = _Counting(handle)
            try:
                with self._open(counted) as tar:
                    for member in _stream(tar):
                        key = sample_key(archives.member_name(member.name))[0]
                        if key != sample.key:
                            yield from sample.flush()
                            sample = _Sample(key)
                        self._check_ratio(member, counted, options)
                        yield from self._take(tar, member, sample=sample, tally=tally, options=options)
            except STREAM_ERRORS:
                yield from sample.flush()
                raise
        yield from sample.flush()
        yield from tally.close()

    def _take(
        self,
        tar: tarfile.TarFile,
        member: tarfile.TarInfo,
        *,
        sample: _Sample,
        tally: archives.Tally,
        options: item.ReadOptions,
    ) -> Iterator[item.Read]:
        """Read one member into its sample: an admitted image as a row, a caption or metadata as columns.
        Rows leave as soon as they can: a sample's earlier image rows when another image of its key arrives
        (``frame.0001.jpg``, ``frame.0002.jpg`` share the key ``frame``), an inner archive's rows at once."""
        extension = sample_key(member.name)[1]
        if not member.isreg():
            tally.skipped["directory" if member.isdir() else "link or special file"] += 1
        elif archives.admitted(member.name, options.containers):
            if tally.take():
                yield from sample.flush()
                found = tally.name(self.name, archives.member_name(member.name))
                if archives.is_archive(member.name):
                    stream = tar.extractfile(member)
                    yield from archives.expand(found, lambda: archives.read_capped(stream, options), options)
                else:
                    sample.rows.append(self._member(tar, member, found, options))
        elif extension in ("txt", "json") and member.size <= SIDECAR_BYTES:
            sample.take_sidecar(extension, tar.extractfile(member).read(SIDECAR_BYTES))
        elif extension in ("txt", "json", "cls"):
            sample.siblings += 1

    @staticmethod
    def _member(
        tar: tarfile.TarFile, member: tarfile.TarInfo, found: item.Item, options: item.ReadOptions
    ) -> item.Read:
        try:
            return item.Read(found, archives.read_capped(tar.extractfile(member), options))
        except sources.FileTooLarge as exc:
            return item.Read(found, failure=exc)

    @staticmethod
    def _check_ratio(member: tarfile.TarInfo, counted: _Counting, options: item.ReadOptions) -> None:
        """A compressed stream that inflates past ``--max-ratio`` stops here: the rest is one ``too_large`` row."""
        inflated = member.offset_data + member.size
        ratio = options.containers.max_ratio
        if inflated > archives.RATIO_FLOOR_BYTES and inflated > ratio * max(counted.count, 1):
            raise archives.CompressionBomb(inflated, ratio)

    @staticmethod
    def _open(handle: Any) -> tarfile.TarFile:
        return tarfile.open(fileobj=handle, mode="r|*", encoding="utf-8", errors="surrogateescape")
