"""Labelled real-vs-AI datasets: folder layouts, manifests, splits and balance.

A dataset is listed into a table of ``path``, ``source``, ``true_label``
(``real`` / ``ai``), ``group`` (subject or generator, may be null) and
``split`` (the dataset's own ``train``/``val``/``test``, null when it has none).

Folder layouts (class folder names match case-insensitively):

- class folders: ``real/`` + ``ai/`` (also ``fake/``, ``REAL/`` + ``FAKE/``,
  ``synthetic/``, ``generated/``, CNNDetection's ``0_real/`` + ``1_fake/``);
- a group level above the class (``human/real/...``, per generator
  ``sdv14/1_fake/...``, CNNDetection's ``progan/car/0_real``: group
  ``progan/car``) or below it (``real/human/...``);
- the dataset's own split folders anywhere above the class
  (``train/``, ``val/``/``valid/``/``validation/``, ``test/``).

A video or an animated image is one file of the listing like a still: it is split as one unit of content,
and only training expands it into its sampled frames, after the split, so no clip straddles two splits.

A manifest (``.csv``, ``.tsv`` or ``.parquet``) has ``path`` and ``label``
(or ``true_label``: ``real``/``ai``/``fake``/``0``/``1``) and optionally
``group`` and ``split``; relative paths are resolved against the manifest's
folder. A training run's ``splits.parquet`` is such a manifest.

Labels come only from folder names or the manifest, never from file names, and
the model only ever sees pixels: a corpus labelled by file name needs a manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aidetect_batch import schema
from aidetect_batch.inputs import manifest, sources
from aidetect_batch.inputs.sources import DEFAULT_EXTENSIONS
from aidetect_batch.media import pdq
from aidetect_batch.storage import filesystem, to_uri

_logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Listing:
    """What listing a labelled dataset found: its layout and counts by label, group and own split."""

    dataset: str
    layout: str
    files: int
    unlabelled_files: int
    unlabelled_examples: list[str]
    labels: dict[str, int]
    groups: dict[str, int]
    own_splits: dict[str, int]


@dataclasses.dataclass(frozen=True)
class SplitCounts:
    """One split's images by label, and by label within each group."""

    real: int = 0
    ai: int = 0
    groups: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    @property
    def images(self) -> int:
        return self.real + self.ai

    @property
    def ai_fraction(self) -> float | None:
        return self.ai / self.images if self.images else None

    def to_json(self) -> dict[str, Any]:
        return {"real": self.real, "ai": self.ai, "groups": self.groups, "ai_fraction": self.ai_fraction}


@dataclasses.dataclass(frozen=True)
class Description:
    """A labelled dataset once split: its listing, the split decisions, balance and content fingerprint.

    ``split`` is the record of :func:`assign_splits`; :meth:`to_json` is ``dataset.json``. ``balance`` counts
    files; ``examples`` counts what the model trains on, a still once and a video once per sampled frame
    (:func:`balance` weighted by ``n_frames``), and is what the loss weights and the training loop size by.
    """

    listing: Listing
    split: dict[str, Any]
    balance: dict[str, SplitCounts]
    fingerprint: str
    statuses: dict[str, int]
    not_used: int
    examples: dict[str, SplitCounts] = dataclasses.field(default_factory=dict)

    def counts(self, split: str) -> SplitCounts:
        return self.balance.get(split, SplitCounts())

    def examples_in(self, split: str) -> SplitCounts:
        """Training examples of ``split`` by label; its files where no frame counts were recorded."""
        return self.examples.get(split) or self.counts(split)

    def balance_json(self) -> dict[str, Any]:
        return {name: counts.to_json() for name, counts in self.balance.items()}

    def run_json(self) -> dict[str, Any]:
        """The part a training run's ``_run.json`` records (the listing stays in ``dataset.json``)."""
        return {
            "fingerprint": self.fingerprint,
            "balance": self.balance_json(),
            "examples": {name: counts.to_json() for name, counts in self.examples.items()},
            "split": self.split,
            "statuses": self.statuses,
            "not_used": self.not_used,
        }

    def to_json(self) -> dict[str, Any]:
        """``dataset.json``: the listing and what ``_run.json`` records of the split."""
        return {**dataclasses.asdict(self.listing), **self.run_json()}


CLASS_DIRS = {
    "real": "real",
    "0_real": "real",
    "ai": "ai",
    "fake": "ai",
    "1_fake": "ai",
    "synthetic": "ai",
    "generated": "ai",
}
LABEL_VALUES = {**CLASS_DIRS, "0": "real", "1": "ai"}
SPLIT_DIRS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
MANIFEST_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")
DEFAULT_FRACTIONS = (0.7225, 0.1275, 0.15)


def is_manifest(dataset: str) -> bool:
    """True when ``dataset`` names a manifest file rather than a folder tree."""
    return dataset.lower().endswith(MANIFEST_SUFFIXES)


def parse_path(relative: str) -> tuple[str | None, str | None, str | None]:
    """(label, group, split) from a file's path below the dataset root; label ``None`` when unlabelled."""
    dirs = [p for p in relative.split("/")[:-1] if p]
    lowered = [d.lower() for d in dirs]
    class_at = [i for i, d in enumerate(lowered) if d in CLASS_DIRS]
    if not class_at:
        return None, None, None
    at = class_at[-1]
    split = next((SPLIT_DIRS[d] for d in lowered[:at] if d in SPLIT_DIRS), None)
    above = [d for d, low in zip(dirs[:at], lowered[:at], strict=True) if low not in SPLIT_DIRS]
    if above:
        group: str | None = "/".join(above)
    elif at + 1 < len(dirs):
        group = dirs[at + 1]
    else:
        group = None
    return CLASS_DIRS[lowered[at]], group, split


def _list_tree(
    dataset: str, extensions: tuple[str, ...], all_files: bool, *, storage_options: dict[str, Any]
) -> tuple[pa.Table, list[str]]:
    listing = sources.list_sources((dataset,), extensions, all_files=all_files, storage_options=storage_options)
    fs, root = filesystem(dataset, storage_options)
    root_uri = to_uri(fs, root.rstrip("/"))
    labels, groups, splits, keep, unlabelled = [], [], [], [], []
    for i, path in enumerate(listing.column(schema.PATH).to_pylist()):
        label, group, split = parse_path(path[len(root_uri) :].lstrip("/"))
        if label is None:
            unlabelled.append(path)
            continue
        keep.append(i)
        labels.append(label)
        groups.append(group)
        splits.append(split)
    table = listing.take(pa.array(keep, pa.int64()))
    table = table.append_column(schema.TRUE_LABEL, pa.array(labels, pa.string()))
    table = table.append_column(schema.GROUP, pa.array(groups, pa.string()))
    return table.append_column(schema.SPLIT, pa.array(splits, pa.string())), unlabelled


def _read_manifest(uri: str, storage_options: dict[str, Any]) -> pa.Table:
    """A labelled manifest, read by the scan's manifest reader (same formats, same rule for relative paths),
    then checked: a ``label`` (or ``true_label``) on every row, and known split names."""
    table = manifest.read_manifest(uri, storage_options)
    label_column = "label" if "label" in table.column_names else schema.TRUE_LABEL
    if label_column not in table.column_names:
        raise sources.SourceError(
            f"manifest {uri!r} lacks the column(s) {[label_column]}; it needs path,label[,group][,split]"
        )
    labels = []
    for row, value in enumerate(table.column(label_column).cast(pa.string()).to_pylist(), start=1):
        label = LABEL_VALUES.get(str(value).strip().lower()) if value is not None else None
        if label is None:
            raise sources.SourceError(f"manifest {uri!r} row {row}: label {value!r} is not one of real, ai, fake, 0, 1")
        labels.append(label)

    def optional(name: str) -> pa.Array:
        if name in table.column_names:
            return table.column(name).cast(pa.string()).combine_chunks()
        return pa.nulls(table.num_rows, pa.string())

    splits = [SPLIT_DIRS.get(s.lower(), s) if s else None for s in optional(schema.SPLIT).to_pylist()]
    bad = sorted({s for s in splits if s is not None and s not in schema.SPLITS})
    if bad:
        raise sources.SourceError(f"manifest {uri!r}: unknown split value(s) {bad}; use train, val, test")
    base = manifest.manifest_folder(uri, storage_options)
    return pa.table(
        {
            schema.PATH: table.column(schema.PATH),
            schema.SOURCE: pa.array([base] * table.num_rows, pa.string()),
            schema.TRUE_LABEL: pa.array(labels, pa.string()),
            schema.GROUP: optional(schema.GROUP),
            schema.SPLIT: pa.array(splits, pa.string()),
        }
    )


def list_labelled(
    dataset: str,
    extensions: tuple[str, ...] = (),
    all_files: bool = False,
    *,
    storage_options: dict[str, Any] | None = None,
) -> tuple[pa.Table, Listing]:
    """List a labelled dataset (folder tree or manifest) and describe it.

    Returns the listing (:data:`schema.LABELLED_SCHEMA`) and a description:
    layout, unlabelled files found in a tree (not used, but counted and
    named), and counts by label, group and split.

    Raises:
        sources.SourceError: the dataset is missing, unreadable, or holds no labelled files.
    """
    storage_options = storage_options or {}
    if not extensions:
        extensions = DEFAULT_EXTENSIONS
    unlabelled: list[str] = []
    if is_manifest(dataset):
        table, layout = _read_manifest(dataset, storage_options), "manifest"
    else:
        table, unlabelled = _list_tree(dataset, extensions, all_files, storage_options=storage_options)
        layout = "folders"
    if table.num_rows == 0:
        raise sources.SourceError(
            f"dataset {dataset!r} has no labelled images: put them in class folders "
            f"({', '.join(sorted(CLASS_DIRS))}), optionally below train/val/test and group folders, "
            "or pass a manifest with path,label[,group][,split]"
        )
    if unlabelled:
        _logger.warning(
            "%d file(s) in %s are outside any class folder and are not used, e.g. %s",
            len(unlabelled),
            dataset,
            unlabelled[0],
        )
    table = _labelled(table)
    return table, Listing(
        dataset=dataset,
        layout=layout,
        files=table.num_rows,
        unlabelled_files=len(unlabelled),
        unlabelled_examples=unlabelled[:20],
        labels=counts(table.column(schema.TRUE_LABEL)),
        groups=counts(table.column(schema.GROUP)),
        own_splits=counts(table.column(schema.SPLIT)),
    )


def _labelled(table: pa.Table) -> pa.Table:
    """The listing in :data:`schema.LABELLED_SCHEMA`, keeping the hidden raw bytes of names that are not
    UTF-8 so the CPU stage can still read those files."""
    labelled = table.select(schema.LABELLED_SCHEMA.names).cast(schema.LABELLED_SCHEMA)
    if schema.RAW_PATH not in table.column_names:
        return labelled
    return labelled.append_column(pa.field(schema.RAW_PATH, pa.binary()), table.column(schema.RAW_PATH))


def counts(column: pa.ChunkedArray | pa.Array) -> dict[str, int]:
    """Value counts of a string column, nulls left out."""
    result = pc.value_counts(column).to_pylist()
    return {str(r["values"]): int(r["counts"]) for r in result if r["values"] is not None}


def assign_splits(
    table: pa.Table,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> tuple[pa.Array, dict[str, Any]]:
    """Choose each row's split: stratified by (label, group), seeded, and grouped by content.

    ``table`` needs ``true_label``, ``group``, ``split`` (the dataset's own,
    may be null), ``sha256`` and ``status``, and may carry ``pdq`` and
    ``pdq_quality``. Rows are units of content (:func:`content_units`): identical
    bytes, and with PDQ hashes every near-duplicate group, so an image, its
    exact copies and its reposts always land in the same split and never leak
    from train into val or test. Identical bytes carrying both labels are
    excluded (split null) and counted; a near-duplicate group carrying both
    labels (a photograph and its AI edit, say) is counted and kept, in one
    split. When the
    dataset has its own splits they are kept; a missing ``val`` (or ``val``
    and ``test``) is carved out of ``train`` with the same rules, and copies
    of val/test images found in ``train`` are removed from ``train``.
    Rows whose status is not ``ok`` get a null split.

    Returns the split column and a record of what was decided.
    """
    n = table.num_rows
    labels = np.array(table.column(schema.TRUE_LABEL).to_pylist(), dtype=object)
    groups = np.array([g or "" for g in table.column(schema.GROUP).to_pylist()], dtype=object)
    ok = np.array([s == schema.Status.OK.value for s in table.column(schema.STATUS).to_pylist()])
    hashes, near_groups = content_units(table, ok)
    own = np.array(table.column(schema.SPLIT).to_pylist(), dtype=object)
    split = np.full(n, None, dtype=object)
    record: dict[str, Any] = {"fractions": list(fractions), "seed": seed, "near_duplicate_groups": near_groups}

    sha = np.array(table.column(schema.SHA256).to_pylist(), dtype=object)
    contradicted = _conflicting(sha, labels, ok)
    usable = ok & ~contradicted
    record["conflicting_label_files"] = int(contradicted.sum())
    record["near_duplicate_conflict_files"] = int(_conflicting(hashes, labels, usable).sum())

    has_own = any(s is not None for s in own[usable])
    if has_own:
        split[usable] = own[usable]
        record["mode"] = "dataset"
        leaked = 0
        held_out = {h for h, s in zip(hashes, split, strict=True) if s in ("val", "test")}
        for i in np.flatnonzero(usable & (split == "train")):
            if hashes[i] in held_out:
                split[i] = None
                leaked += 1
        record["train_copies_of_heldout_removed"] = leaked
        unsplit = usable & np.array([s is None for s in own])
        if unsplit.any():
            record["files_outside_split_folders"] = int(unsplit.sum())
        present = {s for s in split if s is not None}
        carve = [s for s in ("val", "test") if s not in present]
        if carve:
            record["carved_from_train"] = carve
            wanted = {"val": fractions[1], "test": fractions[2]}
            train_share = fractions[0] + sum(wanted[s] for s in carve)
            sub = (
                fractions[0] / train_share,
                wanted["val"] / train_share if "val" in carve else 0.0,
                wanted["test"] / train_share if "test" in carve else 0.0,
            )
            rows = np.flatnonzero(split == "train")
            split[rows] = _stratified(labels[rows], groups[rows], hashes[rows], fractions=sub, seed=seed)
    else:
        record["mode"] = "random"
        rows = np.flatnonzero(usable)
        split[rows] = _stratified(labels[rows], groups[rows], hashes[rows], fractions=fractions, seed=seed)
    return pa.array(split.tolist(), pa.string()), record


def _conflicting(units: np.ndarray, labels: np.ndarray, among: np.ndarray) -> np.ndarray:
    """Which of the ``among`` rows belong to a unit that carries both labels there."""
    labels_of: dict[str, set[str]] = {}
    for unit, label, counted in zip(units, labels, among, strict=True):
        if counted:
            labels_of.setdefault(unit, set()).add(label)
    return np.array([bool(c) and len(labels_of[u]) > 1 for u, c in zip(units, among, strict=True)], dtype=bool)


def content_units(table: pa.Table, ok: np.ndarray) -> tuple[np.ndarray, int]:
    """Each row's unit of content, and how many near-duplicate groups joined files of different bytes.

    The unit is the row's SHA-256, except that readable rows whose PDQ hashes are within the match
    distance (quality at least 50) share one unit, named by the smallest SHA-256 among them, so data
    without near-duplicates splits exactly as by SHA-256 alone.
    """
    hashes = np.array(table.column(schema.SHA256).to_pylist(), dtype=object)
    if schema.PDQ not in table.column_names:
        return hashes, 0
    quality = pc.fill_null(table.column(schema.PDQ_QUALITY), -1).to_numpy(zero_copy_only=False)
    usable = np.flatnonzero(ok & (quality >= pdq.MIN_QUALITY))
    if len(usable) < 2:
        return hashes, 0
    from aidetect_batch.report import groups  # faiss and scipy load only when a dataset carries hashes

    codes = pdq.unpack(table.column(schema.PDQ).take(pa.array(usable)).to_pylist())
    component = groups.near_duplicate_groups(codes)
    smallest: dict[int, str] = {}
    members: dict[int, set[str]] = {}
    for c, h in zip(component.tolist(), hashes[usable], strict=True):
        smallest[c] = min(smallest.get(c, h), h)
        members.setdefault(c, set()).add(h)
    unit_of = {h: smallest[c] for c, h in zip(component.tolist(), hashes[usable], strict=True)}
    units = np.array([unit_of.get(h, h) for h in hashes], dtype=object)
    return units, sum(1 for found in members.values() if len(found) > 1)


def _stratified(
    labels: np.ndarray, groups: np.ndarray, hashes: np.ndarray, *, fractions: tuple[float, float, float], seed: int
) -> np.ndarray:
    """Split rows by unique content, stratified by (label, group), in seeded random order.

    The unit is the content hash: all copies of the same bytes get one split,
    decided in the stratum of the copy listed first.
    """
    stratum_of: dict[str, tuple[str, str]] = {}
    for h, label, group in zip(hashes, labels, groups, strict=True):
        stratum_of.setdefault(h, (label, group))
    units_of: dict[tuple[str, str], list[str]] = {}
    for h, stratum in stratum_of.items():
        units_of.setdefault(stratum, []).append(h)
    total = sum(fractions)
    split_of: dict[str, str] = {}
    for stratum in sorted(units_of):
        units = sorted(units_of[stratum])
        digest = hashlib.sha256(f"{seed}:{stratum[0]}:{stratum[1]}".encode()).digest()
        order = np.random.default_rng(int.from_bytes(digest[:8], "little")).permutation(len(units))
        n = len(units)
        n_test = min(int(round(n * fractions[2] / total)), max(n - 1, 0))
        n_val = min(int(round(n * fractions[1] / total)), max(n - 1 - n_test, 0))
        for rank, index in enumerate(order):
            split_of[units[index]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return np.array([split_of[h] for h in hashes], dtype=object)


def balance(table: pa.Table, *, per_frame: bool = False) -> dict[str, SplitCounts]:
    """Counts per split and label (and group): the class balance the training log reports.

    ``per_frame`` counts training examples instead of files: a row with ``n_frames`` (a video or an
    animation) counts its sampled frames, any other row once.
    """
    counts: dict[str, dict[str, Any]] = {}
    splits = table.column(schema.SPLIT).to_pylist()
    labels = table.column(schema.TRUE_LABEL).to_pylist()
    groups = table.column(schema.GROUP).to_pylist()
    weights = [1] * table.num_rows
    if per_frame and schema.N_FRAMES in table.column_names:
        weights = [n or 1 for n in table.column(schema.N_FRAMES).to_pylist()]
    for split, label, group, weight in zip(splits, labels, groups, weights, strict=True):
        if split is None:
            continue
        entry = counts.setdefault(split, {"real": 0, "ai": 0, "groups": {}})
        entry[label] += weight
        if group is not None:
            entry["groups"].setdefault(group, {"real": 0, "ai": 0})[label] += weight
    return {split: SplitCounts(**entry) for split, entry in counts.items()}


def fingerprint(table: pa.Table) -> str:
    """SHA-256 over the sorted (content hash, label, split) of every usable row.

    It names the training data by content: renaming or moving files keeps it,
    changing, adding or relabelling an image changes it.
    """
    rows = sorted(
        f"{h}\t{label}\t{split}"
        for h, label, split in zip(
            table.column(schema.SHA256).to_pylist(),
            table.column(schema.TRUE_LABEL).to_pylist(),
            table.column(schema.SPLIT).to_pylist(),
            strict=True,
        )
        if split is not None
    )
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()
