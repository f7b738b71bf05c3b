"""Aggregates computed from the scores Parquet: what a person reads first.

The report streams the scores files in record batches and reduces each with
Arrow's vectorised ``group_by`` (no Python loop over rows), so memory depends
on the number of distinct prefixes, formats and error kinds, not on the number
of rows. It writes ``OUT/report/*.parquet``, ``summary.json``, a score
histogram plot and ``index.html`` (:mod:`aidetect_batch.report.page`), and
can be rebuilt at any time from the scores alone (``aidetect-batch report``).
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from aidetect_batch import schema
from aidetect_batch.media import video
from aidetect_batch.report import page
from aidetect_batch.schema import RunFacts, Summary
from aidetect_batch.storage import filesystem, join, read_json, write_json, write_parquet

HISTOGRAM_BINS = 20
TOP_ERRORS = 20
_NO_PREFIX = "(root)"
_NO_PROVENANCE = "none"


def prefix_of(
    path: str, source: str | None, depth: int, *, container: str | None = None, member: str | None = None
) -> str:
    """First ``depth`` folder components of ``path`` below ``source``.

    An archive is a prefix of its own, whatever the depth: a member's prefix is its ``container`` below
    ``source`` (the whole URI when it is elsewhere), then the first ``depth - 1`` folders of the ``member``.
    The default depth 1 so gives one row per archive, and a larger one splits an export by its folders."""
    if depth == 0:
        return _NO_PREFIX
    if container is not None:
        archive = container[len(source) :] if source and container.startswith(source) else container
        inside = "/".join([p for p in (member or "").split("/") if p][:-1][: depth - 1])
        return archive.lstrip("/") + (f"/{inside}" if inside else "") or _NO_PREFIX
    relative = path[len(source) :] if source and path.startswith(source) else path
    parts = [p for p in relative.split("/") if p][:-1]
    return "/".join(parts[:depth]) or _NO_PREFIX


_COLUMNS = [
    schema.PATH,
    schema.SOURCE,
    schema.STATUS,
    schema.ERROR,
    schema.SCORE,
    schema.LABEL,
    schema.FORMAT,
    schema.PROVENANCE,
    schema.CONTAINER,
    schema.MEMBER,
    schema.N_FRAMES,
    schema.T_READ_MS,
    schema.T_DECODE_MS,
    schema.T_INFER_MS,
]
_STAGES = (("read", schema.T_READ_MS), ("decode", schema.T_DECODE_MS), ("infer", schema.T_INFER_MS))
_PREFIX_SUMS = ("files", "ok", "failed", "duplicates", "ai", "real", "score_sum")
_MEDIA_SUMS = (*_PREFIX_SUMS, "frames")
_VIDEO_FORMATS = pa.array(video.CONTAINERS, pa.string())
_MEDIA_SCHEMA = pa.schema(
    [
        ("media", pa.string()),
        *((name, pa.int64()) for name in ("files", "ok", "failed", "duplicates", "ai", "real")),
        ("ai_rate", pa.float64()),
        ("mean_score", pa.float64()),
        ("frames", pa.int64()),
    ]
)


class _Aggregates:
    """Running aggregates of the scores, merged batch by batch with Arrow's vectorised ``group_by``.

    Each batch is reduced to a few small tables (one row per status, label, format, prefix and error
    kind) and merged into the running ones, so memory grows with the number of distinct keys, never
    with the number of rows.
    """

    def __init__(self, prefix_depth: int) -> None:
        self.depth = prefix_depth
        self.edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
        self.histogram = {
            k: np.zeros(HISTOGRAM_BINS, dtype=np.int64) for k in ("all", schema.LABEL_AI, schema.LABEL_REAL)
        }
        self.stage_ms = dict.fromkeys((s for s, _ in _STAGES), 0.0)
        self.stage_rows = dict.fromkeys((s for s, _ in _STAGES), 0)
        self.counts: dict[str, pa.Table | None] = {"status": None, "label": None, "format": None}
        self.prefixes: pa.Table | None = None
        self.media: pa.Table | None = None
        self.errors: pa.Table | None = None
        self.provenance: pa.Table | None = None

    def add(self, batch: pa.RecordBatch) -> None:
        table = pa.Table.from_batches([batch])
        self._add_histograms(table)
        self._add_stage_times(table)
        for key, column, missing in (
            ("status", schema.STATUS, None),
            ("label", schema.LABEL, "none"),
            ("format", schema.FORMAT, "unknown"),
        ):
            values = table.column(column) if missing is None else pc.fill_null(table.column(column), missing)
            ones = pa.array(np.ones(len(values), np.int64))
            self.counts[key] = _merge(self.counts[key], pa.table({"key": values, "n": ones}), ["key"], {"n": "sum"})
        outcomes = _outcomes(table)
        self._add_prefixes(table, outcomes)
        self._add_media(table, outcomes)
        self._add_errors(table)
        self._add_provenance(table)

    def _add_histograms(self, table: pa.Table) -> None:
        scores = table.column(schema.SCORE).to_numpy().astype(np.float64)
        finite = np.isfinite(scores)
        self.histogram["all"] += np.histogram(scores[finite], bins=self.edges)[0]
        for label in (schema.LABEL_AI, schema.LABEL_REAL):
            is_label = pc.fill_null(pc.equal(table.column(schema.LABEL), label), False).to_numpy()
            self.histogram[label] += np.histogram(scores[finite & is_label], bins=self.edges)[0]

    def _add_stage_times(self, table: pa.Table) -> None:
        for stage, column in _STAGES:
            values = pc.drop_null(table.column(column))
            values = values.filter(pc.is_finite(values))
            self.stage_ms[stage] += float(pc.sum(values).as_py() or 0.0)
            self.stage_rows[stage] += len(values)

    def _add_prefixes(self, table: pa.Table, outcomes: dict[str, pa.Array]) -> None:
        prefix = prefixes_of(
            table.column(schema.PATH),
            table.column(schema.SOURCE),
            self.depth,
            containers=table.column(schema.CONTAINER),
            members=table.column(schema.MEMBER),
        )
        rows = pa.table({"prefix": prefix, **outcomes})
        self.prefixes = _merge(self.prefixes, rows, ["prefix"], dict.fromkeys(_PREFIX_SUMS, "sum"))

    def _add_media(self, table: pa.Table, outcomes: dict[str, pa.Array]) -> None:
        ok = pc.equal(table.column(schema.STATUS), schema.Status.OK.value)
        frames = pc.if_else(ok, pc.fill_null(pc.cast(table.column(schema.N_FRAMES), pa.int64()), 0), 0)
        rows = pa.table(
            {
                "media": media_of(table.column(schema.FORMAT), table.column(schema.N_FRAMES)),
                **outcomes,
                "frames": frames,
            }
        )
        self.media = _merge(self.media, rows, ["media"], dict.fromkeys(_MEDIA_SUMS, "sum"))

    def _add_errors(self, table: pa.Table) -> None:
        status = table.column(schema.STATUS)
        failed = table.filter(
            pc.invert(pc.is_in(status, pa.array([schema.Status.OK.value, schema.Status.DUPLICATE.value])))
        )
        if not failed.num_rows:
            return
        error = pc.fill_null(failed.column(schema.ERROR), "")
        rows = pa.table(
            {
                "status": failed.column(schema.STATUS),
                "error": pc.replace_substring_regex(error, pattern=r"\d+", replacement="#"),
                "count": pa.array(np.ones(failed.num_rows, np.int64)),
                "example_path": failed.column(schema.PATH),
                "example_error": failed.column(schema.ERROR),
            }
        )
        how = {"count": "sum", "example_path": "first", "example_error": "first"}
        self.errors = _merge(self.errors, rows, ["status", "error"], how)

    def _add_provenance(self, table: pa.Table) -> None:
        label = table.column(schema.LABEL)
        rows = pa.table(
            {
                "provenance": pc.fill_null(table.column(schema.PROVENANCE), _NO_PROVENANCE),
                "files": pa.array(np.ones(table.num_rows, np.int64)),
                "ai": pc.cast(pc.fill_null(pc.equal(label, schema.LABEL_AI), False), pa.int64()),
                "real": pc.cast(pc.fill_null(pc.equal(label, schema.LABEL_REAL), False), pa.int64()),
            }
        )
        self.provenance = _merge(self.provenance, rows, ["provenance"], {"files": "sum", "ai": "sum", "real": "sum"})

    def _provenance_rows(self) -> list[dict[str, Any]]:
        """One row per provenance kind found (strongest first, then none): files, and how the model labelled them."""
        found = {} if self.provenance is None else {r["provenance"]: r for r in self.provenance.to_pylist()}
        order = [*schema.PROVENANCE_KINDS, _NO_PROVENANCE]
        return [{**found[k], "definite_ai": k in schema.DEFINITE_AI} for k in order if k in found]

    def result(self) -> Summary:
        status_counts = _as_dict(self.counts["status"])
        label_counts = _as_dict(self.counts["label"])
        format_counts = _as_dict(self.counts["format"])
        total = sum(status_counts.values())
        ok = status_counts.get(schema.Status.OK.value, 0)
        duplicates = status_counts.get(schema.Status.DUPLICATE.value, 0)
        return Summary(
            total=total,
            ok=ok,
            failed=total - ok - duplicates,
            duplicates=duplicates,
            status_counts={s.value: status_counts.get(s.value, 0) for s in schema.Status},
            label_counts={k: label_counts.get(k, 0) for k in (schema.LABEL_AI, schema.LABEL_REAL, "none")},
            format_counts=dict(sorted(format_counts.items(), key=lambda kv: (-kv[1], kv[0]))),
            histogram={
                "bin_start": self.edges[:-1].round(4).tolist(),
                "bin_end": self.edges[1:].round(4).tolist(),
                **{k: v.tolist() for k, v in self.histogram.items()},
            },
            prefixes=self._prefix_rows(),
            errors=self._error_rows(),
            provenance=self._provenance_rows(),
            media=self._media_rows(),
            stage_images_per_s={
                stage: (self.stage_rows[stage] * 1000.0 / ms) if ms > 0 else None for stage, ms in self.stage_ms.items()
            },
        )

    def _prefix_rows(self) -> list[dict[str, Any]]:
        rows = [] if self.prefixes is None else self.prefixes.sort_by("prefix").to_pylist()
        return [{"prefix": r["prefix"], **_rates(r)} for r in rows]

    def _media_rows(self) -> list[dict[str, Any]]:
        """One row per media kind, each kind present even at zero, so the table has the same rows in every scan."""
        found = {} if self.media is None else {r["media"]: r for r in self.media.to_pylist()}
        sums = [found.get(kind, dict.fromkeys(_MEDIA_SUMS, 0)) for kind in schema.MEDIA_KINDS]
        return [
            {"media": kind, **_rates(s), "frames": int(s["frames"])}
            for kind, s in zip(schema.MEDIA_KINDS, sums, strict=True)
        ]

    def _error_rows(self) -> list[dict[str, Any]]:
        if self.errors is None:
            return []
        rows = self.errors.select(["status", "error", "count", "example_path", "example_error"]).to_pylist()
        return sorted(rows, key=lambda e: (-e["count"], e["status"], e["error"]))


def _outcomes(table: pa.Table) -> dict[str, pa.Array]:
    """Per row, 0/1 for each outcome a breakdown counts (files, ok, failed, duplicates, ai, real), and its score
    when ok: the prefix and media tables sum these by their keys."""
    status = table.column(schema.STATUS)
    ok = pc.equal(status, schema.Status.OK.value)
    duplicate = pc.equal(status, schema.Status.DUPLICATE.value)
    label = table.column(schema.LABEL)
    return {
        "files": pa.array(np.ones(table.num_rows, np.int64)),
        "ok": pc.cast(ok, pa.int64()),
        "duplicates": pc.cast(duplicate, pa.int64()),
        "failed": pc.cast(pc.invert(pc.or_(ok, duplicate)), pa.int64()),
        "ai": pc.cast(pc.fill_null(pc.and_(ok, pc.equal(label, schema.LABEL_AI)), False), pa.int64()),
        "real": pc.cast(pc.fill_null(pc.and_(ok, pc.equal(label, schema.LABEL_REAL)), False), pa.int64()),
        "score_sum": pc.if_else(ok, pc.cast(table.column(schema.SCORE), pa.float64()), 0.0),
    }


def _rates(sums: dict[str, Any]) -> dict[str, Any]:
    """A breakdown row's counts, with the share of its ok files labelled ai and their mean score."""
    ok = sums["ok"]
    return {
        **{k: int(sums[k]) for k in ("files", "ok", "failed", "duplicates", "ai", "real")},
        "ai_rate": sums["ai"] / ok if ok else None,
        "mean_score": sums["score_sum"] / ok if ok else None,
    }


def media_of(formats: pa.ChunkedArray | pa.Array, n_frames: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Each row's :data:`schema.MEDIA_KINDS`: a video container is a video whether or not a frame decoded (its
    format is set by sampling); other rows with frames are animations; the rest are stills."""
    is_video = pc.fill_null(pc.is_in(_whole(formats), _VIDEO_FORMATS), False)
    has_frames = pc.is_valid(_whole(n_frames))
    motion = pc.if_else(has_frames, schema.MEDIA_ANIMATION, schema.MEDIA_STILL)
    return pc.if_else(is_video, schema.MEDIA_VIDEO, motion)


def _merge(running: pa.Table | None, new: pa.Table, keys: list[str], how: dict[str, str]) -> pa.Table:
    """Fold a batch's rows into the running groups: sums add up, ``first`` keeps the earliest."""
    new = new.select([*keys, *how])
    combined = new if running is None else pa.concat_tables([running, new])
    merged = combined.group_by(keys, use_threads=False).aggregate(list(how.items()))
    names = {f"{column}_{function}": column for column, function in how.items()}
    return merged.rename_columns([names.get(n, n) for n in merged.column_names]).select([*keys, *how])


def _as_dict(table: pa.Table | None) -> dict[str, int]:
    return (
        {} if table is None else dict(zip(table.column("key").to_pylist(), table.column("n").to_pylist(), strict=True))
    )


def prefixes_of(
    paths: pa.ChunkedArray | pa.Array,
    sources: pa.ChunkedArray | pa.Array,
    depth: int,
    *,
    containers: pa.ChunkedArray | pa.Array | None = None,
    members: pa.ChunkedArray | pa.Array | None = None,
) -> pa.Array:
    """:func:`prefix_of` for whole columns, in Arrow compute kernels (members: where ``containers`` is set)."""
    if depth == 0:
        return pa.array([_NO_PREFIX] * len(paths), pa.string())
    paths, sources = _whole(paths), _whole(sources)
    prefixes = _folders(_below(paths, sources), depth)
    if containers is None or members is None or not pc.any(pc.is_valid(containers)).as_py():
        return prefixes
    containers = _whole(containers)
    archive = pc.utf8_ltrim(_below(containers, sources), "/")
    if depth > 1:
        inside = _folders(_whole(members), depth - 1, missing="")
        archive = pc.if_else(pc.equal(inside, ""), archive, pc.binary_join_element_wise(archive, inside, "/"))
    archive = pc.if_else(pc.equal(archive, ""), _NO_PREFIX, archive)
    return pc.if_else(pc.is_valid(containers), archive, prefixes)


def _whole(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _below(paths: pa.Array, sources: pa.Array) -> pa.Array:
    """Each path with its row's source cut off its start (unchanged where it does not start with it)."""
    relative = paths
    for source in pc.unique(pc.drop_null(sources)).to_pylist():
        inside = pc.fill_null(pc.and_(pc.equal(sources, source), pc.starts_with(paths, source)), False)
        relative = pc.if_else(inside, pc.utf8_slice_codeunits(paths, len(source)), relative)
    return relative


def _folders(relative: pa.Array, depth: int, missing: str = _NO_PREFIX) -> pa.Array:
    """The first ``depth`` folders of each relative path (its last component is the file's name)."""
    relative = pc.replace_substring_regex(relative, pattern="/+", replacement="/")
    folder = pc.replace_substring_regex(pc.utf8_ltrim(relative, "/"), pattern="/?[^/]*$", replacement="")
    first = pc.extract_regex(folder, pattern=rf"^(?P<p>[^/]+(?:/[^/]+){{0,{depth - 1}}})")
    return pc.fill_null(pc.struct_field(first, "p"), missing)


def summarise(scores_dir: str, prefix_depth: int = 1, storage_options: dict[str, Any] | None = None) -> Summary:
    """Stream the scores files once and return every aggregate.

    Files are read one after the other without threads: the dataset-wide scanner read ahead of the
    aggregation and held up to 850 MB of decoded batches at 10 million rows (BENCHMARKS.md)."""
    fs, root = filesystem(scores_dir, storage_options)
    dataset = pads.dataset(root, filesystem=fs, format="parquet", schema=schema.SCORES_SCHEMA)
    aggregates = _Aggregates(prefix_depth)
    for fragment in dataset.get_fragments():
        for batch in fragment.to_batches(columns=_COLUMNS, schema=schema.SCORES_SCHEMA, use_threads=False):
            aggregates.add(batch)
    return aggregates.result()


def write_report(
    out: str,
    prefix_depth: int = 1,
    storage_options: dict[str, Any] | None = None,
    *,
    facts: RunFacts | None = None,
    thumbnails: int = 24,
    plots_dir: str | None = None,
) -> Summary:
    """Compute the aggregates of ``out/scores`` and write them under ``out/report``, ``index.html`` included.

    Args:
        out: The scan's output directory.
        prefix_depth: Path components below the source root for the prefix breakdown.
        storage_options: fsspec options for a remote ``out``.
        facts: Run-level facts to show beside the aggregates (wall time, throughput, threshold).
        thumbnails: Images per thumbnail grid of the HTML page.
        plots_dir: An evaluation's plots folder, whose plots the HTML page includes.

    Returns:
        The summary; ``summary.json`` holds it with the prefixes and errors truncated.
    """
    summary = dataclasses.replace(
        summarise(join(out, schema.SCORES_DIR), prefix_depth, storage_options), facts=facts or RunFacts()
    )
    report_dir = join(out, schema.REPORT_DIR)
    fs, root = filesystem(report_dir, storage_options)
    fs.makedirs(root, exist_ok=True)
    for name, key, counts in (
        ("status", "status", summary.status_counts),
        ("labels", "label", summary.label_counts),
        ("formats", "format", summary.format_counts),
    ):
        write_parquet(
            join(report_dir, f"{name}.parquet"), {key: list(counts), "count": list(counts.values())}, storage_options
        )
    write_parquet(join(report_dir, "histogram.parquet"), summary.histogram, storage_options)
    if summary.prefixes:
        write_parquet(join(report_dir, "prefixes.parquet"), summary.prefixes, storage_options)
    no_errors = {
        "status": pa.array([], pa.string()),
        "error": pa.array([], pa.string()),
        "count": pa.array([], pa.int64()),
    }
    write_parquet(join(report_dir, "errors.parquet"), summary.errors or no_errors, storage_options)
    no_provenance = {"provenance": pa.array([], pa.string()), "files": pa.array([], pa.int64())}
    write_parquet(join(report_dir, "provenance.parquet"), summary.provenance or no_provenance, storage_options)
    media = pa.Table.from_pylist(summary.media, schema=_MEDIA_SCHEMA)
    write_parquet(join(report_dir, "media.parquet"), media, storage_options)
    write_json(join(report_dir, schema.SUMMARY_FILE), summary.to_json(prefixes=100, errors=TOP_ERRORS), storage_options)
    png = _plot_histogram(summary)
    with fs.open(f"{root}/histogram.png", "wb") as handle:
        handle.write(png)
    page.write_html(out, summary, png, storage_options=storage_options, thumbnails=thumbnails, plots_dir=plots_dir)
    return summary


def rebuild(out: str, storage_options: dict[str, Any] | None = None, thumbnails: int = 24) -> tuple[str, Summary]:
    """Re-create a scan's report (aggregates and ``index.html``) from its scores and ``_run.json``.

    ``out`` is a scan's output, or an evaluation's, whose scan is in ``scan/`` and whose plots in
    ``plots/`` are then included. Returns the scan folder and the summary.

    Raises:
        FileNotFoundError: ``out`` holds neither a scan nor an evaluation.
    """
    fs, root = filesystem(out, storage_options)
    scan_out, plots_dir = out, None
    if not fs.exists(f"{root}/{schema.RUN_FILE}") and fs.exists(f"{root}/{schema.EVAL_SCAN_DIR}/{schema.RUN_FILE}"):
        scan_out, plots_dir = join(out, schema.EVAL_SCAN_DIR), join(out, schema.PLOTS_DIR)
    try:
        run = read_json(join(scan_out, schema.RUN_FILE), storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"{out} holds no scan (no {schema.RUN_FILE}) and no evaluation") from None
    config = run.get("config", {})
    prefix_depth = int(config.get("prefix_depth", config.get("group_depth", 1)))  # group_depth: its old name
    return scan_out, write_report(
        scan_out, prefix_depth, storage_options, facts=_recorded_facts(run), thumbnails=thumbnails, plots_dir=plots_dir
    )


def _recorded_facts(run: dict[str, Any]) -> RunFacts:
    """The run-level facts a scan's ``_run.json`` recorded."""
    resolved = run.get("resolved", {})
    last = (run.get("attempts") or [{}])[-1]
    scored, wall = last.get("rows_scored"), run.get("wall_seconds")
    return RunFacts(
        threshold=resolved.get("threshold"),
        preprocess=resolved.get("preprocess"),
        model_id=run.get("model_id"),
        untrained_model=bool(run.get("model", {}).get("info", {}).get("untrained")),
        wall_seconds=wall,
        images_per_s=scored / wall if scored and wall else None,
        first_result_seconds=last.get("first_result_seconds"),
    )


def _plot_histogram(summary: Summary) -> bytes:
    from matplotlib.figure import Figure

    hist = summary.histogram
    starts = np.array(hist["bin_start"])
    width = starts[1] - starts[0] if len(starts) > 1 else 1.0
    fig = Figure(figsize=(7, 3.5), dpi=100)
    ax = fig.subplots()
    ax.bar(starts, hist[schema.LABEL_REAL], width=width, align="edge", color="#4c72b0", label="real")
    ax.bar(
        starts,
        hist[schema.LABEL_AI],
        width=width,
        align="edge",
        bottom=hist[schema.LABEL_REAL],
        color="#dd8452",
        label="ai",
    )
    threshold = summary.facts.threshold
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("score = P(AI-generated)")
    ax.set_ylabel("images")
    title = f"{summary.ok} scored images ({summary.failed} failed)"
    if summary.facts.untrained_model:
        title += " - UNTRAINED MODEL: scores mean nothing"
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def closing_line(summary: Summary) -> str:
    """The one-line result the CLI prints last."""
    reasons = [f"{s} {c}" for s, c in summary.status_counts.items() if s != schema.Status.OK.value and c]
    why = f" ({', '.join(reasons)})" if reasons else ""
    rate = summary.facts.images_per_s
    rate_text = f", {rate:.1f} img/s" if rate is not None else ""
    return (
        f"scanned {summary.total} files: ok {summary.ok}, failed {summary.failed}{why}, "
        f"flagged {summary.label_counts[schema.LABEL_AI]} as ai{_flagged_motion(summary)}{rate_text}"
    )


def _flagged_motion(summary: Summary) -> str:
    """`` (of which 2 videos, 1 animation)`` after the flagged count when a scan holds videos or animations, so
    clips are not read as stills; empty for a scan of stills."""
    motion = [m for m in summary.media if m["media"] != schema.MEDIA_STILL]
    if not any(m["files"] for m in motion):
        return ""
    return " (of which " + ", ".join(f"{m['ai']} {m['media']}{'' if m['ai'] == 1 else 's'}" for m in motion) + ")"
