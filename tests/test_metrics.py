"""Metrics match scikit-learn's on fixed score vectors, including ties and one-class edge cases."""

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from aidetect_batch.train import metrics

RNG = np.random.default_rng(7)
Y = RNG.integers(0, 2, 400)
# Rounded to two decimals so many scores tie, which is where AUC/AP implementations differ.
SCORES = np.round(np.clip(RNG.normal(0.35 + 0.3 * Y, 0.22), 0, 1), 2)
FIXED = [
    (np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])),
    (np.array([1, 0, 1, 0, 1, 1, 0]), np.array([0.9, 0.9, 0.5, 0.5, 0.2, 0.99, 0.01])),
    (Y, SCORES),
]


@pytest.mark.parametrize("y,score", FIXED)
def test_threshold_free_metrics_match_sklearn(y, score):
    assert metrics.roc_auc(y, score) == pytest.approx(skm.roc_auc_score(y, score), abs=1e-12)
    assert metrics.average_precision(y, score) == pytest.approx(skm.average_precision_score(y, score), abs=1e-12)
    fpr, tpr, _ = skm.roc_curve(y, score, drop_intermediate=False)
    curve = metrics.roc_curve(y, score)
    np.testing.assert_allclose(curve["fpr"], fpr)
    np.testing.assert_allclose(curve["tpr"], tpr)
    precision, recall, _ = skm.precision_recall_curve(y, score)
    mine = metrics.pr_curve(y, score)
    np.testing.assert_allclose(
        sorted(zip(mine["recall"], mine["precision"], strict=True)), sorted(zip(recall, precision, strict=True))
    )


@pytest.mark.parametrize("y,score", FIXED)
@pytest.mark.parametrize("threshold", [0.05, 0.35, 0.5, 0.9])
def test_threshold_metrics_match_sklearn(y, score, threshold):
    pred = (score >= threshold).astype(int)
    got = metrics.at_threshold(y, score, threshold)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    assert (got["tn"], got["fp"], got["fn"], got["tp"]) == (tn, fp, fn, tp)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert got["precision"] == pytest.approx(skm.precision_score(y, pred, zero_division=0))
    assert got["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert got["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0))
    assert got["f1"] == pytest.approx(skm.f1_score(y, pred, zero_division=0))
    expected_kappa = skm.cohen_kappa_score(y, pred)
    assert (math.isnan(got["kappa"]) and math.isnan(expected_kappa)) or got["kappa"] == pytest.approx(expected_kappa)
    assert got["real_accuracy"] == got["specificity"] and got["ai_accuracy"] == got["recall"]


def test_one_class_is_nan_not_a_guess():
    y, score = np.ones(5, int), np.linspace(0.1, 0.9, 5)
    assert math.isnan(metrics.roc_auc(y, score))
    assert math.isnan(metrics.at_threshold(y, score, 0.5)["specificity"])
    assert math.isnan(metrics.average_precision(np.zeros(5, int), score))
    assert math.isnan(metrics.threshold_for_fpr(y, score, 0.01))


def test_best_f1_threshold_is_the_argmax_over_all_thresholds():
    chosen = metrics.best_f1_threshold(Y, SCORES)
    best = max(skm.f1_score(Y, SCORES >= t) for t in np.unique(SCORES))
    assert skm.f1_score(Y, SCORES >= chosen) == pytest.approx(best)


@pytest.mark.parametrize("target", [0.0, 0.01, 0.05, 0.2])
def test_target_fpr_threshold_is_the_lowest_that_meets_the_target(target):
    t = metrics.threshold_for_fpr(Y, SCORES, target)
    real = SCORES[Y == 0]
    assert np.mean(real >= t) <= target
    # Any lower distinct score would exceed the target: the threshold is not needlessly strict.
    lower = real[real < t]
    if len(lower):
        assert np.mean(real >= lower.max()) > target


def test_calibration_of_a_perfectly_calibrated_model_and_of_an_overconfident_one():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 200_000)
    y = (rng.uniform(0, 1, p.size) < p).astype(int)
    ece, table = metrics.calibration(y, p)
    assert ece < 0.01 and sum(r["count"] for r in table) == p.size
    overconfident = np.where(p >= 0.5, 1.0, 0.0)
    assert metrics.calibration(y, overconfident)[0] > 0.2
