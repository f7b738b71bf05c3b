"""evaluate: scores through the scan pipeline, metrics overall and per group, thresholds, plots, robustness."""

import json
import os
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import A1111_PARAMETERS, jpeg_with_exif, jpeg_with_xmp, png_with_text, write_labelled_set
from sklearn import metrics as skm

from aidetect_batch import schema
from aidetect_batch.errors import ConfigError
from aidetect_batch.train.config import EvalConfig
from aidetect_batch.train.evaluation import format_table, run_evaluate

# Files whose bytes state their origin: two true AI, and one "real" photo that carries generator
# parameters (an img2img edit, say), so provenance's precision is 2/3 and its recall 2 of the 14 AI files.
PROVENANCE_FILES = {
    "faces/ai/a1111.png": lambda: png_with_text(parameters=A1111_PARAMETERS),
    "scenes/ai/iptc.jpg": lambda: jpeg_with_xmp("trainedAlgorithmicMedia"),
    "faces/real/img2img.png": lambda: png_with_text(parameters=A1111_PARAMETERS),
    "scenes/real/edited.jpg": lambda: jpeg_with_exif(software="Adobe Photoshop 25.4 (Windows)"),
}


@pytest.fixture(scope="module")
def evaluated(ray_cluster, tiny_checkpoint, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("labelled"))
    labels = write_labelled_set(root, per_class=12, side=96, layout="groups")
    with open(os.path.join(root, "faces", "real", "broken.png"), "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n truncated")
    for relative, data in PROVENANCE_FILES.items():
        path = os.path.join(root, relative)
        with open(path, "wb") as handle:
            handle.write(data())
        labels[path] = relative.split("/")[1]
    out = str(tmp_path_factory.mktemp("eval"))
    cfg = EvalConfig(
        dataset=root, checkpoint=tiny_checkpoint, out=out, perturb=("jpeg:50", "downscale:0.5"), target_fpr=0.1
    )
    return cfg, labels, run_evaluate(cfg)


def scored(cfg):
    rows = pq.read_table(os.path.join(cfg.out, schema.EVAL_SCAN_DIR, schema.SCORES_DIR)).to_pylist()
    ok = [r for r in rows if r[schema.STATUS] == "ok"]
    y = np.array([r[schema.TRUE_LABEL] == "ai" for r in ok], dtype=int)
    s = np.array([r[schema.SCORE] for r in ok], dtype=np.float64)
    g = np.array([r[schema.GROUP] for r in ok], dtype=object)
    return rows, y, s, g


def test_every_file_is_scored_through_the_scan_with_labels_passed_through(evaluated):
    cfg, labels, result = evaluated
    rows, y, _, _ = scored(cfg)
    assert len(rows) == len(labels) + 1
    assert result.metrics["failed"] == 1 and result.metrics["scored"] == len(labels)
    assert all(r[schema.TRUE_LABEL] == labels[r[schema.PATH]] for r in rows if r[schema.PATH] in labels)
    assert result.metrics["split"] == "all"


def test_overall_metrics_equal_sklearn_on_the_scanned_scores(evaluated):
    cfg, _, result = evaluated
    _, y, s, _ = scored(cfg)
    overall = result.metrics["overall"]
    assert overall["roc_auc"] == pytest.approx(skm.roc_auc_score(y, s))
    assert overall["average_precision"] == pytest.approx(skm.average_precision_score(y, s))
    for name, at in overall["thresholds"].items():
        pred = s >= at["threshold"]
        assert at["f1"] == pytest.approx(skm.f1_score(y, pred, zero_division=0)), name
        assert at["kappa"] == pytest.approx(skm.cohen_kappa_score(y, pred)), name
        assert at["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred)), name
    assert overall["thresholds"]["checkpoint"]["threshold"] == 0.5
    assert overall["thresholds"]["target_fpr"]["fpr"] <= 0.1


def test_provenance_is_counted_per_class_and_measured_as_a_detector(evaluated, capsys):
    cfg, labels, result = evaluated
    found = result.metrics["provenance"]
    assert found["by_class"]["ai"] == {"generator_params": 1, "iptc_ai": 1, "none": 12}
    assert found["by_class"]["real"] == {"generator_params": 1, "software_hint": 1, "none": 13}
    assert found["provenance"] | {"precision": None} == {
        "files": len(labels) + 1, "flagged": 3, "tp": 2, "fp": 1, "precision": None, "recall": 2 / 14,
    }  # fmt: skip
    assert found["provenance"]["precision"] == pytest.approx(2 / 3)
    rows, y, s, _ = scored(cfg)
    ok = [r for r in rows if r[schema.STATUS] == "ok"]
    model = np.array([r[schema.LABEL] == "ai" for r in ok])
    assert found["model"]["precision"] == pytest.approx(skm.precision_score(y, model, zero_division=0))
    assert found["model"]["recall"] == pytest.approx(skm.recall_score(y, model))
    either = model | np.array([r[schema.PROVENANCE] in schema.DEFINITE_AI for r in ok])
    assert found["either"]["recall"] == pytest.approx(skm.recall_score(y, either))
    main_table = format_table(result.metrics)
    assert "provenance: 3 file(s) state AI origin, precision 0.667" in main_table


def test_per_group_metrics(evaluated):
    cfg, _, result = evaluated
    _, y, s, g = scored(cfg)
    assert set(result.metrics["groups"]) == {"faces", "scenes"}
    for group, entry in result.metrics["groups"].items():
        mask = g == group
        assert entry["n"] == int(mask.sum())
        assert entry["roc_auc"] == pytest.approx(skm.roc_auc_score(y[mask], s[mask]))
    table = pq.read_table(os.path.join(cfg.out, "metrics.parquet")).to_pylist()
    assert {(r["scope"], r["threshold_name"]) for r in table} >= {("group:faces", "checkpoint"), ("overall", "best_f1")}


def test_plots_calibration_and_curves_are_written(evaluated):
    cfg, _, result = evaluated
    for name in ("roc", "pr", "confusion", "histograms", "reliability", "robustness"):
        with open(os.path.join(cfg.out, schema.PLOTS_DIR, f"{name}.png"), "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n", name
    with open(os.path.join(cfg.out, schema.EVAL_SCAN_DIR, schema.REPORT_DIR, "index.html"), encoding="utf-8") as handle:
        page = handle.read()
    for name in ("roc", "pr", "confusion", "histograms", "reliability", "robustness"):
        assert re.search(rf'<img class="plot" src="data:image/png;base64,[^"]+" alt="{name}.png">', page), name
    bins = pq.read_table(os.path.join(cfg.out, "reliability.parquet")).to_pylist()
    assert sum(b["count"] for b in bins) == result.metrics["scored"]
    assert 0.0 <= result.metrics["calibration"]["ece"] <= 1.0
    assert pq.read_table(os.path.join(cfg.out, "roc_curve.parquet")).num_rows >= 2
    on_disk = json.load(open(os.path.join(cfg.out, schema.METRICS_FILE)))
    assert on_disk["overall"]["roc_auc"] == pytest.approx(result.metrics["overall"]["roc_auc"])


def test_robustness_sweep_rescored_each_perturbation(evaluated):
    cfg, labels, result = evaluated
    names = [r["perturbation"] for r in result.metrics["robustness"]]
    assert names == ["none", "jpeg:50", "downscale:0.5"]
    for name in ("jpeg_50", "downscale_0.5"):
        run = json.load(open(os.path.join(cfg.out, schema.PERTURBED_DIR, name, schema.RUN_FILE)))
        assert run["resolved"]["perturbation"] == name.replace("_", ":")
        assert run["outputs"]["rows"] == len(labels) + 1
    clean = pq.read_table(os.path.join(cfg.out, schema.EVAL_SCAN_DIR, schema.SCORES_DIR)).to_pandas()
    jpeg = pq.read_table(os.path.join(cfg.out, schema.PERTURBED_DIR, "jpeg_50", schema.SCORES_DIR)).to_pandas()
    merged = clean.merge(jpeg, on=schema.PATH).dropna(subset=["score_x"])
    assert (merged["score_x"] != merged["score_y"]).any()


def test_unknown_split_is_refused_before_scanning(tiny_checkpoint, tmp_path):
    root = str(tmp_path / "data")
    write_labelled_set(root, per_class=2, side=32)
    with pytest.raises(ConfigError, match="no such rows"):
        run_evaluate(EvalConfig(dataset=root, checkpoint=tiny_checkpoint, out=str(tmp_path / "o"), split="test"))
