"""Aggregates computed from the scores Parquet: what a person reads first.

The report streams the scores files in record batches, so memory depends on
the number of distinct prefixes, formats and error kinds, not on the number
of rows. It writes ``OUT/report/*.parquet``, ``summary.json``, a score
histogram plot and ``index.html`` (:mod:`aidetect_batch.html_report`), and
can be rebuilt at any time from the scores alone (``aidetect-batch report``).
"""

from __future__ import annotations

import io
import re
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from aidetect_batch import html_report, schema
from aidetect_batch.storage import filesystem, join, read_json, write_json, write_parquet

HISTOGRAM_BINS = 20
TOP_ERRORS = 20
_DIGITS = re.compile(r"\d+")
_NO_PREFIX = "(root)"


def prefix_of(path: str, source: str | None, depth: int) -> str:
    """First ``depth`` folder components of ``path`` below ``source``."""
    if depth == 0:
        return _NO_PREFIX
    relative = path[len(source) :] if source and path.startswith(source) else path
    parts = [p for p in relative.split("/") if p][:-1]
    return "/".join(parts[:depth]) or _NO_PREFIX


def _new_prefix_row() -> dict[str, float]:
    return {"files": 0, "ok": 0, "failed": 0, "duplicates": 0, "ai": 0, "real": 0, "score_sum": 0.0}


def summarise(scores_dir: str, group_depth: int = 1, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Stream the scores files once and return every aggregate as plain Python data."""
    fs, root = filesystem(scores_dir, storage_options)
    dataset = pads.dataset(root, filesystem=fs, format="parquet", schema=schema.SCORES_SCHEMA)
    status_counts: Counter[str] = Counter()
    label_counts: Counter[str] = Counter()
    format_counts: Counter[str] = Counter()
    errors: dict[tuple[str, str], dict[str, Any]] = {}
    prefixes: dict[str, dict[str, float]] = defaultdict(_new_prefix_row)
    histogram = {lab: np.zeros(HISTOGRAM_BINS, dtype=np.int64) for lab in ("all", schema.LABEL_AI, schema.LABEL_REAL)}
    edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    stage_ms = {"read": 0.0, "decode": 0.0, "infer": 0.0}
    stage_rows = {"read": 0, "decode": 0, "infer": 0}
    columns = [
        schema.PATH,
        schema.SOURCE,
        schema.STATUS,
        schema.ERROR,
        schema.SCORE,
        schema.LABEL,
        schema.FORMAT,
        schema.T_READ_MS,
        schema.T_DECODE_MS,
        schema.T_INFER_MS,
    ]
    for batch in dataset.to_batches(columns=columns):
        data = batch.to_pydict()
        scores = batch.column(schema.SCORE).to_numpy(zero_copy_only=False).astype(np.float64)
        labels = data[schema.LABEL]
        finite = np.isfinite(scores)
        histogram["all"] += np.histogram(scores[finite], bins=edges)[0]
        for lab in (schema.LABEL_AI, schema.LABEL_REAL):
            mask = finite & np.array([x == lab for x in labels], dtype=bool)
            histogram[lab] += np.histogram(scores[mask], bins=edges)[0]
        for stage, column in (("read", schema.T_READ_MS), ("decode", schema.T_DECODE_MS), ("infer", schema.T_INFER_MS)):
            values = batch.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
            values = values[np.isfinite(values)]
            stage_ms[stage] += float(values.sum())
            stage_rows[stage] += int(values.size)
        for i, path in enumerate(data[schema.PATH]):
            status = data[schema.STATUS][i]
            status_counts[status] += 1
            label_counts[labels[i] or "none"] += 1
            format_counts[data[schema.FORMAT][i] or "unknown"] += 1
            row = prefixes[prefix_of(path, data[schema.SOURCE][i], group_depth)]
            row["files"] += 1
            if status == schema.Status.OK.value:
                row["ok"] += 1
                row["score_sum"] += float(scores[i])
                row[labels[i]] += 1
            elif status == schema.Status.DUPLICATE.value:
                row["duplicates"] += 1
            else:
                row["failed"] += 1
                kind = _DIGITS.sub("#", data[schema.ERROR][i] or "")
                entry = errors.setdefault(
                    (status, kind), {"count": 0, "example_path": path, "example_error": data[schema.ERROR][i]}
                )
                entry["count"] += 1
    total = sum(status_counts.values())
    ok = status_counts.get(schema.Status.OK.value, 0)
    duplicates = status_counts.get(schema.Status.DUPLICATE.value, 0)
    prefix_rows = [
        {
            "prefix": prefix,
            "files": int(r["files"]),
            "ok": int(r["ok"]),
            "failed": int(r["failed"]),
            "duplicates": int(r["duplicates"]),
            "ai": int(r["ai"]),
            "real": int(r["real"]),
            "ai_rate": r["ai"] / r["ok"] if r["ok"] else None,
            "mean_score": r["score_sum"] / r["ok"] if r["ok"] else None,
        }
        for prefix, r in sorted(prefixes.items())
    ]
    error_rows = sorted(
        ({"status": s, "error": k, **v} for (s, k), v in errors.items()),
        key=lambda e: (-e["count"], e["status"], e["error"]),
    )
    return {
        "total": total,
        "ok": ok,
        "failed": total - ok - duplicates,
        "duplicates": duplicates,
        "status_counts": {s.value: status_counts.get(s.value, 0) for s in schema.Status},
        "label_counts": {k: label_counts.get(k, 0) for k in (schema.LABEL_AI, schema.LABEL_REAL, "none")},
        "format_counts": dict(format_counts.most_common()),
        "histogram": {
            "bin_start": edges[:-1].round(4).tolist(),
            "bin_end": edges[1:].round(4).tolist(),
            **{k: v.tolist() for k, v in histogram.items()},
        },
        "prefixes": prefix_rows,
        "errors": error_rows,
        "stage_images_per_s": {
            stage: (stage_rows[stage] * 1000.0 / stage_ms[stage]) if stage_ms[stage] > 0 else None for stage in stage_ms
        },
    }


def write_report(
    out: str,
    group_depth: int = 1,
    storage_options: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    thumbnails: int = 24,
    plots_dir: str | None = None,
) -> dict[str, Any]:
    """Compute the aggregates of ``out/scores`` and write them under ``out/report``, ``index.html`` included.

    Args:
        out: The scan's output directory.
        group_depth: Path components below the source root for the prefix breakdown.
        storage_options: fsspec options for a remote ``out``.
        extra: Run-level facts to merge into ``summary.json`` (wall time, throughput, threshold).
        thumbnails: Images per thumbnail grid of the HTML page.
        plots_dir: An evaluation's plots folder, whose plots the HTML page includes.

    Returns:
        The summary as written to ``summary.json`` (prefixes and errors truncated there).
    """
    summary = summarise(join(out, schema.SCORES_DIR), group_depth, storage_options)
    summary.update(extra or {})
    report_dir = join(out, schema.REPORT_DIR)
    fs, root = filesystem(report_dir, storage_options)
    fs.makedirs(root, exist_ok=True)
    for name, key, counts in (
        ("status", "status", summary["status_counts"]),
        ("labels", "label", summary["label_counts"]),
        ("formats", "format", summary["format_counts"]),
    ):
        write_parquet(
            join(report_dir, f"{name}.parquet"), {key: list(counts), "count": list(counts.values())}, storage_options
        )
    write_parquet(join(report_dir, "histogram.parquet"), summary["histogram"], storage_options)
    if summary["prefixes"]:
        write_parquet(join(report_dir, "prefixes.parquet"), summary["prefixes"], storage_options)
    no_errors = {
        "status": pa.array([], pa.string()),
        "error": pa.array([], pa.string()),
        "count": pa.array([], pa.int64()),
    }
    write_parquet(join(report_dir, "errors.parquet"), summary["errors"] or no_errors, storage_options)
    short = dict(summary, prefixes=summary["prefixes"][:100], errors=summary["errors"][:TOP_ERRORS])
    write_json(join(report_dir, schema.SUMMARY_FILE), short, storage_options)
    png = _plot_histogram(summary)
    with fs.open(f"{root}/histogram.png", "wb") as handle:
        handle.write(png)
    html_report.write_html(out, summary, png, storage_options, thumbnails, plots_dir)
    return summary


def rebuild(out: str, storage_options: dict[str, Any] | None = None, thumbnails: int = 24) -> tuple[str, dict]:
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
    resolved = run.get("resolved", {})
    extra = {
        "threshold": resolved.get("threshold"),
        "preprocess": resolved.get("preprocess"),
        "model_id": run.get("model_id"),
        "untrained_model": bool(run.get("model", {}).get("info", {}).get("untrained")),
        "wall_seconds": run.get("wall_seconds"),
    }
    last = (run.get("attempts") or [{}])[-1]
    scored = last.get("rows_scored")
    if scored and run.get("wall_seconds"):
        extra["images_per_s"] = scored / run["wall_seconds"]
    if "first_result_seconds" in last:
        extra["first_result_seconds"] = last["first_result_seconds"]
    group_depth = int(run.get("config", {}).get("group_depth", 1))
    return scan_out, write_report(scan_out, group_depth, storage_options, extra, thumbnails, plots_dir)


def _plot_histogram(summary: dict[str, Any]) -> bytes:
    from matplotlib.figure import Figure

    hist = summary["histogram"]
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
    threshold = summary.get("threshold")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("score = P(AI-generated)")
    ax.set_ylabel("images")
    title = f"{summary['ok']} scored images ({summary['failed']} failed)"
    if summary.get("untrained_model"):
        title += " - UNTRAINED MODEL: scores mean nothing"
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def closing_line(summary: dict[str, Any]) -> str:
    """The one-line result the CLI prints last."""
    reasons = [f"{s} {c}" for s, c in summary["status_counts"].items() if s != schema.Status.OK.value and c]
    why = f" ({', '.join(reasons)})" if reasons else ""
    rate = summary.get("images_per_s")
    rate_text = f", {rate:.1f} img/s" if rate is not None else ""
    return (
        f"scanned {summary['total']} files: ok {summary['ok']}, failed {summary['failed']}{why}, "
        f"flagged {summary['label_counts'][schema.LABEL_AI]} as ai{rate_text}"
    )
