"""Ray Tune search behind ``prune --tune``: two trials complete and the better one is kept."""

import json
import os

import pytest
import torch
from helpers import own_ray, write_labelled_set

from aidetect_batch.detectors import checkpoints
from aidetect_batch.errors import ConfigError
from aidetect_batch.train.config import PruneConfig, TrainConfig
from aidetect_batch.train.pruning import run_prune
from aidetect_batch.train.tuning import TUNE_DIR, tune_and_train


@pytest.fixture(scope="module")
def ray_with_state_api():
    """Tune needs the dashboard's State API (see aidetect_batch/tuning.py), so this module starts Ray with it."""
    with own_ray(include_dashboard=True) as ray:
        yield ray


@pytest.mark.slow
@pytest.mark.ray
def test_search_refuses_to_start_without_the_state_api(tmp_path):
    with own_ray(num_cpus=1):
        cfg = TrainConfig(dataset=str(tmp_path), out=str(tmp_path / "o"), arch="cifake_cnn", init="none")
        with pytest.raises(ConfigError, match="State API"):
            tune_and_train(cfg, 2)


@pytest.mark.slow
def test_two_trial_search_keeps_the_better_trial(ray_with_state_api, tmp_path):
    labelled = str(tmp_path / "labelled")
    write_labelled_set(labelled, per_class=16, side=32)
    torch.manual_seed(0)
    start = str(tmp_path / "start.pt")
    checkpoints.save_checkpoint(start, checkpoints.build_model("cifake_cnn", 1), "cifake_cnn", preprocess="center-crop")
    cfg = PruneConfig(
        checkpoint=start,
        dataset=labelled,
        out=str(tmp_path / "p"),
        amounts=(0.0,),
        epochs=2,
        bench_batches=2,
        tune=True,
        tune_trials=2,
    )
    (row,) = run_prune(cfg).rows
    tuned = row["tuned"]
    trials = tuned["trials"]
    assert len(trials) == 2 and all(t["error"] is None for t in trials)
    assert all(t["val_loss"] == t["val_loss"] for t in trials), "both trials reported a validation loss"
    better = min(trials, key=lambda t: t["val_loss"])
    assert better["trial"] == tuned["best_trial"]
    assert better["config"] == tuned["best_config"]
    trial_model = os.path.join(cfg.out, "amount_00", TUNE_DIR, tuned["best_trial"], "model.pt")
    with open(trial_model, "rb") as a, open(row["checkpoint"], "rb") as b:
        assert a.read() == b.read(), "the best trial's checkpoint is the one kept"
    ckpt = checkpoints.parse_checkpoint(checkpoints.read_checkpoint_bytes(row["checkpoint"]))
    assert ckpt.info["train_config"]["lr"] == tuned["best_config"]["lr"]
    with open(os.path.join(cfg.out, "prune.json")) as handle:
        assert json.load(handle)["rows"][0]["tuned"]["best_trial"] == tuned["best_trial"]
