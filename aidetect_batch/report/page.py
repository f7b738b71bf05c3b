"""``OUT/report/index.html``: one self-contained page a moderator or researcher opens first.

Everything is inline (plots and thumbnails as base64 data URIs, a few lines of
script to sort the prefix table), so the file can be mailed or opened offline.
It shows totals and statuses, the score histogram with the threshold, the
per-prefix table, formats and top errors, provenance counts and the files whose
own bytes state AI origin, stills, videos and animations counted apart, two
thumbnail grids (the images most likely AI, and those nearest the threshold,
which a person should look at), and an evaluation's plots when present.

The grids are chosen in one streaming pass over the scores that keeps at most
a few hundred candidate rows, so memory does not grow with the scan.
Thumbnails are read back from the scanned inputs (local or S3) by each row's
``path`` through the input kinds (:func:`aidetect_batch.inputs.item.read_path`,
so an archive member reopens its member), decoded with the scan's bomb guard
and capped in pixels and bytes; an input that cannot be read any more shows as
a placeholder. A video or an animation shows as a strip of its frames, sampled
again from its bytes with the count the scan scored (:func:`frame_strip`), the
most AI-looking one (``frame_max_t``) outlined with its time, so a person sees
where in the clip the model looked.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import logging
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from PIL import Image

from aidetect_batch import schema
from aidetect_batch.config import DEFAULT_MAX_FILE_MB
from aidetect_batch.inputs import item
from aidetect_batch.media import decode, video
from aidetect_batch.schema import Summary
from aidetect_batch.storage import filesystem, join

_logger = logging.getLogger(__name__)

THUMBNAILS = 24
THUMB_PX = 160
THUMB_MAX_SOURCE_BYTES = 64 << 20
THUMB_MAX_PIXELS = 50_000_000
FRAME_PX = 96
# A video is read whole, as the scan read it under the default --max-file-mb, and sampled for at most this long.
THUMB_MAX_VIDEO_BYTES = DEFAULT_MAX_FILE_MB << 20
THUMB_VIDEO_BUDGET_S = 10.0
PROVENANCE_ROWS = 200
REPOST_GROUPS = 10
_DEFINITE = pa.array(schema.DEFINITE_AI, pa.string())
EVAL_PLOTS = ("roc.png", "pr.png", "confusion.png", "histograms.png", "reliability.png", "robustness.png")


def pick_rows(scores_dir: str, n: int, threshold: float, *, storage_options: dict[str, Any] | None = None) -> dict:
    """In one pass over the scores: the ``n`` highest-scored ok rows, the ``n`` nearest ``threshold``, and
    the first ``PROVENANCE_ROWS`` files (by path) whose own bytes state AI origin, whatever their status."""
    fs, root = filesystem(scores_dir, storage_options)
    dataset = pads.dataset(root, filesystem=fs, format="parquet", schema=schema.SCORES_SCHEMA)
    columns = [
        schema.PATH,
        schema.SCORE,
        schema.LABEL,
        schema.FORMAT,
        schema.N_FRAMES,
        schema.DURATION_S,
        schema.SCORE_MAX,
        schema.FRAME_MAX_T,
    ]
    evidence = [*columns, schema.STATUS, schema.PROVENANCE, schema.PROVENANCE_DETAIL]
    top = pa.schema([schema.SCORES_SCHEMA.field(c) for c in columns]).empty_table()
    near = top
    definite = pa.schema([schema.SCORES_SCHEMA.field(c) for c in evidence]).empty_table()
    for batch in dataset.to_batches(columns=evidence, batch_size=65_536):
        stated = pa.Table.from_batches([batch]).filter(pc.is_in(batch.column(schema.PROVENANCE), _DEFINITE))
        if stated.num_rows:
            both = pa.concat_tables([definite, stated])
            definite = _keep(both, np.zeros(both.num_rows), PROVENANCE_ROWS)
        table = pa.Table.from_batches([batch]).filter(pc.equal(batch.column(schema.STATUS), schema.Status.OK.value))
        table = table.select(columns)
        if not table.num_rows:
            continue
        both = pa.concat_tables([top, table])
        top = _keep(both, -_scores(both), n)
        both = pa.concat_tables([near, table])
        near = _keep(both, np.abs(_scores(both) - threshold), n)
    return {"top_ai": top.to_pylist(), "near_threshold": near.to_pylist(), "provenance": definite.to_pylist()}


def _scores(table: pa.Table) -> np.ndarray:
    return table.column(schema.SCORE).to_numpy(zero_copy_only=False).astype(np.float64)


def _keep(table: pa.Table, key: np.ndarray, n: int) -> pa.Table:
    """Rows with the ``n`` smallest keys, in key order (ties by path, so the page is reproducible)."""
    paths = np.asarray(table.column(schema.PATH).to_pylist(), dtype=object)
    order = np.lexsort((paths, key))[:n]
    return table.take(pa.array(order, pa.int64()))


def thumbnail(path: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """A JPEG data URI of at most ``THUMB_PX`` pixels a side, or ``None`` when the input is unusable now.

    ``path`` is a row's identity; an Item read as several views shows its first."""
    try:
        data = item.read_path(path, item.ReadOptions(storage_options or {}, THUMB_MAX_SOURCE_BYTES))
        result = decode.decode_image(data if isinstance(data, bytes) else data[0], THUMB_MAX_PIXELS, THUMB_PX)
    except Exception as exc:  # noqa: BLE001 - a file gone since the scan is a placeholder, not a failed report
        _logger.info("no thumbnail for %s: %s", path, exc)
        return None
    return None if result.image is None else _jpeg_uri(result.image, THUMB_PX)


@dataclasses.dataclass(frozen=True)
class StripFrame:
    """One frame of a video's strip: its time in seconds, and a JPEG data URI."""

    t: float
    uri: str


def frame_strip(path: str, n_frames: int, storage_options: dict[str, Any] | None = None) -> list[StripFrame] | None:
    """The frames of the video or animation whose row is ``path``, sampled again from its bytes with the count
    the scan scored (the same times when every target the scan asked for decoded), each at most ``FRAME_PX`` a
    side; ``None`` when the input is unusable now."""
    try:
        data = item.read_path(path, item.ReadOptions(storage_options or {}, THUMB_MAX_VIDEO_BYTES))
        clip = video.sample(
            data if isinstance(data, bytes) else data[0],
            n_frames,
            max_pixels=THUMB_MAX_PIXELS,
            budget_s=THUMB_VIDEO_BUDGET_S,
        )
    except Exception as exc:  # noqa: BLE001 - a file gone since the scan is a placeholder, not a failed report
        _logger.info("no frames for %s: %s", path, exc)
        return None
    return [StripFrame(f.t, _jpeg_uri(f.image, FRAME_PX)) for f in clip.frames] or None


def _jpeg_uri(image: Image.Image, side: int) -> str:
    """A JPEG data URI of ``image`` shrunk to at most ``side`` pixels a side."""
    small = image.copy()
    small.thumbnail((side, side), Image.BILINEAR)
    buffer = io.BytesIO()
    small.convert("RGB").save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _table(rows: list[dict[str, Any]], columns: list[str], table_id: str = "", *, sortable: bool = False) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f'<td data-v="{value:.6g}">{value:.3f}</td>'
        if value is None:
            return '<td data-v="">–</td>'
        return f'<td data-v="{html.escape(str(value))}">{html.escape(str(value))}</td>'

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(cell(r.get(c)) for c in columns) + "</tr>" for r in rows)
    attrs = f' id="{table_id}"' if table_id else ""
    attrs += ' class="sortable"' if sortable else ""
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_MISSING = '<div class="thumb missing">not readable</div>'


def _grid(rows: list[dict[str, Any]], storage_options: dict[str, Any] | None) -> str:
    if not rows:
        return "<p>No scored images.</p>"
    cards = [_clip_card(r, storage_options) if r.get(schema.N_FRAMES) else _card(r, storage_options) for r in rows]
    return '<div class="grid">' + "".join(cards) + "</div>"


def _card(row: dict[str, Any], storage_options: dict[str, Any] | None) -> str:
    uri = thumbnail(row[schema.PATH], storage_options)
    name = html.escape(row[schema.PATH])
    picture = f'<img class="thumb" src="{uri}" alt="{name}">' if uri else _MISSING
    return f"<figure>{picture}<figcaption>{_caption(row)}</figcaption></figure>"


def _clip_card(row: dict[str, Any], storage_options: dict[str, Any] | None) -> str:
    """A video or an animation: its frames in a strip, the most AI-looking one outlined with its time."""
    frames = frame_strip(row[schema.PATH], row[schema.N_FRAMES], storage_options)
    top_t = row.get(schema.FRAME_MAX_T)
    top = None if not frames or top_t is None else int(np.argmin([abs(f.t - top_t) for f in frames]))
    picture = _MISSING
    if frames:
        picture = "".join(_strip_frame(f, top=i == top) for i, f in enumerate(frames))
        picture = f'<div class="strip">{picture}</div>'
    caption = _caption(row, _clip_facts(row, outlined=top is not None))
    return f'<figure class="clip">{picture}<figcaption>{caption}</figcaption></figure>'


def _clip_facts(row: dict[str, Any], *, outlined: bool) -> str:
    """``MP4, 8 frames of 3.00 s; most AI-looking frame (0.990) at 1.25 s, outlined``."""
    duration, top_t, top_score = row.get(schema.DURATION_S), row.get(schema.FRAME_MAX_T), row.get(schema.SCORE_MAX)
    facts = f"{html.escape(row.get(schema.FORMAT) or 'clip')}, {row[schema.N_FRAMES]} frames"
    facts += f" of {duration:.2f} s" if duration is not None else ""
    if top_t is not None and top_score is not None:
        facts += f"; most AI-looking frame ({top_score:.3f}) at {top_t:.2f} s" + (", outlined" if outlined else "")
    return facts


def _strip_frame(frame: StripFrame, *, top: bool) -> str:
    when = f"{frame.t:.2f} s"
    return (
        f'<div class="frame{" top" if top else ""}" data-t="{frame.t:.6g}">'
        f'<img src="{frame.uri}" alt="frame at {when}" title="{when}"><span>{when}</span></div>'
    )


def _caption(row: dict[str, Any], about: str = "") -> str:
    name = html.escape(row[schema.PATH])
    return (
        f"<b>{row[schema.SCORE]:.3f}</b> {html.escape(row[schema.LABEL] or '')}"
        + (f"<br>{about}" if about else "")
        + f'<br><span title="{name}">{name}</span>'
    )


def _provenance_section(summary: Summary, rows: list[dict[str, Any]]) -> list[str]:
    """Counts by provenance kind, then the files whose own bytes state AI origin, with the evidence."""
    total = sum(r["files"] for r in summary.provenance if r["definite_ai"])
    shown = f"the first {len(rows)} by path" if total > len(rows) else "all of them"
    listing = _table(
        rows,
        [schema.PATH, schema.PROVENANCE, schema.PROVENANCE_DETAIL, schema.STATUS, schema.SCORE, schema.LABEL],
        "provenance",
        sortable=True,
    )
    return [
        "<h2>Provenance</h2><p>What each file's own bytes say about its origin (C2PA, IPTC, generator metadata, "
        "watermark), beside the model's label. A C2PA manifest that fails validation is never proof.</p>",
        _table(summary.provenance, ["provenance", "files", "ai", "real", "definite_ai"]),
        f"<h3>Files with definite AI provenance ({total:,}; {shown})</h3>",
        listing if rows else "<p>None.</p>",
    ]


def _motion(summary: Summary) -> list[dict[str, Any]]:
    """The media rows of videos and animations, or none when the scan holds stills only."""
    rows = [m for m in summary.media if m["media"] != schema.MEDIA_STILL]
    return rows if any(m["files"] for m in rows) else []


def _media_section(summary: Summary) -> list[str]:
    """Stills, videos and animations counted apart (``media.parquet``); nothing for a scan of stills."""
    if not _motion(summary):
        return []
    columns = ["media", "files", "ok", "failed", "duplicates", "ai", "real", "ai_rate", "mean_score", "frames"]
    return [
        "<h2>Stills, videos and animations</h2><p>A video or an animated GIF/WebP/APNG is one file whose sampled "
        "frames are scored together; <i>frames</i> counts the frames scored.</p>",
        _table(summary.media, columns, "media"),
    ]


def pick_groups(groups_uri: str, n: int, storage_options: dict[str, Any] | None = None) -> dict[str, list[dict]]:
    """From ``reposts/groups.parquet``: the ``n`` largest groups most of whose members are labelled ai, and the
    ``n`` largest whose members disagree."""
    fs, path = filesystem(groups_uri, storage_options)
    with fs.open(path, "rb") as handle:
        groups = pq.read_table(handle)
    flagged = groups.filter(pc.greater(groups.column("n_ai"), groups.column("n_real")))
    split = groups.filter(groups.column("disagree"))
    largest = [("size", "descending"), ("group_id", "ascending")]
    return {
        "flagged": flagged.sort_by(largest).slice(0, n).to_pylist(),
        "disagree": split.sort_by(largest).slice(0, n).to_pylist(),
        "total": [groups.num_rows],
    }


def _reposts_section(reposts: dict[str, list[dict[str, Any]]], storage_options: dict[str, Any] | None) -> list[str]:
    """Repost groups (``aidetect-batch reposts``): the largest flagged ai, and those whose copies disagree."""
    columns = ["group_id", "size", "n_prefixes", "n_ai", "n_real", "score_min", "score_median", "score_max"]

    def cards(rows: list[dict[str, Any]]) -> str:
        if not rows:
            return "<p>None.</p>"
        shown = [{schema.PATH: r["representative"], schema.SCORE: r["score_median"] or math.nan,
                  schema.LABEL: f"group {r['group_id']}: {r['size']} copies"} for r in rows]  # fmt: skip
        return _grid(shown, storage_options) + _table(rows, [*columns, "representative"], sortable=True)

    return [
        f"<h2>Reposts ({reposts['total'][0]:,} groups of near-duplicates)</h2>",
        "<p>Groups of the same picture re-encoded, resized, cropped or overlaid (PDQ distance), each shown by "
        "one member with its group's median score.</p>",
        f"<h3>Largest groups flagged AI ({len(reposts['flagged'])})</h3>",
        cards(reposts["flagged"]),
        f"<h3>Groups whose copies disagree ({len(reposts['disagree'])}): worth a person's look</h3>",
        cards(reposts["disagree"]),
    ]


_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{margin-bottom:4px} .warn{background:#fde2e1;padding:8px;border-radius:4px}
table{border-collapse:collapse;margin:8px 0 20px;font-size:14px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left} th{background:#f2f2f2}
table.sortable th{cursor:pointer} table.sortable th:after{content:" \\2195";color:#999}
.totals span{display:inline-block;margin-right:24px;font-size:18px}
.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:170px;font-size:12px;word-break:break-all}
.thumb{max-width:160px;max-height:160px;display:block}
.missing{width:160px;height:100px;background:#eee;color:#888;display:flex;align-items:center;justify-content:center}
figure.clip{width:auto;max-width:100%} .strip{display:flex;flex-wrap:wrap;gap:4px}
.frame{padding:3px;text-align:center;font-size:11px;color:#666} .frame img{display:block;max-width:96px;max-height:96px}
.frame.top{outline:3px solid #d62728;color:#d62728;font-weight:bold}
"""

_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach(function (th, i) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0];
    var asc = th.dataset.asc !== '1';
    th.dataset.asc = asc ? '1' : '0';
    Array.from(body.rows).sort(function (a, b) {
      var x = a.cells[i].dataset.v, y = b.cells[i].dataset.v, nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    }).forEach(function (r) { body.appendChild(r); });
  });
});
window.addEventListener('load', function () {
  var imgs = Array.from(document.images);
  document.body.dataset.images = imgs.length;
  document.body.dataset.imagesRendered = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
});
"""


def render(
    summary: Summary,
    picks: dict[str, list[dict[str, Any]]],
    histogram_png: bytes,
    *,
    storage_options: dict[str, Any] | None = None,
    eval_plots: dict[str, bytes] | None = None,
    reposts: dict[str, list[dict[str, Any]]] | None = None,
    title: str = "aidetect-batch scan report",
) -> str:
    """The whole page as one HTML string."""
    facts = summary.facts
    statuses = [{"status": s, "files": c} for s, c in summary.status_counts.items() if c]
    formats = [{"format": f, "files": c} for f, c in summary.format_counts.items()]
    errors = summary.errors[:20]
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>model {html.escape(str(facts.model_id or '?'))}, preprocess "
        f"{html.escape(str(facts.preprocess or '?'))}, threshold {facts.threshold}</p>",
        "<p class='warn'>UNTRAINED MODEL: these scores mean nothing.</p>" if facts.untrained_model else "",
        "<div class='totals'>"
        + "".join(f"<span>{k} <b>{getattr(summary, k):,}</b></span>" for k in ("total", "ok", "failed", "duplicates"))
        + f"<span>flagged ai <b>{summary.label_counts.get(schema.LABEL_AI, 0):,}</b></span>"
        + "".join(f"<span>flagged {m['media']}s <b>{m['ai']:,}</b></span>" for m in _motion(summary))
        + "</div>",
        "<h2>Scores</h2>",
        f'<img id="histogram" src="{_png_uri(histogram_png)}" alt="score histogram">',
        "<h2>Statuses</h2>",
        _table(statuses, ["status", "files"]),
        *_media_section(summary),
        "<h2>By prefix</h2><p>Click a column to sort.</p>",
        _table(
            summary.prefixes,
            ["prefix", "files", "ok", "failed", "duplicates", "ai", "real", "ai_rate", "mean_score"],
            "prefixes",
            sortable=True,
        ),
        "<h2>Formats</h2>",
        _table(formats, ["format", "files"]),
        "<h2>Top errors</h2>",
        _table(errors, ["status", "error", "count", "example_path", "example_error"]) if errors else "<p>None.</p>",
        *_provenance_section(summary, picks["provenance"]),
        f"<h2>Most likely AI ({len(picks['top_ai'])})</h2>",
        _grid(picks["top_ai"], storage_options),
        f"<h2>Nearest the threshold ({len(picks['near_threshold'])}): worth a person's look</h2>",
        _grid(picks["near_threshold"], storage_options),
    ]
    if reposts is not None:
        parts += _reposts_section(reposts, storage_options)
    if eval_plots:
        parts.append("<h2>Evaluation</h2>")
        parts += [f'<img class="plot" src="{_png_uri(data)}" alt="{html.escape(n)}">' for n, data in eval_plots.items()]
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts)


def write_html(
    out: str,
    summary: Summary,
    histogram_png: bytes,
    *,
    storage_options: dict[str, Any] | None = None,
    thumbnails: int = THUMBNAILS,
    plots_dir: str | None = None,
) -> str:
    """Write ``out/report/index.html`` and return its URI. ``plots_dir``: an evaluation's plots to include."""
    threshold = summary.facts.threshold
    picks = pick_rows(
        join(out, schema.SCORES_DIR),
        thumbnails,
        0.5 if threshold is None else threshold,
        storage_options=storage_options,
    )
    eval_plots = {}
    if plots_dir:
        fs, root = filesystem(plots_dir, storage_options)
        for name in EVAL_PLOTS:
            if fs.exists(f"{root}/{name}"):
                eval_plots[name] = fs.cat_file(f"{root}/{name}")
    groups_uri = join(out, schema.REPOSTS_DIR, schema.REPOST_GROUPS_FILE)
    fs, groups_path = filesystem(groups_uri, storage_options)
    reposts = pick_groups(groups_uri, REPOST_GROUPS, storage_options) if fs.exists(groups_path) else None
    page = render(
        summary, picks, histogram_png, storage_options=storage_options, eval_plots=eval_plots, reposts=reposts
    )
    uri = join(out, schema.REPORT_DIR, "index.html")
    fs, path = filesystem(uri, storage_options)
    with fs.open(path, "w", encoding="utf-8") as handle:
        handle.write(page)
    return uri
