"""Binary detection metrics on (label, score) vectors, vectorised with numpy.

Conventions: ``y`` is 1 for AI-generated and 0 for real; ``score`` is P(AI);
an image is flagged ``ai`` when ``score >= threshold``. Definitions follow
scikit-learn (tests compare against it): ROC-AUC with averaged ranks for ties,
average precision as the step-wise sum ``Σ (R_n - R_{n-1}) P_n`` over
distinct thresholds, precision 0 when nothing is flagged, Cohen's kappa of
the two label vectors. Quantities that are undefined for the data (AUC with
one class present) are NaN, never a guess.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

NAN = float("nan")


def _arrays(y: Any, score: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.int64)
    score = np.asarray(score, dtype=np.float64)
    if y.shape != score.shape:
        raise ValueError(f"labels {y.shape} and scores {score.shape} differ in shape")
    return y, score


def _div(a: float, b: float, empty: float = 0.0) -> float:
    return a / b if b else empty


def confusion(y: Any, score: Any, threshold: float) -> dict[str, int]:
    """Counts of true/false positives/negatives at ``threshold`` (positive = AI)."""
    y, score = _arrays(y, score)
    pred = score >= threshold
    return {
        "tp": int(np.sum(pred & (y == 1))),
        "fp": int(np.sum(pred & (y == 0))),
        "tn": int(np.sum(~pred & (y == 0))),
        "fn": int(np.sum(~pred & (y == 1))),
    }


def roc_auc(y: Any, score: Any) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie-averaged ranks); NaN with one class."""
    y, score = _arrays(y, score)
    n_pos, n_neg = int(np.sum(y == 1)), int(np.sum(y == 0))
    if n_pos == 0 or n_neg == 0:
        return NAN
    order = np.argsort(score, kind="mergesort")
    sorted_scores = score[order]
    ranks = np.empty(len(score), dtype=np.float64)
    _, starts, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, count in zip(starts, counts, strict=True):
        ranks[order[start : start + count]] = start + (count + 1) / 2.0
    return float((np.sum(ranks[y == 1]) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _curve_counts(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (fp, tp) at each distinct score, thresholds descending."""
    order = np.argsort(-score, kind="mergesort")
    score, y = score[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(score)), len(score) - 1]
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    return fps.astype(np.float64), tps.astype(np.float64), score[last]


def roc_curve(y: Any, score: Any) -> dict[str, np.ndarray]:
    """False and true positive rates at every distinct threshold, starting at (0, 0)."""
    y, score = _arrays(y, score)
    fps, tps, thresholds = _curve_counts(y, score)
    n_neg, n_pos = max(int(np.sum(y == 0)), 0), max(int(np.sum(y == 1)), 0)
    fpr = np.r_[0.0, fps / n_neg] if n_neg else np.full(len(fps) + 1, np.nan)
    tpr = np.r_[0.0, tps / n_pos] if n_pos else np.full(len(tps) + 1, np.nan)
    return {"fpr": fpr, "tpr": tpr, "threshold": np.r_[np.inf, thresholds]}


def pr_curve(y: Any, score: Any) -> dict[str, np.ndarray]:
    """Precision and recall at every distinct threshold (descending), ending at recall 0, precision 1."""
    y, score = _arrays(y, score)
    fps, tps, thresholds = _curve_counts(y, score)
    n_pos = int(np.sum(y == 1))
    precision = tps / np.maximum(tps + fps, 1)
    recall = tps / n_pos if n_pos else np.full(len(tps), np.nan)
    return {"precision": np.r_[1.0, precision], "recall": np.r_[0.0, recall], "threshold": np.r_[np.inf, thresholds]}


def average_precision(y: Any, score: Any) -> float:
    """Average precision: Σ (R_n - R_{n-1}) P_n over distinct thresholds; NaN without AI images."""
    y, score = _arrays(y, score)
    if int(np.sum(y == 1)) == 0:
        return NAN
    curve = pr_curve(y, score)
    return float(np.sum(np.diff(curve["recall"]) * curve["precision"][1:]))


def cohen_kappa(y: Any, pred: Any) -> float:
    """Cohen's kappa between true and predicted binary labels; NaN when undefined."""
    y = np.asarray(y, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    n = len(y)
    if n == 0:
        return NAN
    observed = float(np.mean(y == pred))
    expected = float(np.mean(y) * np.mean(pred) + np.mean(1 - y) * np.mean(1 - pred))
    return NAN if expected == 1.0 else (observed - expected) / (1.0 - expected)


def at_threshold(y: Any, score: Any, threshold: float) -> dict[str, float]:
    """Threshold metrics: accuracy, balanced accuracy, precision, recall, specificity, F1, kappa.

    ``real_accuracy`` (= specificity) and ``ai_accuracy`` (= recall) are the
    per-class accuracies the studies report; ``fpr`` is the share of real
    images flagged as AI.
    """
    y, score = _arrays(y, score)
    c = confusion(y, score, threshold)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    n_pos, n_neg = tp + fn, tn + fp
    recall = _div(tp, n_pos, NAN)
    specificity = _div(tn, n_neg, NAN)
    precision = _div(tp, tp + fp)
    f1 = _div(2 * tp, 2 * tp + fp + fn)
    rates = [r for r in (recall, specificity) if not math.isnan(r)]
    return {
        "threshold": float(threshold),
        "n": len(y),
        "n_real": n_neg,
        "n_ai": n_pos,
        **c,
        "accuracy": _div(tp + tn, len(y), NAN),
        "balanced_accuracy": float(np.mean(rates)) if rates else NAN,
        "precision": precision,
        "recall": recall,
        "specificity": specificity,
        "f1": f1,
        "kappa": cohen_kappa(y, score >= threshold),
        "real_accuracy": specificity,
        "ai_accuracy": recall,
        "fpr": _div(fp, n_neg, NAN),
    }


def best_f1_threshold(y: Any, score: Any) -> float:
    """The distinct score that maximises F1 when used as the threshold (ties: the highest)."""
    y, score = _arrays(y, score)
    if len(y) == 0 or int(np.sum(y == 1)) == 0:
        return 0.5
    fps, tps, thresholds = _curve_counts(y, score)
    fns = np.sum(y == 1) - tps
    f1 = 2 * tps / np.maximum(2 * tps + fps + fns, 1)
    return float(thresholds[int(np.argmax(f1))])


def threshold_for_fpr(y: Any, score: Any, target: float) -> float:
    """The lowest threshold whose false-positive rate on real images is at most ``target``.

    With ``k = floor(target × n_real)`` real images allowed above it, the
    threshold sits just above the (k+1)-th highest real score, so ties never
    push the rate over the target. NaN without real images.
    """
    y, score = _arrays(y, score)
    real = np.sort(score[y == 0])[::-1]
    if len(real) == 0:
        return NAN
    allowed = int(math.floor(target * len(real) + 1e-9))
    if allowed >= len(real):
        return float(real[-1])
    return float(np.nextafter(real[allowed], np.inf))


def calibration(y: Any, score: Any, bins: int = 15) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error over equal-width bins, and the reliability table.

    ECE = Σ (n_b / n) |mean score_b - share of AI_b|: how far P(AI) is from
    the observed frequency of AI images among images with that score.
    """
    y, score = _arrays(y, score)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, score, side="right") - 1, 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        mask = index == b
        count = int(mask.sum())
        mean_score = float(score[mask].mean()) if count else NAN
        frac_ai = float(y[mask].mean()) if count else NAN
        if count:
            ece += count / len(y) * abs(mean_score - frac_ai)
        table.append(
            {
                "bin_low": float(edges[b]),
                "bin_high": float(edges[b + 1]),
                "count": count,
                "mean_score": mean_score,
                "fraction_ai": frac_ai,
            }
        )
    return (float(ece) if len(y) else NAN), table


def summary(y: Any, score: Any) -> dict[str, float]:
    """Threshold-free metrics: ROC-AUC, average precision, ECE and class counts."""
    y, score = _arrays(y, score)
    ece, _ = calibration(y, score)
    return {
        "n": len(y),
        "n_real": int(np.sum(y == 0)),
        "n_ai": int(np.sum(y == 1)),
        "roc_auc": roc_auc(y, score),
        "average_precision": average_precision(y, score),
        "ece": ece,
    }
