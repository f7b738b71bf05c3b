"""``aidetect-batch reposts OUT``: near-duplicate groups from a finished scan's PDQ hashes (``--phash``).

Grouping rule: two rows are near-duplicates when their PDQ hashes differ in at most ``distance``
bits (31, ThreatExchange's match threshold) and both hashes have quality of at least
``min_quality`` (50); a group is a connected component of that relation, so a chain of reposts
(each a little further from the first) is one group. An exact copy scored once under ``--dedup``
joins its original's group.

Candidate pairs and components come from :mod:`aidetect_batch.report.groups` (no all-pairs comparison).

Outputs, under ``OUT/reposts/``: ``members.parquet`` (every row: ``path``, ``group_id``, ``group_size``;
null where the row has no usable hash), ``groups.parquet`` (groups of two or more) and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from aidetect_batch import schema
from aidetect_batch.errors import ConfigError
from aidetect_batch.media import pdq
from aidetect_batch.report import aggregate
from aidetect_batch.report import groups as neardup
from aidetect_batch.report.config import TIME_COLUMNS, RepostsConfig
from aidetect_batch.storage import filesystem, join, write_json, write_parquet

_logger = logging.getLogger(__name__)

MAX_PREFIXES = 50


@dataclasses.dataclass(frozen=True)
class RepostsSummary:
    """What ``reposts`` found (``OUT/reposts/summary.json``)."""

    rows: int
    hashed: int
    low_quality: int
    groups: int
    grouped_rows: int
    largest_group: int
    disagreeing_groups: int
    chunk_bits: int
    seconds: float
    distance: int
    min_quality: int
    time_column: str | None
    config: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_reposts(cfg: RepostsConfig) -> RepostsSummary:
    """Group a finished scan's rows by PDQ distance and write ``OUT/reposts/``; then rebuild its report."""
    start = time.perf_counter()
    table, time_column = _read_scores(cfg)
    group_id, hashed, low = _group_ids(table, cfg)
    size = _sizes(group_id)
    members = pa.table(
        {
            schema.PATH: table.column(schema.PATH),
            "group_id": pa.array(group_id, pa.int64(), mask=group_id < 0),
            "group_size": pa.array(size, pa.int64(), mask=group_id < 0),
        }
    )
    groups = group_table(table, group_id, size, prefix_depth=cfg.prefix_depth, time_column=time_column)
    directory = join(cfg.out, schema.REPOSTS_DIR)
    fs, root = filesystem(directory, cfg.storage_options)
    fs.makedirs(root, exist_ok=True)
    write_parquet(join(directory, "members.parquet"), members, cfg.storage_options)
    write_parquet(join(directory, schema.REPOST_GROUPS_FILE), groups, cfg.storage_options)
    summary = RepostsSummary(
        rows=table.num_rows,
        hashed=hashed,
        low_quality=low,
        groups=groups.num_rows,
        grouped_rows=int(np.sum(size >= 2)),
        largest_group=int(size.max(initial=0)),
        disagreeing_groups=int(pc.sum(groups.column("disagree")).as_py() or 0),
        chunk_bits=neardup.chunk_bits(hashed),
        seconds=time.perf_counter() - start,
        distance=cfg.distance,
        min_quality=cfg.min_quality,
        time_column=time_column,
        config=cfg.to_json(),
    )
    write_json(join(directory, schema.SUMMARY_FILE), summary.to_json(), cfg.storage_options)
    aggregate.rebuild(cfg.out, cfg.storage_options)
    return summary


def _read_scores(cfg: RepostsConfig) -> tuple[pa.Table, str | None]:
    """The columns grouping needs (no pixels, no timings), and the time column found among them."""
    fs, root = filesystem(join(cfg.out, schema.SCORES_DIR), cfg.storage_options)
    if not fs.exists(root):
        raise ConfigError(f"{cfg.out} holds no scores/: run a scan with --phash first")
    dataset = pads.dataset(root, filesystem=fs, format="parquet")
    time_column = _time_column(dataset.schema.names, cfg.time_column)
    items = [c for c in (schema.CONTAINER, schema.MEMBER) if c in dataset.schema.names]  # none before archives
    table = dataset.to_table(columns=[*_COLUMNS, *items, *([time_column] if time_column else [])])
    if not pc.count(table.column(schema.PDQ)).as_py():
        raise ConfigError(f"the scan in {cfg.out} has no PDQ hashes: scan it again with --phash")
    return table, time_column


_COLUMNS = [
    schema.PATH, schema.SOURCE, schema.STATUS, schema.SCORE, schema.LABEL, schema.PDQ, schema.PDQ_QUALITY,
    schema.DUPLICATE_OF,
]  # fmt: skip


def _time_column(names: list[str], named: str | None) -> str | None:
    if named is not None:
        if named not in names:
            raise ConfigError(f"--time-column {named!r} is not a column of the scores")
        return named
    return next((c for c in TIME_COLUMNS if c in names), None)


def _group_ids(table: pa.Table, cfg: RepostsConfig) -> tuple[np.ndarray, int, int]:
    """Each row's group (-1: none), how many rows had a hash, and how many of those were of low quality."""
    quality = pc.fill_null(table.column(schema.PDQ_QUALITY), -1).to_numpy()
    has_hash = quality >= 0
    usable = np.flatnonzero(quality >= cfg.min_quality)
    codes = pdq.unpack(table.column(schema.PDQ).take(pa.array(usable)).to_pylist())
    pairs = neardup.near_pairs(codes, cfg.distance)
    _logger.info("reposts: %d usable hashes, %d near pairs", len(usable), len(pairs))
    group_id = np.full(table.num_rows, -1, np.int64)
    group_id[usable] = neardup.components(len(usable), pairs)
    _join_exact_copies(table, group_id)
    return group_id, int(has_hash.sum()), int(has_hash.sum() - len(usable))


def _join_exact_copies(table: pa.Table, group_id: np.ndarray) -> None:
    """``--dedup`` rows carry no hash: each takes the group of the file it duplicates."""
    if schema.DUPLICATE_OF not in table.column_names:
        return
    copies = np.flatnonzero(pc.is_valid(table.column(schema.DUPLICATE_OF)).to_numpy(zero_copy_only=False))
    if not len(copies):
        return
    position = {p: i for i, p in enumerate(table.column(schema.PATH).to_pylist())}
    for i, original in zip(copies, table.column(schema.DUPLICATE_OF).take(pa.array(copies)).to_pylist(), strict=True):
        group_id[i] = group_id[position[original]] if original in position else -1


def _sizes(group_id: np.ndarray) -> np.ndarray:
    grouped = group_id >= 0
    counts = np.bincount(group_id[grouped]) if grouped.any() else np.zeros(0, np.int64)
    size = np.zeros(len(group_id), np.int64)
    size[grouped] = counts[group_id[grouped]]
    return size


def group_table(
    table: pa.Table, group_id: np.ndarray, size: np.ndarray, *, prefix_depth: int, time_column: str | None
) -> pa.Table:
    """One row per group of two or more: size, prefixes, score statistics, label agreement, first/last seen."""
    member = size >= 2
    rows = table.filter(pa.array(member))
    ids = pa.array(group_id[member], pa.int64())
    label = rows.column(schema.LABEL)
    ok = pc.equal(rows.column(schema.STATUS), schema.Status.OK.value)
    parts = {
        "group_id": ids,
        "member": pa.array(np.ones(len(ids), np.int64)),
        "path": rows.column(schema.PATH),
        "prefix": aggregate.prefixes_of(
            rows.column(schema.PATH),
            rows.column(schema.SOURCE),
            prefix_depth,
            containers=_column(rows, schema.CONTAINER),
            members=_column(rows, schema.MEMBER),
        ),
        "score": pc.if_else(ok, rows.column(schema.SCORE), pa.scalar(None, pa.float32())),
        "ai": pc.cast(pc.fill_null(pc.equal(label, schema.LABEL_AI), False), pa.int64()),
        "real": pc.cast(pc.fill_null(pc.equal(label, schema.LABEL_REAL), False), pa.int64()),
    }
    aggregations = [
        ("member", "sum"), ("path", "min"), ("prefix", "distinct"), ("score", "min"), ("score", "max"),
        ("ai", "sum"), ("real", "sum"),
    ]  # fmt: skip
    if time_column:
        parts["seen"] = rows.column(time_column)
        aggregations += [("seen", "min"), ("seen", "max")]
    grouped = pa.table(parts).group_by("group_id", use_threads=False).aggregate(aggregations).sort_by("group_id")
    return _finish_groups(grouped, _medians(ids, parts["score"]), time_column=time_column)


def _column(table: pa.Table, name: str) -> pa.ChunkedArray | None:
    return table.column(name) if name in table.column_names else None


def _medians(ids: pa.Array, scores: pa.Array) -> dict[int, float]:
    """Median of each group's non-null scores, from one sort by (group, score)."""
    order = (
        pa.table({"g": ids, "s": scores}).filter(pc.is_valid(scores)).sort_by([("g", "ascending"), ("s", "ascending")])
    )
    g, s = order.column("g").to_numpy(), order.column("s").to_numpy().astype(np.float64)
    if not len(g):
        return {}
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    ends = np.r_[starts[1:], len(g)]
    middle = (s[starts + (ends - starts - 1) // 2] + s[starts + (ends - starts) // 2]) / 2.0
    return dict(zip(g[starts].tolist(), middle.tolist(), strict=True))


def _finish_groups(grouped: pa.Table, medians: dict[int, float], *, time_column: str | None) -> pa.Table:
    ai, real = grouped.column("ai_sum").to_numpy(), grouped.column("real_sum").to_numpy()
    labelled = ai + real
    agreement = np.where(labelled > 0, np.maximum(ai, real) / np.maximum(labelled, 1), np.nan)
    prefixes = grouped.column("prefix_distinct").to_pylist()
    columns = {
        "group_id": grouped.column("group_id"),
        "size": grouped.column("member_sum"),
        "representative": grouped.column("path_min"),
        "n_prefixes": pa.array([len(p) for p in prefixes], pa.int64()),
        "prefixes": pa.array([sorted(p)[:MAX_PREFIXES] for p in prefixes], pa.list_(pa.string())),
        "score_min": grouped.column("score_min"),
        "score_median": pa.array([medians.get(g) for g in grouped.column("group_id").to_pylist()], pa.float32()),
        "score_max": grouped.column("score_max"),
        "n_ai": grouped.column("ai_sum"),
        "n_real": grouped.column("real_sum"),
        "label_agreement": pa.array(agreement, pa.float32(), mask=labelled == 0),
        "disagree": pa.array((ai > 0) & (real > 0)),
    }
    if time_column:
        columns["first_seen"], columns["last_seen"] = grouped.column("seen_min"), grouped.column("seen_max")
    return pa.table(columns)


def summary_line(summary: RepostsSummary) -> str:
    """The line the command prints."""
    return (
        f"reposts: {summary.groups} group(s) of near-duplicates holding {summary.grouped_rows} of {summary.rows} rows "
        f"(largest {summary.largest_group}; {summary.disagreeing_groups} with both labels); {summary.hashed} hashed, "
        f"{summary.low_quality} of too low quality; distance <= {summary.distance}, {summary.seconds:.1f} s"
    )
