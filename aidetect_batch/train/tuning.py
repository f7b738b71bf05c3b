"""Hyperparameter search with Ray Tune: learning rate, weight decay, batch size and epochs.

Each trial is a whole training run (:func:`aidetect_batch.train.trainer.run_train`)
on one dataset decoded and split once before the search. Ray Train's
per-epoch reports reach Tune through ``TuneReportCallback``, so the ASHA
scheduler stops trials whose validation loss lags at an epoch milestone.
The best trial (lowest final validation loss) keeps its checkpoint. Ray Tune
is part of Ray, so the search adds no dependency.

When ASHA stops a trial, its TorchTrainer's placement group is not owned by
the Tune driver; Ray Train's PlacementGroupCleaner frees it once it sees the
trial's controller die, and it asks the State API (the dashboard, part of
``ray[default]``). Without it the stopped trial's CPUs stay reserved and the
next trial waits forever, so the search refuses to start without it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

from aidetect_batch import schema
from aidetect_batch.errors import ConfigError
from aidetect_batch.storage import filesystem, is_remote, join, read_json
from aidetect_batch.train.config import TrainConfig
from aidetect_batch.train.trainer import TrainResult, prepare, run_train

_logger = logging.getLogger(__name__)

TUNE_DIR = "tune"
# The trial function only drives a TorchTrainer; its workers hold the real CPUs.
TRIAL_CPU = 0.01


def search_space(budget_epochs: int, seed: int) -> dict[str, Any]:
    """The searched hyperparameters; epochs range from 1 to the budget."""
    from ray import tune

    return {
        "lr": tune.loguniform(1e-5, 1e-2),
        "weight_decay": tune.loguniform(1e-6, 1e-3),
        "batch_size": tune.choice([16, 32, 64]),
        "epochs": tune.randint(1, budget_epochs + 1),
        "seed": seed,
    }


def _trial(config: dict[str, Any], base: TrainConfig, prepared: Any) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial = tune.get_context().get_trial_id()
    cfg = dataclasses.replace(
        base,
        out=join(base.out, TUNE_DIR, trial),
        lr=config["lr"],
        weight_decay=config["weight_decay"],
        batch_size=config["batch_size"],
        epochs=config["epochs"],
        patience=config["epochs"],
        overwrite=True,
    )
    run_train(cfg, callbacks=[TuneReportCallback()], prepared=prepared)


def require_state_api() -> None:
    """Fail fast when Ray's State API is missing, instead of stalling the search (see the module docstring)."""
    from ray.util.state import list_actors

    try:
        list_actors(limit=1, timeout=10)
    except Exception as exc:
        raise ConfigError(
            "--tune needs Ray's State API so that stopped trials give their CPUs back: install ray[default] "
            f"and start Ray with the dashboard (include_dashboard=True, or `ray start`). ({exc.__class__.__name__})"
        ) from exc


@dataclasses.dataclass(frozen=True)
class TuneSummary:
    """Every trial of a search (its config, epochs, losses, error) and the one kept."""

    trials: list[dict[str, Any]]
    best_trial: str
    best_config: dict[str, Any]


def tune_and_train(
    base: TrainConfig, trials: int, space: dict[str, Any] | None = None
) -> tuple[TrainResult, TuneSummary]:
    """Search with ASHA, then return the best trial's :class:`TrainResult` and a summary of all trials.

    ``base.resolved_epochs`` is the epoch budget per trial. Trials run one at a time
    when the cluster has no room for two (each needs the training workers'
    CPUs and a little for itself). ``space`` replaces :func:`search_space`
    (a ``tune.grid_search`` makes a search reproducible).

    Raises:
        ConfigError: Ray runs without its State API.
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    require_state_api()
    prepared = prepare(base)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    per_trial = base.workers * base.cpus_per_worker
    concurrent = max(1, int((cpus - TRIAL_CPU * trials) // max(per_trial, 1)))
    trainable = tune.with_resources(tune.with_parameters(_trial, base=base, prepared=prepared), {"CPU": TRIAL_CPU})
    state_uri = join(base.out, TUNE_DIR, "_state")
    fs, root = filesystem(state_uri, base.storage_options)
    storage_fs = None
    if is_remote(state_uri):
        import pyarrow.fs as pafs

        storage_fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    tuner = tune.Tuner(
        trainable,
        param_space=space if space is not None else search_space(base.resolved_epochs, base.seed),
        tune_config=tune.TuneConfig(
            metric="val_loss",
            mode="min",
            num_samples=trials,
            max_concurrent_trials=concurrent,
            scheduler=ASHAScheduler(time_attr="epoch", max_t=base.resolved_epochs, grace_period=1, reduction_factor=2),
            search_alg=BasicVariantGenerator(random_state=base.seed),
        ),
        run_config=tune.RunConfig(name="search", storage_path=root, storage_filesystem=storage_fs),
    )
    grid = tuner.fit()
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        config = {k: v for k, v in (result.config or {}).items() if k != "seed"}
        rows.append(
            {
                "trial": metrics.get("trial_id"),
                "config": config,
                "epochs_run": metrics.get("epoch"),
                "stopped_by_asha": metrics.get("epoch", 0) < config.get("epochs", 0),
                "val_loss": metrics.get("val_loss", math.nan),
                "val_auc": metrics.get("val_auc", math.nan),
                "error": str(result.error)[:300] if result.error else None,
            }
        )
    best = grid.get_best_result(metric="val_loss", mode="min", scope="last")
    trial_id = _trial_id_of(best)
    out = join(base.out, TUNE_DIR, trial_id)
    run = read_json(join(out, schema.RUN_FILE), base.storage_options)
    if run.get("status") != "complete":
        raise RuntimeError(f"the best trial {trial_id} did not finish writing its checkpoint")
    result = _kept_trial(out, run, base=base, prepared=prepared)
    summary = TuneSummary(rows, trial_id, {k: v for k, v in best.config.items() if k != "seed"})
    _logger.info("tune: best trial %s %s, val loss %.4f", trial_id, summary.best_config, best.metrics["val_loss"])
    return result, summary


def _kept_trial(out: str, run: dict[str, Any], *, base: TrainConfig, prepared: Any) -> TrainResult:
    """The best trial's training result, read back from its output folder."""
    return TrainResult(
        out,
        run["checkpoint"],
        _history(out, base.storage_options),
        run["val_metrics"],
        run["threshold"],
        run,
        dataset=prepared.described,
        input_size=run["resolved"]["input_size"],
        use_gpu=run["resolved"]["use_gpu"],
    )


def _trial_id_of(result: Any) -> str:
    return str(result.metrics.get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1])


def _history(out: str, storage_options: dict[str, Any]) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    fs, path = filesystem(join(out, schema.HISTORY_FILE), storage_options)
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle).to_pylist()
