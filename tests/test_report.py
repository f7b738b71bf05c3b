import json
import math
import os

import pyarrow as pa

from aidetect_batch import schema
from aidetect_batch.config import ScanConfig, redact
from aidetect_batch.report import closing_line, prefix_of, write_report
from aidetect_batch.sinks import ScoreWriter


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
    summary = write_report(out, extra={"threshold": 0.5, "images_per_s": 12.5})
    assert summary["total"] == 6 and summary["ok"] == 3 and summary["failed"] == 3
    assert summary["status_counts"]["truncated"] == 2 and summary["status_counts"]["unreadable"] == 0
    assert summary["label_counts"] == {"ai": 2, "real": 1, "none": 3}
    assert summary["histogram"]["ai"][18] == 1 and summary["histogram"]["ai"][19] == 1
    assert summary["histogram"]["real"][4] == 1 and sum(summary["histogram"]["all"]) == 3
    by_prefix = {p["prefix"]: p for p in summary["prefixes"]}
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
    top = summary["errors"][0]
    assert top["status"] == "truncated" and top["count"] == 2 and "#" in top["error"]
    assert summary["stage_images_per_s"]["decode"] == 100.0 and summary["stage_images_per_s"]["infer"] == 200.0
    with open(os.path.join(out, schema.REPORT_DIR, schema.SUMMARY_FILE)) as handle:
        assert json.load(handle)["total"] == 6
    line = closing_line(summary)
    assert line == "scanned 6 files: ok 3, failed 3 (empty 1, truncated 2), flagged 2 as ai, 12.5 img/s"


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
