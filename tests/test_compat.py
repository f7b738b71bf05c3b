"""A scan written before the refactor (``aidetect-batch`` at 5146f42) still rebuilds its report, with the same
summary, through the function and through ``aidetect-batch report``. No test here starts Ray.

tests/data/scan_before_refactor/ holds that scan's ``_run.json``, ``scores/`` and the ``report/summary.json`` the
old code wrote (13 files: 12 PNGs and one undecodable). Its scores name images under /tmp/work/compat/imgs,
which are gone wherever the suite runs; the tests make them unreadable everywhere, so the thumbnails are
placeholders, as they are for any report rebuilt after its images were moved."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from aidetect_batch import cli
from aidetect_batch.report import aggregate, page

OLD_SCAN = Path(__file__).parent / "data" / "scan_before_refactor"
OLD_IMAGES = "/tmp/work/compat/imgs/"
# Statuses added after the old scan was written: its rebuilt summary counts them, as zero.
NEW_STATUSES = ("timeout", "crashed")


@pytest.fixture
def old_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the old scan whose images can no longer be read."""
    out = tmp_path / "out_old"
    shutil.copytree(OLD_SCAN, out)
    read_path = page.item.read_path

    def gone(path: str, *args: Any, **kwargs: Any) -> Any:
        if path.startswith(OLD_IMAGES):
            raise FileNotFoundError(path)
        return read_path(path, *args, **kwargs)

    monkeypatch.setattr(page.item, "read_path", gone)
    return out


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    """Where ``new`` differs from ``old``; floats may differ in their last bits (summation order)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _differences(old.get(k), new.get(k), f"{where}.{k}")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (o, n) in enumerate(zip(old, new, strict=True)) for d in _differences(o, n, f"{where}[{i}]")]
    if isinstance(old, float) and isinstance(new, float) and math.isclose(old, new, rel_tol=1e-9):
        return []
    return [] if old == new and type(old) is type(new) else [f"{where}: {old!r} -> {new!r}"]


def test_an_old_scan_rebuilds_the_summary_it_wrote(old_scan):
    """Every key, timing included: ``wall_seconds``, ``images_per_s`` and ``first_result_seconds`` come from the
    recorded ``_run.json`` and ``stage_images_per_s`` from the recorded per-row ``t_*_ms`` columns, so a rebuild
    reproduces them; nothing is excluded."""
    old = json.loads((OLD_SCAN / "report" / "summary.json").read_text())
    scan_out, summary = aggregate.rebuild(str(old_scan))
    rebuilt = json.loads((old_scan / "report" / "summary.json").read_text())
    assert scan_out == str(old_scan)
    assert {s: rebuilt["status_counts"].pop(s) for s in NEW_STATUSES} == dict.fromkeys(NEW_STATUSES, 0)
    media = {m["media"]: m["files"] for m in rebuilt.pop("media")}  # added since: checked apart
    assert media == {"still": 13, "video": 0, "animation": 0}, "the old scan's rows are all stills"
    assert _differences(old, rebuilt) == []
    assert (summary.total, summary.ok, summary.failed) == (13, 12, 1)
    html = (old_scan / "report" / "index.html").read_text()
    assert "thumb missing" in html and "data:image/jpeg" not in html, "gone images are placeholders"


def test_the_report_command_rebuilds_an_old_scan(old_scan, capsys):
    shutil.rmtree(old_scan / "report")
    assert cli.main(["report", str(old_scan)]) == 0
    assert json.loads((old_scan / "report" / "summary.json").read_text())["total"] == 13
    assert (old_scan / "report" / "index.html").is_file()
    assert str(old_scan / "report" / "index.html") in capsys.readouterr().out


def test_the_differences_helper_finds_what_changed():
    assert _differences({"a": [1, 0.5]}, {"a": [1, 0.5 + 1e-15]}) == []
    changed = _differences({"a": [1, 0.5], "b": 1}, {"a": [2, 0.6]})
    assert changed == [".a[0]: 1 -> 2", ".a[1]: 0.5 -> 0.6", ".b: 1 -> None"]
