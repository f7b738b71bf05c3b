"""What an input is: an :class:`Item` (a row of the scores), and the input kinds that turn a listed unit into Items.

A listed unit is one row of the listing (a file or object URI). Its :class:`Kind` decides which Items it
yields: the loose file yields itself, an archive would yield one Item per member, and a kind may hand
several views of one Item to the Classifier (video frames, scored as one row the way ``tiles`` are).
Every Item has one identity, :attr:`Item.path`, written in the ``path`` column: the URI of a loose file,
or ``<kind>://<member>::<uri>`` for a member of a container (fsspec's chained-URL form, e.g.
``zip://inner/a.jpg::s3://bucket/x.zip``). :func:`parse` reads that identity back, so the report, dedup
and resume reach an Item's bytes or its unit without knowing its kind.

Kinds are registered in this module (:func:`register`); the first registered kind that accepts a unit
expands it, and the loose file takes every unit no other kind accepts. A scan snapshots the registry
on the driver (:func:`registered`) and ships it to its decode tasks, so a kind registered before the
scan starts is used by every worker.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa
import pyarrow.compute as pc

from aidetect_batch import schema
from aidetect_batch.inputs import sources

# Hidden column the decode stage adds: on the last row of each listed unit, how many rows that unit
# yielded (1 for a loose file); 0 on the unit's other rows. The sink counts a shard's units with it.
UNIT_ROWS = "_unit_rows"

_logger = logging.getLogger(__name__)
# Listed units of a kind whose footers are read on the driver to find the columns they carry.
COLUMN_PROBES = 8

_MEMBER_PATH = re.compile(r"^([a-z][a-z0-9+.-]*)://(.*?)(?::([0-9]+))?::(.+)$", re.DOTALL)


class NoItems(ValueError):
    """A listed unit that holds no Item (an empty archive): it still gets one row, with status ``empty``."""


class NotExpanded(ValueError):
    """An Item this scan does not open (an archive nested deeper than ``--archive-depth``): ``unsupported``."""


@dataclasses.dataclass(frozen=True)
class ContainerOptions:
    """How a container kind (an archive, a Parquet dataset) expands a unit.

    Attributes:
        extensions: Lower-case extensions of the members it admits; ``None``: every regular member (``--all-files``).
        max_members: Admitted members read per unit; those beyond are counted and the unit gets a row saying so.
        max_ratio: Most decompressed bytes per compressed byte before a member (or stream) is a bomb.
        depth: How many levels of archives inside an archive are expanded; one below that is ``unsupported``.
        image_column: The Parquet column of image bytes (``--image-column``); ``None``: the dataset's own
            Hugging Face ``Image`` feature.
        carried: The output fields of the columns a kind carries through (:func:`carried_fields`, found on the
            driver, so every shard's rows have one schema); ``None`` where they are not known (a streamed
            listing): nothing is carried.
    """

    extensions: tuple[str, ...] | None = None
    max_members: int = 100_000
    max_ratio: float = 100.0
    depth: int = 1
    image_column: str | None = None
    carried: tuple[pa.Field, ...] | None = None


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """How bytes are read: fsspec options for remote URIs, the size cap (``--max-file-mb``; ``None``: none)
    and the archive limits."""

    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_bytes: int | None = None
    containers: ContainerOptions = ContainerOptions()

    def check_size(self, size: int) -> None:
        """Raise :class:`sources.FileTooLarge` when ``size`` bytes are over the cap (a kind's members use it)."""
        if self.max_bytes is not None and size > self.max_bytes:
            raise sources.FileTooLarge(size, self.max_bytes)


@dataclasses.dataclass(frozen=True)
class Item:
    """One input, scored as one row.

    Attributes:
        uri: The listed unit it comes from: a file or object URI, as the listing wrote it.
        member: Where inside the unit (an archive member, a frame locator); ``None`` for the whole unit.
        kind: Name of the :class:`Kind` that reads it.
        raw_path: A local name's exact bytes when ``uri`` is its ``%XX``-escaped form (:func:`sources.escape_path`).
        occurrence: Which member of that name it is, counting from 1: an archive may hold one name twice (a tar
            appended to, or two names that escape alike), and each must reopen exactly.
    """

    uri: str
    member: str | None = None
    kind: str = "file"
    raw_path: bytes | None = None
    occurrence: int = 1

    @property
    def path(self) -> str:
        """The row's identity: ``uri`` for a whole unit, ``<kind>://<member>::<uri>`` for a member, and
        ``<kind>://<member>:<n>::<uri>`` for the n-th member of one name (a member's own ``:`` is escaped)."""
        if self.member is None:
            return self.uri
        suffix = f":{self.occurrence}" if self.occurrence > 1 else ""
        return f"{self.kind}://{_escape(self.member)}{suffix}::{self.uri}"

    def at(self, kind: str, member: str, occurrence: int = 1) -> Item:
        """The Item ``member`` of this unit (its ``occurrence``-th of that name), read by the kind ``kind``."""
        return dataclasses.replace(self, member=member, kind=kind, occurrence=occurrence)


@dataclasses.dataclass(frozen=True)
class Read:
    """One row a kind's :meth:`Kind.read_all` yields: an Item and its bytes, or why it has none.

    Attributes:
        item: The row's Item (a member, or the unit itself for a row about the whole unit).
        data: The Item's bytes, read under the size cap.
        failure: Why it has no bytes; it becomes the row's status as a read error does.
        columns: Per-row values of scores columns the kind fills (a WebDataset sample's caption).
    """

    item: Item
    data: bytes | None = None
    failure: BaseException | None = None
    columns: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _escape(member: str) -> str:
    """``%`` and ``:`` as ``%25`` and ``%3A``, so the first ``::`` of a path always ends its member."""
    return member.replace("%", "%25").replace(":", "%3A")


def _unescape(member: str) -> str:
    return member.replace("%3A", ":").replace("%25", "%")


@runtime_checkable
class Kind(Protocol):
    """An input kind: which units it takes, which Items a unit holds, and how an Item's bytes are read.

    ``items`` and ``read`` raise on bad data (``OSError``, ``ValueError``, ...): the decode stage turns
    the exception into the unit's or the Item's status, exactly as it does for a loose file's read.
    ``read`` returns one encoded image, or, when ``views`` is true, possibly a list of them: several views
    of one Item, scored as one row. A scan that may meet such a kind carries every row's views as tiles,
    since Ray Data may put rows of different blocks into one Classifier batch.

    A kind may also define ``read_all(unit, options) -> Iterator[Read]``: every row of the unit with its
    bytes, in one pass (a tar is streamed once, never re-read per member). The decode stage then uses it
    instead of ``items`` and ``read``; an exception it raises after some rows keeps them and adds one row
    for the rest of the unit, with the unit's own URI as ``path``.

    A kind whose rows carry columns of their own (a Parquet dataset's) defines ``columns(unit, options) ->
    list[pa.Field]``: their output fields, read from one unit (its footer) on the driver, which adds them to
    the scores schema (:func:`carried_fields`) and hands them back in ``options.containers.carried``;
    ``read_all`` then fills :attr:`Read.columns` with those names.
    """

    name: str
    views: bool
    # Lower-case extensions of the units it takes: a folder walk lists them without ``--all-files``.
    extensions: tuple[str, ...]

    def accepts(self, unit: Item) -> bool:
        """Whether this kind reads the listed unit (e.g. from its extension)."""
        ...

    def items(self, unit: Item, options: ReadOptions) -> list[Item]:
        """The Items the unit holds, in a stable order (one per row of the scores)."""
        ...

    def read(self, item: Item, options: ReadOptions) -> bytes | list[bytes]:
        """The Item's bytes, under ``options.max_bytes``."""
        ...


class LooseFile:
    """A file or object scanned whole: the unit is its only Item, read by :func:`sources.read_file`."""

    name = "file"
    views = False
    extensions: tuple[str, ...] = ()

    def accepts(self, unit: Item) -> bool:
        return True

    def items(self, unit: Item, options: ReadOptions) -> list[Item]:
        return [dataclasses.replace(unit, kind=self.name)]

    def read(self, item: Item, options: ReadOptions) -> bytes:
        return sources.read_file(item.uri, options.storage_options, max_bytes=options.max_bytes, raw_path=item.raw_path)


LOOSE_FILE = LooseFile()


def is_loose(kind: Kind) -> bool:
    """Whether ``kind`` is the loose file; by name, since kinds reach the workers as pickled copies."""
    return kind.name == LOOSE_FILE.name


_KINDS: list[Kind] = []
# The kinds this package ships (archives, Parquet), asked after those registered at run time: ``register_built_in``.
_BUILT_IN: list[Kind] = []


def register(kind: Kind) -> None:
    """Add an input kind; it is asked before those registered earlier, and before the loose file.

    Raises:
        ValueError: a kind of that name is already registered, or the name cannot be a URI scheme.
    """
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", kind.name) or kind.name == LOOSE_FILE.name:
        raise ValueError(f"input kind name {kind.name!r} must be a URI scheme other than {LOOSE_FILE.name!r}")
    if any(k.name == kind.name for k in (*_KINDS, *_BUILT_IN)):
        raise ValueError(f"input kind {kind.name!r} is already registered")
    _KINDS.insert(0, kind)


def register_built_in(kind: Kind) -> None:
    """Add one of the package's own kinds (``inputs/__init__`` does, on import): asked after those registered at
    run time, and left out of a streamed listing's resume identity (``registered(built_in=False)``)."""
    register(kind)
    _KINDS.remove(kind)
    _BUILT_IN.insert(0, kind)


def reads_all(kind: Kind) -> bool:
    """Whether the kind reads a unit's Items in one pass (:meth:`Kind` ``read_all``)."""
    return callable(getattr(kind, "read_all", None))


def read_all(kind: Kind, unit: Item, options: ReadOptions) -> Iterator[Read]:
    """Every row of ``unit``: by the kind's one-pass reader when it has one, else ``items`` then ``read`` each."""
    if reads_all(kind):
        yield from kind.read_all(unit, options)  # type: ignore[attr-defined]
        return
    for found in kind.items(unit, options):
        yield Read(found)


def unregister(name: str) -> None:
    """Remove the input kind ``name`` (tests, plugins that unload); unknown names are ignored."""
    _KINDS[:] = [k for k in _KINDS if k.name != name]


def registered(*, built_in: bool = True) -> tuple[Kind, ...]:
    """The registered kinds, most recent first, then the built-in ones (unless ``built_in`` is false), then the
    loose file: what a scan ships to its workers."""
    return (*_KINDS, *(_BUILT_IN if built_in else ()), LOOSE_FILE)


def listed_extensions(extensions: Sequence[str], kinds: Sequence[Kind] | None = None) -> tuple[str, ...]:
    """The extensions a listing keeps: ``extensions`` (the images') and those of every registered kind."""
    return tuple(dict.fromkeys((*extensions, *(e for k in kinds or registered() for e in k.extensions))))


def kind_of(unit: Item, kinds: Sequence[Kind] | None = None) -> Kind:
    """The kind that expands a listed unit: the first that accepts it, else the loose file."""
    return next((k for k in kinds or registered() if k.accepts(unit)), LOOSE_FILE)


def named(name: str, kinds: Sequence[Kind] | None = None) -> Kind:
    """The kind called ``name``.

    Raises:
        KeyError: no such kind is registered.
    """
    for kind in kinds or registered():
        if kind.name == name:
            return kind
    raise KeyError(f"no input kind {name!r} is registered")


def parse(path: str, kinds: Sequence[Kind] | None = None) -> Item:
    """The Item a ``path`` identity names (inverse of :attr:`Item.path`); a plain URI is a whole unit."""
    found = _MEMBER_PATH.match(path)
    if found is None or found.group(1) not in {k.name for k in kinds or registered()}:
        return Item(path)
    scheme, member, occurrence, uri = found.groups()
    return Item(uri, _unescape(member), kind=scheme, occurrence=int(occurrence or 1))


def leaf(uri: str) -> str:
    """The name whose extension says what ``uri`` holds: the member of a chained path
    (``zip://inner.tar::outer.zip`` is a tar), else the URI itself."""
    return parse(uri).member or uri


def unit_path(path: str, kinds: Sequence[Kind] | None = None) -> str:
    """The listed unit a row's ``path`` comes from (itself for a loose file; the outer archive for a member
    of an archive inside it): what resume digests."""
    found = parse(path, kinds)
    while found.member is not None:
        found = parse(found.uri, kinds)
    return found.uri


def read(item: Item, options: ReadOptions, kinds: Sequence[Kind] | None = None) -> bytes | list[bytes]:
    """An Item's bytes, read by its kind (a whole unit by the kind that accepts it)."""
    kind = kind_of(item, kinds) if item.member is None else named(item.kind, kinds)
    return kind.read(item, options)


def read_path(path: str, options: ReadOptions, kinds: Sequence[Kind] | None = None) -> bytes | list[bytes]:
    """The bytes of the Item whose identity is ``path``: the report's thumbnails read scanned rows back so."""
    return read(parse(path, kinds), options, kinds)


def carried_fields(
    listing: pa.Table, options: ReadOptions, kinds: Sequence[Kind] | None = None
) -> tuple[pa.Field, ...] | None:
    """The output fields of the columns the listed units' rows carry through (a Parquet dataset's own), read
    on the driver from the first listed unit of each kind that has ``columns`` and carries any (a Parquet
    file without an image column, such as img2dataset's metadata, is passed over): a few footers per kind.

    ``None`` when not known: no such unit is listed, or its columns cannot be read (its own row will say why).
    """
    kinds = kinds or registered()
    fields: list[pa.Field] | None = None
    for kind in kinds:
        if not callable(getattr(kind, "columns", None)):
            continue
        for unit in itertools.islice(_units_of_kind(listing, kind, kinds), COLUMN_PROBES):
            try:
                found = kind.columns(unit, options)  # type: ignore[attr-defined]
            except (OSError, ValueError) as exc:
                _logger.warning("%s: its columns cannot be read (%s)", unit.uri, exc)
                continue
            fields = [*(fields or []), *found]
            if found:
                break
    return None if fields is None else tuple(fields)


def _units_of_kind(listing: pa.Table, kind: Kind, kinds: Sequence[Kind]) -> Iterator[Item]:
    """The listed units ``kind`` expands, in order; its extensions narrow the search without a loop over every
    row."""
    paths = listing.column(schema.PATH)
    candidates: Any = range(len(paths))
    if kind.extensions:
        lower = pc.utf8_lower(paths)
        wanted = [pc.ends_with(lower, "." + extension) for extension in kind.extensions]
        candidates = pc.indices_nonzero(functools.reduce(pc.or_, wanted)).to_pylist()
    raw = listing.column(schema.RAW_PATH) if schema.RAW_PATH in listing.column_names else None
    for i in candidates:
        unit = Item(paths[i].as_py(), raw_path=None if raw is None else raw[i].as_py())
        if kind_of(unit, kinds).name == kind.name:
            yield unit


def units_of(batch: pa.Table) -> list[Item]:
    """The listed units of a listing batch: ``path`` and, for names that are not UTF-8, ``_raw_path``."""
    paths = batch.column(schema.PATH).to_pylist()
    if schema.RAW_PATH not in batch.column_names:
        return [Item(p) for p in paths]
    raw = batch.column(schema.RAW_PATH).to_pylist()
    return [Item(p, raw_path=r) for p, r in zip(paths, raw, strict=True)]
