"""PNG plots for training and evaluation, drawn on matplotlib ``Figure`` objects.

No pyplot: figures hold no global state, so plotting is safe in a Ray
driver or worker and needs no display. Each function writes one PNG to a
local path or a remote URI.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from aidetect_batch.storage import filesystem
from aidetect_batch.train import metrics

REAL_COLOUR = "#4c72b0"
AI_COLOUR = "#dd8452"


def _save(fig: Any, uri: str, storage_options: dict[str, Any] | None) -> None:
    fig.tight_layout()
    fs, path = filesystem(uri, storage_options)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as handle:
        fig.savefig(handle, format="png")


def _figure(width: float = 6.0, height: float = 4.5) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def history(
    uri: str, rows: list[dict[str, Any]], best_epoch: int, *, storage_options: dict[str, Any] | None = None
) -> None:
    """Loss, accuracy and validation AUC per epoch, with the kept epoch marked."""
    fig = _figure(10, 3.8)
    loss_ax, acc_ax = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in rows]
    loss_ax.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    loss_ax.plot(epochs, [r["val_loss"] for r in rows], "o-", label="validation")
    loss_ax.set_title("loss")
    acc_ax.plot(epochs, [r["train_accuracy"] for r in rows], "o-", label="train accuracy")
    acc_ax.plot(epochs, [r["val_accuracy"] for r in rows], "o-", label="val accuracy")
    acc_ax.plot(epochs, [r["val_auc"] for r in rows], "s--", label="val ROC-AUC")
    acc_ax.set_ylim(0, 1.02)
    acc_ax.set_title("accuracy and AUC")
    for ax in (loss_ax, acc_ax):
        ax.axvline(best_epoch, color="grey", linestyle=":", label=f"kept: epoch {best_epoch}")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    _save(fig, uri, storage_options)


def roc(
    uri: str,
    y: np.ndarray,
    score: np.ndarray,
    *,
    marks: dict[str, float],
    storage_options: dict[str, Any] | None = None,
) -> None:
    """ROC curve with the AUC and each named threshold's operating point."""
    curve = metrics.roc_curve(y, score)
    fig = _figure()
    ax = fig.subplots()
    ax.plot(curve["fpr"], curve["tpr"], color=AI_COLOUR, label=f"ROC (AUC {metrics.roc_auc(y, score):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    for name, threshold in marks.items():
        if math.isnan(threshold):
            continue
        point = metrics.at_threshold(y, score, threshold)
        ax.plot(point["fpr"], point["recall"], "o", label=f"{name} (t={threshold:.3g})")
    ax.set_xlabel("false-positive rate (real images flagged)")
    ax.set_ylabel("true-positive rate (AI images caught)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("ROC")
    _save(fig, uri, storage_options)


def precision_recall(
    uri: str, y: np.ndarray, score: np.ndarray, *, storage_options: dict[str, Any] | None = None
) -> None:
    """Precision-recall curve with average precision and the AI share as the chance line."""
    curve = metrics.pr_curve(y, score)
    fig = _figure()
    ax = fig.subplots()
    ax.step(
        curve["recall"],
        curve["precision"],
        where="post",
        color=AI_COLOUR,
        label=f"AP {metrics.average_precision(y, score):.3f}",
    )
    ax.axhline(float(np.mean(y)) if len(y) else 0.0, color="grey", linestyle=":", label="chance (AI share)")
    ax.set_xlabel("recall (AI images caught)")
    ax.set_ylabel("precision (flagged images that are AI)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("precision-recall")
    _save(fig, uri, storage_options)


def confusion(
    uri: str, counts: dict[str, int], threshold: float, *, storage_options: dict[str, Any] | None = None
) -> None:
    """2×2 confusion matrix (rows: truth, columns: prediction) with counts and row shares."""
    matrix = np.array([[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]], dtype=float)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig = _figure(4.5, 4)
    ax = fig.subplots()
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            colour = "white" if shares[i, j] > 0.6 else "black"
            ax.text(j, i, f"{int(matrix[i, j])}\n{shares[i, j]:.1%}", ha="center", va="center", color=colour)
    ax.set_xticks([0, 1], ["real", "ai"])
    ax.set_yticks([0, 1], ["real", "ai"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion at threshold {threshold:.3g}")
    _save(fig, uri, storage_options)


def score_histograms(
    uri: str, y: np.ndarray, score: np.ndarray, *, threshold: float, storage_options: dict[str, Any] | None = None
) -> None:
    """Score distribution of real and of AI images, with the threshold."""
    fig = _figure(7, 3.8)
    ax = fig.subplots()
    bins = np.linspace(0, 1, 41)
    ax.hist(score[y == 0], bins=bins, alpha=0.6, color=REAL_COLOUR, label=f"real ({int(np.sum(y == 0))})")
    ax.hist(score[y == 1], bins=bins, alpha=0.6, color=AI_COLOUR, label=f"ai ({int(np.sum(y == 1))})")
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:.3g}")
    ax.set_xlabel("score = P(AI-generated)")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    ax.set_title("scores by true class")
    _save(fig, uri, storage_options)


def reliability(
    uri: str, table: list[dict[str, float]], ece: float, *, storage_options: dict[str, Any] | None = None
) -> None:
    """Reliability diagram: observed AI share against mean score per bin."""
    fig = _figure(4.8, 4.5)
    ax = fig.subplots()
    used = [r for r in table if r["count"]]
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    ax.plot(
        [r["mean_score"] for r in used],
        [r["fraction_ai"] for r in used],
        "o-",
        color=AI_COLOUR,
        label=f"model (ECE {ece:.3f})",
    )
    ax.set_xlabel("mean score in bin")
    ax.set_ylabel("share of AI images in bin")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("calibration")
    _save(fig, uri, storage_options)


def robustness(uri: str, rows: list[dict[str, Any]], storage_options: dict[str, Any] | None = None) -> None:
    """ROC-AUC and accuracy at the checkpoint's threshold under each perturbation."""
    fig = _figure(max(6.0, 0.8 * len(rows) + 2), 4)
    ax = fig.subplots()
    names = [r["perturbation"] for r in rows]
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["roc_auc"] for r in rows], width=0.4, label="ROC-AUC", color=AI_COLOUR)
    ax.bar(
        x + 0.2, [r["accuracy"] for r in rows], width=0.4, label="accuracy at checkpoint threshold", color=REAL_COLOUR
    )
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("robustness to platform processing")
    _save(fig, uri, storage_options)


def pruning(uri: str, rows: list[dict[str, Any]], storage_options: dict[str, Any] | None = None) -> None:
    """Validation AP and accuracy after fine-tuning against parameter count and measured throughput."""
    fig = _figure(11, 4)
    size_ax, speed_ax = fig.subplots(1, 2)
    for ax, key, label in (
        (size_ax, "params", "parameters (millions)"),
        (speed_ax, "images_per_s", "measured images/s (bare model)"),
    ):
        scale = 1e6 if key == "params" else 1.0
        xs = [r[key] / scale for r in rows]
        ax.plot(xs, [r["val_ap_after"] for r in rows], "o-", color=AI_COLOUR, label="val AP after fine-tuning")
        ax.plot(xs, [r["val_accuracy_after"] for r in rows], "s--", color=REAL_COLOUR, label="val accuracy")
        ax.plot(xs, [r["val_ap_before"] for r in rows], "x:", color="grey", label="val AP before fine-tuning")
        for x, r in zip(xs, rows, strict=True):
            ax.annotate(f"{r['amount']:.0%}", (x, r["val_ap_after"]), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel(label)
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8, loc="lower right")
    size_ax.set_title(f"{rows[-1]['method']} pruning: quality against size")
    speed_ax.set_title("quality against speed")
    _save(fig, uri, storage_options)
