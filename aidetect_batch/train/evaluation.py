"""``aidetect-batch evaluate``: score a labelled set through the scan pipeline and measure it.

    labelled listing ─► run_scan (the deployed pipeline, labels passed through) ─► metrics, plots
                     └► run_scan under each --perturb ─► robustness table and plot

What is evaluated is exactly what is deployed: the same decode, preprocess
policy, Classifier and threshold as ``scan``. Only rows with status ``ok``
are measured; failed files are counted in ``metrics.json``. A video or an
animated image (``--video-frames``) is one row with the scan's per-file score,
so every metric counts it once, not once per frame.

Thresholds reported side by side:

- ``fixed_0.5``: the conventional default;
- ``checkpoint``: the one stored in the checkpoint, chosen on the training
  run's validation split (what ``scan`` uses);
- ``best_f1``: the one maximising F1 on *this* set (optimistic: chosen on the
  data it is measured on);
- ``target_fpr``: the lowest threshold flagging at most ``--target-fpr`` of
  this set's real images (flagging a real person's photo is the costly error).

The robustness sweep keeps the clean run's thresholds: a deployed detector
does not get to re-tune for each platform's processing.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aidetect_batch import schema
from aidetect_batch.detectors import checkpoints
from aidetect_batch.errors import ConfigError
from aidetect_batch.media import perturb
from aidetect_batch.report import aggregate
from aidetect_batch.scan.config import ScanConfig
from aidetect_batch.scan.runner import run_scan
from aidetect_batch.storage import claim_output, filesystem, join, write_json, write_parquet
from aidetect_batch.train import datasets, metrics, plots
from aidetect_batch.train.config import EvalConfig

_logger = logging.getLogger(__name__)

_OWN_ENTRIES = (
    schema.METRICS_FILE,
    schema.EVAL_SCAN_DIR,
    schema.PERTURBED_DIR,
    schema.PLOTS_DIR,
    "metrics.parquet",
    "reliability.parquet",
    "robustness.parquet",
    "roc_curve.parquet",
    "pr_curve.parquet",
)
METRIC_COLUMNS = (
    "accuracy",
    "balanced_accuracy",
    "precision",
    "recall",
    "specificity",
    "f1",
    "kappa",
    "real_accuracy",
    "ai_accuracy",
    "fpr",
)


@dataclasses.dataclass
class EvalResult:
    """What a finished evaluation produced."""

    out: str
    metrics: dict[str, Any]
    table: pa.Table


def choose_split(listing: pa.Table, split: str | None) -> tuple[pa.Table, str]:
    """Rows of the requested split; ``None`` picks ``test`` when the listing has splits, else all."""
    has_splits = pc.any(pc.is_valid(listing.column(schema.SPLIT))).as_py() or False
    if split is None:
        split = "test" if has_splits else "all"
    if split == "all":
        return listing, split
    chosen = listing.filter(pc.equal(listing.column(schema.SPLIT), split))
    if chosen.num_rows == 0:
        found = datasets.counts(listing.column(schema.SPLIT))
        raise ConfigError(f"--split {split}: the dataset has no such rows (splits found: {found or 'none'})")
    return chosen, split


def check_eval_output(cfg: EvalConfig) -> None:
    """Refuse a non-empty OUT unless ``--overwrite``; then clear only an evaluation's own entries."""
    claim_output(cfg.out, _OWN_ENTRIES, cfg.overwrite, storage_options=cfg.storage_options)


def _scan_config(cfg: EvalConfig, out: str, perturbation: str | None) -> ScanConfig:
    return ScanConfig(
        sources=(cfg.dataset,),
        out=out,
        checkpoint=cfg.checkpoint,
        preprocess=cfg.preprocess,
        storage_options=cfg.storage_options,
        perturbation=perturbation,
        overwrite=True,
        **cfg.scan_options.as_kwargs(),
    )


def _labelled_scores(scores_dir: str, storage_options: dict[str, Any]) -> pa.Table:
    import pyarrow.dataset as pads

    fs, root = filesystem(scores_dir, storage_options)
    columns = [schema.PATH, schema.STATUS, schema.SCORE, schema.LABEL, schema.TRUE_LABEL, schema.GROUP]
    columns += [schema.PROVENANCE, schema.N_FRAMES]
    return pads.dataset(root, filesystem=fs, format="parquet").to_table(columns=columns)


def _vectors(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ok = table.filter(pc.equal(table.column(schema.STATUS), schema.Status.OK.value))
    y = np.asarray(pc.equal(ok.column(schema.TRUE_LABEL), schema.LABEL_AI).to_numpy(zero_copy_only=False), dtype=int)
    score = ok.column(schema.SCORE).to_numpy().astype(np.float64)
    groups = np.array(ok.column(schema.GROUP).to_pylist(), dtype=object)
    return y, score, groups


def measure(
    y: np.ndarray, score: np.ndarray, groups: np.ndarray, *, thresholds: dict[str, float]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics overall and per group at every named threshold.

    Returns the nested dict for ``metrics.json`` and flat rows for ``metrics.parquet``
    (one per scope × threshold).
    """
    scopes: list[tuple[str, np.ndarray]] = [("overall", np.ones(len(y), dtype=bool))]
    for group in sorted({g for g in groups if g is not None}):
        scopes.append((f"group:{group}", groups == group))
    nested: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for scope, mask in scopes:
        entry = metrics.summary(y[mask], score[mask])
        entry["thresholds"] = {}
        for name, threshold in thresholds.items():
            if math.isnan(threshold):
                continue
            at = metrics.at_threshold(y[mask], score[mask], threshold)
            entry["thresholds"][name] = at
            rows.append(
                {
                    "scope": scope,
                    "threshold_name": name,
                    **{k: at[k] for k in ("threshold", "n", "n_real", "n_ai", "tp", "fp", "tn", "fn")},
                    **{k: at[k] for k in METRIC_COLUMNS},
                    "roc_auc": entry["roc_auc"],
                    "average_precision": entry["average_precision"],
                    "ece": entry["ece"],
                }
            )
        nested[scope] = entry
    return nested, rows


def video_counts(table: pa.Table) -> dict[str, int]:
    """How many of the scored files are videos or animations, and their frames: each is measured once, by the
    score the scan gives its row (the sigmoid of its frames' mean log-odds), never frame by frame."""
    ok = table.filter(pc.equal(table.column(schema.STATUS), schema.Status.OK.value))
    frames = ok.column(schema.N_FRAMES).drop_null()
    return {"files": len(frames), "frames": int(pc.sum(frames).as_py() or 0)}


def provenance_metrics(table: pa.Table) -> dict[str, Any]:
    """How many files carry each provenance kind per true class, and provenance as a detector beside the model.

    Provenance counts over every file that was read (a file that fails to decode still has its metadata);
    "flagged" means a kind in :data:`schema.DEFINITE_AI`. The model is measured on the decoded files at
    its own label, and ``either`` flags a file when the model or its provenance says AI.
    """
    kinds = pc.fill_null(table.column(schema.PROVENANCE), "none").to_pylist()
    truth = table.column(schema.TRUE_LABEL).to_pylist()
    per_kind = collections.Counter(zip(kinds, truth, strict=True))
    by_class = {
        label: {k: per_kind[(k, label)] for k in (*schema.PROVENANCE_KINDS, "none") if per_kind[(k, label)]}
        for label in (schema.LABEL_REAL, schema.LABEL_AI)
    }
    is_ai = np.array([t == schema.LABEL_AI for t in truth])
    flagged = np.isin(np.array(kinds, dtype=object), schema.DEFINITE_AI)
    ok = np.array([s == schema.Status.OK.value for s in table.column(schema.STATUS).to_pylist()])
    model = np.array([label == schema.LABEL_AI for label in table.column(schema.LABEL).to_pylist()])
    return {
        "by_class": by_class,
        "provenance": _detector(is_ai, flagged),
        "model": _detector(is_ai[ok], model[ok]),
        "either": _detector(is_ai[ok], model[ok] | flagged[ok]),
    }


def _detector(is_ai: np.ndarray, flagged: np.ndarray) -> dict[str, Any]:
    tp, fp = int(np.sum(flagged & is_ai)), int(np.sum(flagged & ~is_ai))
    return {
        "files": len(is_ai),
        "flagged": tp + fp,
        "tp": tp,
        "fp": fp,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / int(np.sum(is_ai)) if np.any(is_ai) else None,
    }


def run_evaluate(cfg: EvalConfig) -> EvalResult:
    """Evaluate a checkpoint on a labelled set: scan it, measure it, plot it, sweep perturbations.

    Raises:
        ConfigError: bad arguments, an empty split, or a non-empty OUT (before Ray starts).
        sources.SourceError: a missing or unlabelled dataset.
        CheckpointError: an unusable checkpoint.
    """

    check_eval_output(cfg)
    ckpt = checkpoints.parse_checkpoint(checkpoints.read_checkpoint_bytes(cfg.checkpoint, cfg.storage_options))
    listing, listed = datasets.list_labelled(
        cfg.dataset, cfg.extensions, cfg.all_files, storage_options=cfg.storage_options
    )
    listing, split = choose_split(listing, cfg.split)
    sweep = perturb.parse_sweep(cfg.perturb)
    _logger.info("evaluating %s on %d files of %s (split %s)", cfg.checkpoint, listing.num_rows, cfg.dataset, split)

    clean = run_scan(_scan_config(cfg, join(cfg.out, schema.EVAL_SCAN_DIR), None), listing=listing)
    scored = _labelled_scores(join(cfg.out, schema.EVAL_SCAN_DIR, schema.SCORES_DIR), cfg.storage_options)
    y, score, groups = _vectors(scored)
    if len(y) == 0:
        raise ConfigError("no image of the evaluation set could be decoded; see scan/scores for the statuses")
    thresholds = {
        "fixed_0.5": 0.5,
        "checkpoint": ckpt.threshold,
        "best_f1": metrics.best_f1_threshold(y, score),
        "target_fpr": metrics.threshold_for_fpr(y, score, cfg.target_fpr),
    }
    nested, rows = measure(y, score, groups, thresholds=thresholds)
    ece, reliability = metrics.calibration(y, score)

    so = cfg.storage_options
    at_checkpoint = nested["overall"]["thresholds"]["checkpoint"]
    _plot(cfg, y, score, thresholds=thresholds, at_checkpoint=at_checkpoint, threshold=ckpt.threshold)
    plots.reliability(join(cfg.out, schema.PLOTS_DIR, "reliability.png"), reliability, ece, storage_options=so)
    robustness = _robustness(cfg, listing, y, score, thresholds=thresholds, sweep=sweep)
    _write_tables(cfg, y, score, rows=rows, reliability=reliability, robustness=robustness)

    statuses = clean.summary.status_counts
    result = {
        "dataset": cfg.dataset,
        "split": split,
        "checkpoint": cfg.checkpoint,
        "model": {k: v for k, v in ckpt.metadata().items() if k != "info"},
        "trained_on_fingerprint": ckpt.info.get("data_fingerprint"),
        "files": listing.num_rows,
        "scored": len(y),
        "failed": listing.num_rows - len(y),
        "status_counts": statuses,
        "labels": {"real": int(np.sum(y == 0)), "ai": int(np.sum(y == 1))},
        "videos": video_counts(scored),
        "thresholds": thresholds,
        "target_fpr": cfg.target_fpr,
        "overall": nested["overall"],
        "groups": {k[len("group:") :]: v for k, v in nested.items() if k.startswith("group:")},
        "calibration": {"ece": ece, "bins": reliability},
        "robustness": robustness,
        "provenance": provenance_metrics(scored),
        "config": cfg.to_json(),
        "description": dataclasses.asdict(listed),
    }
    write_json(join(cfg.out, schema.METRICS_FILE), result, so)
    aggregate.rebuild(cfg.out, so)
    return EvalResult(cfg.out, result, pa.Table.from_pylist(rows))


def _plot(
    cfg: EvalConfig,
    y: np.ndarray,
    score: np.ndarray,
    *,
    thresholds: dict[str, float],
    at_checkpoint: dict[str, Any],
    threshold: float,
) -> None:
    """ROC with the thresholds marked, precision-recall, confusion at the checkpoint's threshold, histograms."""
    plots_dir, so = join(cfg.out, schema.PLOTS_DIR), cfg.storage_options
    plots.roc(join(plots_dir, "roc.png"), y, score, marks=thresholds, storage_options=so)
    plots.precision_recall(join(plots_dir, "pr.png"), y, score, storage_options=so)
    plots.confusion(join(plots_dir, "confusion.png"), at_checkpoint, threshold, storage_options=so)
    plots.score_histograms(join(plots_dir, "histograms.png"), y, score, threshold=threshold, storage_options=so)


def _robustness(
    cfg: EvalConfig,
    listing: pa.Table,
    y: np.ndarray,
    score: np.ndarray,
    *,
    thresholds: dict[str, float],
    sweep: list[Any],
) -> list[dict[str, Any]]:
    """The clean row, then one scan of the same files per perturbation, at the clean run's thresholds."""
    so = cfg.storage_options
    robustness = [_robust_row("none", y, score, thresholds=thresholds)]
    for item in sweep:
        out = join(cfg.out, schema.PERTURBED_DIR, item.name.replace(":", "_"))
        _logger.info("robustness: rescoring under %s", item.name)
        run_scan(_scan_config(cfg, out, item.name), listing=listing)
        py, pscore, _ = _vectors(_labelled_scores(join(out, schema.SCORES_DIR), so))
        robustness.append(_robust_row(item.name, py, pscore, thresholds=thresholds))
    if sweep:
        plots.robustness(join(cfg.out, schema.PLOTS_DIR, "robustness.png"), robustness, so)
    return robustness


def _write_tables(
    cfg: EvalConfig,
    y: np.ndarray,
    score: np.ndarray,
    *,
    rows: list[dict[str, Any]],
    reliability: Any,
    robustness: list[dict[str, Any]],
) -> None:
    """The curves and tables as Parquet next to metrics.json."""
    so = cfg.storage_options
    curve = metrics.roc_curve(y, score)
    write_parquet(join(cfg.out, "roc_curve.parquet"), pa.table({k: curve[k] for k in ("fpr", "tpr", "threshold")}), so)
    curve = metrics.pr_curve(y, score)
    write_parquet(
        join(cfg.out, "pr_curve.parquet"), pa.table({k: curve[k] for k in ("precision", "recall", "threshold")}), so
    )
    write_parquet(join(cfg.out, "metrics.parquet"), rows, so)
    write_parquet(join(cfg.out, "reliability.parquet"), reliability, so)
    write_parquet(join(cfg.out, "robustness.parquet"), robustness, so)


def _robust_row(name: str, y: np.ndarray, score: np.ndarray, *, thresholds: dict[str, float]) -> dict[str, Any]:
    at = metrics.at_threshold(y, score, thresholds["checkpoint"])
    at_fpr = (
        metrics.at_threshold(y, score, thresholds["target_fpr"]) if not math.isnan(thresholds["target_fpr"]) else {}
    )
    return {
        "perturbation": name,
        "n": len(y),
        "roc_auc": metrics.roc_auc(y, score),
        "average_precision": metrics.average_precision(y, score),
        "accuracy": at["accuracy"],
        "balanced_accuracy": at["balanced_accuracy"],
        "f1": at["f1"],
        "real_accuracy": at["real_accuracy"],
        "ai_accuracy": at["ai_accuracy"],
        "fpr_at_target_threshold": at_fpr.get("fpr", math.nan),
        "recall_at_target_threshold": at_fpr.get("recall", math.nan),
    }


def format_table(result: dict[str, Any]) -> str:
    """A plain-text summary of an evaluation for the terminal."""
    lines = [
        f"evaluated {result['scored']} images ({result['labels']['real']} real, {result['labels']['ai']} ai; "
        f"{result['failed']} failed to decode) of split {result['split']}",
        f"ROC-AUC {result['overall']['roc_auc']:.3f}  AP {result['overall']['average_precision']:.3f}  "
        f"ECE {result['calibration']['ece']:.3f}",
        f"{'threshold':<12}{'value':>8}{'acc':>8}{'bal.acc':>8}{'prec':>8}{'recall':>8}{'spec':>8}{'F1':>8}"
        f"{'kappa':>8}{'FPR':>8}",
    ]
    for name, at in result["overall"]["thresholds"].items():
        lines.append(
            f"{name:<12}{at['threshold']:>8.3f}{at['accuracy']:>8.3f}{at['balanced_accuracy']:>8.3f}"
            f"{at['precision']:>8.3f}{at['recall']:>8.3f}{at['specificity']:>8.3f}{at['f1']:>8.3f}"
            f"{at['kappa']:>8.3f}{at['fpr']:>8.3f}"
        )
    found, model_at = result["provenance"]["provenance"], result["provenance"]["model"]
    if found["flagged"]:
        lines.append(
            f"provenance: {found['flagged']} file(s) state AI origin, precision {found['precision']:.3f}, "
            f"recall {found['recall'] or 0:.3f} (model at its threshold: precision "
            f"{model_at['precision'] or 0:.3f}, recall {model_at['recall'] or 0:.3f})"
        )
    if len(result["robustness"]) > 1:
        lines.append(
            "robustness (checkpoint threshold): "
            + ", ".join(
                f"{r['perturbation']} AUC {r['roc_auc']:.3f} acc {r['accuracy']:.3f}" for r in result["robustness"]
            )
        )
    return "\n".join(lines)
