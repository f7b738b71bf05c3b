"""Training on Ray Train: learning a real pixel statistic, scan-ready checkpoints, DDP, and resume."""

import glob
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import write_labelled_set

from aidetect_batch import schema
from aidetect_batch.detectors import checkpoints
from aidetect_batch.scan.config import ScanConfig
from aidetect_batch.scan.runner import run_scan
from aidetect_batch.train.config import EvalConfig, TrainConfig
from aidetect_batch.train.evaluation import run_evaluate
from aidetect_batch.train.trainer import run_train, select_split_batch
from aidetect_batch.train.worker import FILE_COLUMN, STATE_FILE, build_augment, file_id

FAST = dict(
    arch="cifake_cnn",
    init="none",
    preprocess="center-crop",
    augment=("flip",),
    lr=1e-3,
    batch_size=16,
)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("labelled"))
    return root, write_labelled_set(root, per_class=70)


@pytest.fixture(scope="module")
def trained(ray_cluster, labelled, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("train"))
    cfg = TrainConfig(dataset=labelled[0], out=out, epochs=6, patience=6, **FAST)
    return cfg, run_train(cfg)


def test_learns_a_pixel_statistic_to_high_validation_accuracy(trained):
    cfg, result = trained
    assert result.val_metrics["at_threshold"]["accuracy"] >= 0.9
    assert result.val_metrics["roc_auc"] >= 0.95
    assert len(result.history) == 6
    assert {"train_loss", "val_loss", "val_accuracy", "val_auc", "images_per_s_per_worker"} <= set(result.history[0])
    for name in (schema.MODEL_FILE, schema.SPLITS_FILE, schema.DATASET_FILE, schema.HISTORY_FILE, "history.png"):
        assert os.path.exists(os.path.join(cfg.out, name)), name


def test_checkpoint_carries_what_the_scan_needs(trained):
    cfg, result = trained
    ckpt = checkpoints.parse_checkpoint(checkpoints.read_checkpoint_bytes(result.checkpoint))
    described = json.load(open(os.path.join(cfg.out, schema.DATASET_FILE)))
    assert (ckpt.kind, ckpt.arch, ckpt.input_size, ckpt.preprocess) == (
        "aidetect-batch",
        "cifake_cnn",
        32,
        "center-crop",
    )
    assert ckpt.threshold == result.threshold and 0.0 < ckpt.threshold < 1.0
    assert ckpt.info["data_fingerprint"] == described["fingerprint"]
    assert ckpt.info["val_metrics"]["roc_auc"] == result.val_metrics["roc_auc"]
    assert torch.__version__.startswith(ckpt.info["versions"]["torch"])
    run = json.load(open(os.path.join(cfg.out, schema.RUN_FILE)))
    assert run["status"] == "complete" and run["checkpoint"] == result.checkpoint


def test_splits_are_recorded_balanced_and_leak_free(trained, labelled):
    cfg, _ = trained
    splits = pq.read_table(os.path.join(cfg.out, schema.SPLITS_FILE)).to_pylist()
    assert {r[schema.PATH] for r in splits} == set(labelled[1])
    assert all(r[schema.TRUE_LABEL] == labelled[1][r[schema.PATH]] for r in splits)
    by_sha = {}
    for r in splits:
        by_sha.setdefault(r[schema.SHA256], set()).add(r[schema.SPLIT])
    assert all(len(s) == 1 for s in by_sha.values())
    balance = json.load(open(os.path.join(cfg.out, schema.DATASET_FILE)))["balance"]
    assert balance["train"]["real"] == balance["train"]["ai"] and balance["test"]["real"] == balance["test"]["ai"]


def test_the_model_sees_only_pixels_and_the_label(ray_cluster):
    batch = pa.table(
        {
            schema.PATH: ["/data/real/cat_real_001.png", "/data/ai/cat_fake_002.png"],
            schema.TRUE_LABEL: ["real", "ai"],
            schema.IMAGE: pa.array([[1, 2], [3, 4]]),
        }
    )
    out = select_split_batch(
        batch, "train", {"/data/real/cat_real_001.png": "train", "/data/ai/cat_fake_002.png": "val"}, side=2
    )
    # The file column is an opaque id, by which validation groups a video's frames; the model's input is the image.
    assert out.column_names == [schema.IMAGE, "target", FILE_COLUMN] and out.column("target").to_pylist() == [0.0]
    assert out.column(FILE_COLUMN).to_pylist() == [file_id("/data/real/cat_real_001.png")]
    nothing = select_split_batch(batch, "test", {}, side=2)
    assert nothing.num_rows == 0 and nothing.column_names == [schema.IMAGE, "target", FILE_COLUMN]


@pytest.mark.slow  # a whole Ray scan: moved out of the default suite to keep it under 10 minutes (--runslow)
def test_scan_of_the_checkpoint_gives_the_scores_evaluation_measured(trained, tmp_path):
    cfg, result = trained
    evaluated = run_evaluate(
        EvalConfig(
            dataset=os.path.join(cfg.out, schema.SPLITS_FILE),
            checkpoint=result.checkpoint,
            out=str(tmp_path / "eval"),
        )
    )
    assert evaluated.metrics["split"] == "test" and evaluated.metrics["overall"]["roc_auc"] >= 0.9
    eval_scores = pq.read_table(str(tmp_path / "eval" / schema.EVAL_SCAN_DIR / schema.SCORES_DIR)).to_pylist()
    paths = tuple(r[schema.PATH] for r in eval_scores)
    scanned = run_scan(ScanConfig(sources=paths, out=str(tmp_path / "scan"), checkpoint=result.checkpoint))
    scan_scores = {r[schema.PATH]: r for r in pq.read_table(scanned.files).to_pylist()}
    for row in eval_scores:
        assert row[schema.SCORE] == pytest.approx(scan_scores[row[schema.PATH]][schema.SCORE], abs=1e-6)
        assert row[schema.LABEL] == scan_scores[row[schema.PATH]][schema.LABEL]
        assert row[schema.TRUE_LABEL] in ("real", "ai")
    assert (
        scanned.run["resolved"]["preprocess"] == "center-crop"
        and scanned.run["resolved"]["threshold"] == result.threshold
    )


@pytest.mark.slow  # 39-62 s: keeps the default suite under its 10-minute budget on a slow day (--runslow runs it)
def test_two_cpu_workers_train_one_epoch_with_a_frozen_backbone(ray_cluster, labelled, trained, tmp_path):
    _, first = trained
    cfg = TrainConfig(
        dataset=labelled[0],
        out=str(tmp_path / "ddp"),
        epochs=1,
        workers=2,
        freeze_backbone=True,
        class_weights=True,
        **{**FAST, "init": first.checkpoint},
    )
    result = run_train(cfg)
    assert len(result.history) == 1 and result.run["workers"] == 2
    before = checkpoints.parse_checkpoint(checkpoints.read_checkpoint_bytes(first.checkpoint)).state_dict
    after = checkpoints.parse_checkpoint(checkpoints.read_checkpoint_bytes(result.checkpoint)).state_dict
    assert torch.equal(before["features.0.weight"], after["features.0.weight"])
    assert not torch.equal(before["head.4.weight"], after["head.4.weight"])
    assert result.run["resolved"]["init"]["loaded"] == len(before)
    assert result.run["resolved"]["pos_weight"] == 1.0, "balanced classes weigh 1:1"


def latest_state(out):
    found = glob.glob(os.path.join(out, schema.TRAIN_STATE_DIR, "run", "checkpoint_*"))
    latest = sorted(p for p in found if os.path.isdir(p))[-1]
    return torch.load(os.path.join(latest, STATE_FILE), weights_only=True)


@pytest.mark.slow  # 55-85 s: the default suite stays under its 10-minute budget (run it with --runslow)
def test_a_crashed_run_resumes_from_its_last_epoch(ray_cluster, labelled, tmp_path):
    from ray.train import TrainingFailedError

    out = str(tmp_path / "crash")
    crashing = TrainConfig(dataset=labelled[0], out=out, epochs=2, crash_after_epoch=1, **FAST)
    with pytest.raises(TrainingFailedError, match="fault injection"):
        run_train(crashing)
    epoch_one = latest_state(out)["history"]
    assert [h["epoch"] for h in epoch_one] == [1]
    resumed = run_train(TrainConfig(dataset=labelled[0], out=out, epochs=2, resume=True, **FAST))
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.history[0] == epoch_one[0]
    assert resumed.run["resumed_from"] is not None


@pytest.mark.slow
def test_restarted_worker_group_continues_and_early_stopping_ends_the_run(ray_cluster, labelled, tmp_path):
    """A worker failure restarts from the last epoch within one run; a flat validation loss stops training."""
    cfg = TrainConfig(
        dataset=labelled[0],
        out=str(tmp_path / "retry"),
        epochs=5,
        patience=1,
        crash_after_epoch=1,
        max_failures=1,
        optimizer="adamw",
        schedule="step",
        **{**FAST, "lr": 1e-12},
    )
    result = run_train(cfg)
    assert [h["epoch"] for h in result.history] == [1, 2]
    ckpt = checkpoints.parse_checkpoint(checkpoints.read_checkpoint_bytes(result.checkpoint))
    assert ckpt.info["stopped_early"] and ckpt.info["best_epoch"] == 1


@pytest.mark.parametrize("names", [(), ("flip", "rotate", "color", "translate", "jpeg", "blur")])
def test_augmentations_keep_shape_and_dtype(names):
    augment = build_augment(names, 32)
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (3, 32, 32), dtype=np.uint8))
    if not names:
        assert augment is None
        return
    out = augment(image)
    assert out.shape == image.shape and out.dtype == torch.uint8
