import json
import math
import os
import re
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aidetect_batch import schema
from aidetect_batch.config import redact
from aidetect_batch.report.aggregate import RunFacts, closing_line, media_of, prefix_of, summarise, write_report
from aidetect_batch.scan.config import ScanConfig
from aidetect_batch.scan.sink import ScoreWriter


def make_rows(spec):
    data = {name: [] for name in schema.SCORE_COLUMNS}
    for path, status, score, error in spec:
        for name in schema.SCORE_COLUMNS:
            data[name].append(None)
        data[schema.PATH][-1] = path
        data[schema.SOURCE][-1] = "/dump"
        data[schema.STATUS][-1] = status
        data[schema.ERROR][-1] = error
        data[schema.SCORE][-1] = score if status == "ok" else math.nan
        data[schema.LABEL][-1] = ("ai" if score >= 0.5 else "real") if status == "ok" else None
        data[schema.FORMAT][-1] = "JPEG" if status == "ok" else None
        data[schema.T_DECODE_MS][-1] = 10.0
        data[schema.T_INFER_MS][-1] = 5.0 if status == "ok" else None
    return pa.table(data)


def test_prefix_of():
    assert prefix_of("/dump/alice/2024/a.jpg", "/dump", 1) == "alice"
    assert prefix_of("/dump/alice/2024/a.jpg", "/dump", 2) == "alice/2024"
    assert prefix_of("/dump/a.jpg", "/dump", 1) == "(root)"
    assert prefix_of("s3://b/x/u1/a.jpg", "s3://b/x", 1) == "u1"
    assert prefix_of("/dump/alice/a.jpg", "/dump", 0) == "(root)"


def test_an_archive_is_a_prefix_of_its_own():
    member = "zip://data/tweets_media/a.jpg::/dump/exports/2024/x.zip"
    inside = {"container": "/dump/exports/2024/x.zip", "member": "data/tweets_media/a.jpg"}
    assert prefix_of(member, "/dump", 1, **inside) == "exports/2024/x.zip"
    assert prefix_of(member, "/dump", 3, **inside) == "exports/2024/x.zip/data/tweets_media"
    shard = {"container": "s3://b/s/0.tar", "member": "k.jpg"}
    assert prefix_of("tar://k.jpg::s3://b/s/0.tar", "s3://b/s", 2, **shard) == "0.tar"
    elsewhere = {"container": "s3://o/x.zip", "member": "a.jpg"}
    assert prefix_of("zip://a.jpg::s3://o/x.zip", "/dump", 1, **elsewhere) == "s3://o/x.zip", "not below"
    assert prefix_of(member, "/dump", 0, **inside) == "(root)"


def test_the_report_counts_each_archive_by_status_and_label(tmp_path):
    table = make_rows(
        [
            ("zip://a/1.jpg::/dump/u/x.zip", "ok", 0.9, None),
            ("zip://a/2.jpg::/dump/u/x.zip", "ok", 0.1, None),
            ("zip://b/3.jpg::/dump/u/x.zip", "truncated", None, "OSError: truncated"),
            ("tar://k.jpg::/dump/u/0.tar", "ok", 0.8, None),
            ("tar://j.jpg::/dump/u/0.tar", "duplicate", None, None),
            ("/dump/u/loose.jpg", "ok", 0.3, None),
        ]
    )
    containers = [p.split("::")[1] if "::" in p else None for p in table.column(schema.PATH).to_pylist()]
    members = [p.split("::")[0].split("://")[1] if "::" in p else None for p in table.column(schema.PATH).to_pylist()]
    table = table.set_column(table.schema.get_field_index(schema.CONTAINER), schema.CONTAINER, pa.array(containers))
    table = table.set_column(table.schema.get_field_index(schema.MEMBER), schema.MEMBER, pa.array(members))
    writer = ScoreWriter(os.path.join(str(tmp_path), schema.SCORES_DIR))
    writer.write(table)
    writer.close()
    summary = write_report(str(tmp_path), facts=RunFacts(threshold=0.5))
    counts = {
        p["prefix"]: {k: p[k] for k in ("files", "ok", "failed", "duplicates", "ai", "real")} for p in summary.prefixes
    }
    assert counts == {
        "u": {"files": 1, "ok": 1, "failed": 0, "duplicates": 0, "ai": 0, "real": 1},
        "u/0.tar": {"files": 2, "ok": 1, "failed": 0, "duplicates": 1, "ai": 1, "real": 0},
        "u/x.zip": {"files": 3, "ok": 2, "failed": 1, "duplicates": 0, "ai": 1, "real": 1},
    }
    inside = {p["prefix"]: p["files"] for p in summarise(os.path.join(str(tmp_path), schema.SCORES_DIR), 2).prefixes}
    assert inside == {"u": 1, "u/0.tar": 2, "u/x.zip/a": 2, "u/x.zip/b": 1}, "depth 2: an archive's folders"
    with open(os.path.join(str(tmp_path), schema.REPORT_DIR, "index.html"), encoding="utf-8") as handle:
        assert '<td data-v="u/x.zip">u/x.zip</td>' in handle.read()


def test_report_aggregates(tmp_path):
    out = str(tmp_path)
    writer = ScoreWriter(os.path.join(out, schema.SCORES_DIR))
    writer.write(
        make_rows(
            [
                ("/dump/alice/1.jpg", "ok", 0.92, None),
                ("/dump/alice/2.jpg", "ok", 0.2, None),
                ("/dump/bob/3.jpg", "ok", 0.97, None),
                ("/dump/bob/4.jpg", "truncated", None, "OSError: image file is truncated (12 bytes not processed)"),
                ("/dump/bob/5.jpg", "truncated", None, "OSError: image file is truncated (345 bytes not processed)"),
                ("/dump/6.jpg", "empty", None, "file has zero bytes"),
            ]
        )
    )
    writer.close()
    summary = write_report(out, facts=RunFacts(threshold=0.5, images_per_s=12.5))
    assert summary.total == 6 and summary.ok == 3 and summary.failed == 3
    assert summary.status_counts["truncated"] == 2 and summary.status_counts["unreadable"] == 0
    assert summary.label_counts == {"ai": 2, "real": 1, "none": 3}
    assert summary.histogram["ai"][18] == 1 and summary.histogram["ai"][19] == 1
    assert summary.histogram["real"][4] == 1 and sum(summary.histogram["all"]) == 3
    by_prefix = {p["prefix"]: p for p in summary.prefixes}
    assert by_prefix["alice"] == {
        "prefix": "alice",
        "files": 2,
        "ok": 2,
        "failed": 0,
        "duplicates": 0,
        "ai": 1,
        "real": 1,
        "ai_rate": 0.5,
        "mean_score": by_prefix["alice"]["mean_score"],
    }
    assert abs(by_prefix["alice"]["mean_score"] - 0.56) < 1e-6
    assert by_prefix["bob"]["failed"] == 2 and by_prefix["(root)"]["files"] == 1
    top = summary.errors[0]
    assert top["status"] == "truncated" and top["count"] == 2 and "#" in top["error"]
    assert summary.stage_images_per_s["decode"] == 100.0 and summary.stage_images_per_s["infer"] == 200.0
    with open(os.path.join(out, schema.REPORT_DIR, schema.SUMMARY_FILE)) as handle:
        assert json.load(handle)["total"] == 6
    with open(os.path.join(out, schema.REPORT_DIR, schema.SUMMARY_FILE)) as handle:
        document = json.load(handle)
    assert document["images_per_s"] == 12.5 and document["threshold"] == 0.5, "summary.json stays one flat document"
    assert document["errors"][0] == top and document["prefixes"] == summary.prefixes
    assert [(m["media"], m["files"], m["ai"]) for m in summary.media] == [
        ("still", 6, 2),
        ("video", 0, 0),
        ("animation", 0, 0),
    ]
    line = closing_line(summary)
    assert line == "scanned 6 files: ok 3, failed 3 (empty 1, truncated 2), flagged 2 as ai, 12.5 img/s"
    with open(os.path.join(out, schema.REPORT_DIR, "index.html"), encoding="utf-8") as handle:
        assert "Stills, videos and animations" not in handle.read(), "a scan of stills shows no media table"


def test_videos_and_animations_are_counted_apart_from_stills(tmp_path):
    """A video container is a video even when no frame decoded; a GIF is an animation only when frames were
    sampled from it; the frames scored are summed over the ok rows."""
    table = make_rows(
        [
            ("/dump/a/s1.jpg", "ok", 0.9, None),
            ("/dump/a/s2.jpg", "ok", 0.2, None),
            ("/dump/a/v1.mp4", "ok", 0.95, None),
            ("/dump/b/v2.mov", "ok", 0.1, None),
            ("/dump/b/v3.mp4", "undecodable", None, "none of 8 sampled frames decoded"),
            ("/dump/b/g1.gif", "ok", 0.8, None),
            ("/dump/b/g2.gif", "ok", 0.3, None),
            ("/dump/b/s3.jpg", "duplicate", None, None),
        ]
    )
    formats = ["JPEG", "JPEG", "MP4", "MOV", "MP4", "GIF", "GIF", None]
    frames = [None, None, 8, 5, None, 3, None, None]
    table = table.set_column(table.schema.get_field_index(schema.FORMAT), schema.FORMAT, pa.array(formats))
    table = table.set_column(
        table.schema.get_field_index(schema.N_FRAMES), schema.N_FRAMES, pa.array(frames, pa.int32())
    )
    writer = ScoreWriter(os.path.join(str(tmp_path), schema.SCORES_DIR))
    writer.write(table)
    writer.close()
    summary = write_report(str(tmp_path), facts=RunFacts(threshold=0.5))
    by_media = {m["media"]: m for m in summary.media}
    assert [m["media"] for m in summary.media] == ["still", "video", "animation"]
    counted = ("files", "ok", "failed", "duplicates", "ai", "real", "frames")
    assert {k: by_media["still"][k] for k in counted} == dict(zip(counted, (4, 3, 0, 1, 1, 2, 0), strict=True))
    assert {k: by_media["video"][k] for k in counted} == dict(zip(counted, (3, 2, 1, 0, 1, 1, 13), strict=True))
    assert {k: by_media["animation"][k] for k in counted} == dict(zip(counted, (1, 1, 0, 0, 1, 0, 3), strict=True))
    assert by_media["video"]["ai_rate"] == 0.5 and by_media["video"]["mean_score"] == pytest.approx(0.525)
    assert summary.label_counts["ai"] == 3
    report = os.path.join(str(tmp_path), schema.REPORT_DIR)
    assert pq.read_table(os.path.join(report, "media.parquet")).to_pylist() == summary.media
    with open(os.path.join(report, schema.SUMMARY_FILE)) as handle:
        assert json.load(handle)["media"] == summary.media
    assert closing_line(summary) == (
        "scanned 8 files: ok 6, failed 1 (undecodable 1, duplicate 1), flagged 3 as ai (of which 1 video, 1 animation)"
    )
    with open(os.path.join(report, "index.html"), encoding="utf-8") as handle:
        page = handle.read()
    assert "flagged videos <b>1</b>" in page and "flagged animations <b>1</b>" in page
    assert '<table id="media">' in page and '<td data-v="13">13</td>' in page, "the frames scored by videos"


def test_media_of_each_row():
    formats = pa.array(["MP4", "MOV", "WEBM", "MKV", "AVI", "GIF", "WEBP", "PNG", "JPEG", None, "MP4"])
    frames = pa.array([8, 8, 8, 8, 8, 3, 3, 2, None, None, None], pa.int32())
    assert media_of(formats, frames).to_pylist() == [
        *["video"] * 5,
        *["animation"] * 3,
        "still",
        "still",
        "video",
    ]


def test_secrets_are_redacted_in_the_written_config():
    cfg = ScanConfig(
        sources=("s3://b",),
        out="o",
        checkpoint="c",
        storage_options={
            "key": "AKIA",
            "secret": "s",
            "client_kwargs": {"endpoint_url": "http://x", "aws_session_token": "t"},
        },
    )
    written = cfg.to_json()["storage_options"]
    assert written == {
        "key": "***",
        "secret": "***",
        "client_kwargs": {"endpoint_url": "http://x", "aws_session_token": "***"},
    }
    assert redact({}) == {}


def _reference_summary(rows: list[dict], depth: int) -> dict:
    """The aggregates counted one row at a time in plain Python: the reference for the vectorised report."""
    statuses, labels, formats, prefixes, errors = Counter(), Counter(), Counter(), {}, {}
    media = {kind: Counter() for kind in schema.MEDIA_KINDS}
    for r in rows:
        kind = "video" if r[schema.FORMAT] == "MP4" else "animation" if r[schema.N_FRAMES] else "still"
        media[kind]["files"] += 1
        if r[schema.STATUS] == "ok":
            media[kind]["ok"] += 1
            media[kind][r[schema.LABEL]] += 1
            media[kind]["frames"] += r[schema.N_FRAMES] or 0
        statuses[r[schema.STATUS]] += 1
        labels[r[schema.LABEL] or "none"] += 1
        formats[r[schema.FORMAT] or "unknown"] += 1
        inside = {"container": r.get(schema.CONTAINER), "member": r.get(schema.MEMBER)}
        p = prefixes.setdefault(prefix_of(r[schema.PATH], r[schema.SOURCE], depth, **inside), Counter())
        p["files"] += 1
        if r[schema.STATUS] == "ok":
            p["ok"] += 1
            p[r[schema.LABEL]] += 1
            p["score_sum"] += r[schema.SCORE]
        elif r[schema.STATUS] == "duplicate":
            p["duplicates"] += 1
        else:
            p["failed"] += 1
            key = (r[schema.STATUS], re.sub(r"\d+", "#", r[schema.ERROR] or ""))
            errors.setdefault(key, [0, r[schema.PATH]])[0] += 1
    return {
        "status": statuses,
        "label": labels,
        "format": formats,
        "prefixes": prefixes,
        "errors": errors,
        "media": media,
    }


def test_vectorised_aggregates_match_a_row_by_row_count(tmp_path):
    """Several files (so batches are merged), two sources, nested folders, odd slashes, numbered errors, archive
    members below their source and elsewhere."""
    rng = np.random.default_rng(7)
    kinds = ["ok", "ok", "ok", "duplicate", "undecodable", "unreadable"]
    writer = ScoreWriter(str(tmp_path / schema.SCORES_DIR), rows_per_file=700)
    rows = []
    for i in range(3000):
        status = kinds[int(rng.integers(len(kinds)))]
        source = "/dump" if i % 3 else "s3://b/x"
        path = f"{source}/u{i % 11}//y{i % 4}/{i}.jpg" if i % 5 else f"{source}/{i}.jpg"
        container = member = None
        if i % 7 == 0:
            container = f"{source}/u{i % 3}/{i % 5}.zip" if i % 2 else f"s3://elsewhere/{i % 4}.tar"
            member = ("", "a/", "a//b/", "/abs/")[i % 4] + f"{i}.jpg"
            path = f"zip://{member}::{container}"
        score = float(rng.random()) if status == "ok" else math.nan
        rows.append(
            {
                schema.PATH: path,
                schema.SOURCE: source,
                schema.CONTAINER: container,
                schema.MEMBER: member,
                schema.STATUS: status,
                schema.ERROR: None if status in ("ok", "duplicate") else f"OSError: errno {i % 3} at {i}",
                schema.SCORE: score,
                schema.LABEL: ("ai" if score >= 0.5 else "real") if status == "ok" else None,
                schema.FORMAT: ("JPEG", "PNG", None, "MP4", "GIF")[i % 5],
                schema.N_FRAMES: 1 + i % 8 if i % 5 >= 3 and i % 2 else None,
            }
        )
    full = [{name: None for name in schema.SCORE_COLUMNS} | row for row in rows]
    writer.write(pa.Table.from_pylist(full, schema=schema.SCORES_SCHEMA))
    writer.close()
    for depth in (0, 1, 2, 3):
        got = summarise(str(tmp_path / schema.SCORES_DIR), depth)
        want = _reference_summary(rows, depth)
        assert {k: v for k, v in got.status_counts.items() if v} == dict(want["status"])
        assert {k: v for k, v in got.label_counts.items() if v} == dict(want["label"])
        assert got.format_counts == dict(want["format"])
        assert [p["prefix"] for p in got.prefixes] == sorted(want["prefixes"])
        for p in got.prefixes:
            ref = want["prefixes"][p["prefix"]]
            assert {k: p[k] for k in ("files", "ok", "failed", "duplicates", "ai", "real")} == {
                k: ref[k] for k in ("files", "ok", "failed", "duplicates", "ai", "real")
            }
            assert p["mean_score"] == pytest.approx(ref["score_sum"] / ref["ok"] if ref["ok"] else None)
        assert {(e["status"], e["error"]): [e["count"], e["example_path"]] for e in got.errors} == want["errors"]
        counted = ("files", "ok", "ai", "real", "frames")
        assert {m["media"]: {k: m[k] for k in counted} for m in got.media} == {
            kind: {k: ref[k] for k in counted} for kind, ref in want["media"].items()
        }
