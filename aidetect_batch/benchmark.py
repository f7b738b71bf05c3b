"""``aidetect-batch benchmark``: measured speed, reported with the machine it ran on.

Suites:

- ``training``: for each architecture, train on a generated labelled set
  for a few epochs with Ray Train and report images/s per worker (median
  over the epochs after the first, which pays for start-up), plus the time
  to first epoch.
- ``demo``: wall time of the whole offline demo (corpus, train, evaluate, scan).

Figures are printed as a table and written as JSON; ``BENCHMARKS.md``
records them with the command that produced them.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from typing import Any


def machine() -> dict[str, Any]:
    """CPU count, GPU name and library versions of this machine."""
    import torch

    from aidetect_batch.pipeline import versions

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpus": os.cpu_count(), "gpu": gpu, "processor": platform.processor(), "versions": versions()}


def training(
    archs: tuple[str, ...], per_class: int, epochs: int, workers: int, batch_size: int
) -> list[dict[str, Any]]:
    """Train each architecture on a generated set; return per-architecture throughput rows."""
    from aidetect_batch.config import TrainConfig
    from aidetect_batch.demo import write_labelled_corpus
    from aidetect_batch.training import run_train

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        write_labelled_corpus(data, per_class=per_class)
        for arch in archs:
            start = time.monotonic()
            result = run_train(
                TrainConfig(
                    dataset=data,
                    out=os.path.join(tmp, arch),
                    arch=arch,
                    init="none",
                    epochs=epochs,
                    patience=epochs,
                    workers=workers,
                    batch_size=batch_size,
                    augment=("flip", "color"),
                    preprocess="center-crop" if arch == "cifake_cnn" else "resize",
                )
            )
            speeds = [h["images_per_s_per_worker"] for h in result.history]
            steady = speeds[1:] or speeds
            rows.append(
                {
                    "arch": arch,
                    "input_size": result.run["resolved"]["input_size"],
                    "device": "cuda" if result.run["resolved"]["use_gpu"] else "cpu",
                    "workers": workers,
                    "batch_size": batch_size,
                    "train_images": result.run["dataset"]["balance"]["train"]["real"]
                    + result.run["dataset"]["balance"]["train"]["ai"],
                    "epochs": len(result.history),
                    "images_per_s_per_worker": statistics.median(steady),
                    "first_epoch_images_per_s": speeds[0],
                    "wall_seconds": time.monotonic() - start,
                }
            )
    return rows


def demo() -> dict[str, Any]:
    """Run the whole demo once and time it."""
    from aidetect_batch.demo import run_demo

    with tempfile.TemporaryDirectory() as tmp:
        start = time.monotonic()
        code = run_demo(tmp)
        return {"demo_wall_seconds": time.monotonic() - start, "exit_code": code}


def run_benchmark(
    suite: str, archs: tuple[str, ...], per_class: int, epochs: int, workers: int, batch_size: int, out: str | None
) -> dict[str, Any]:
    """Run a suite, print its table, and write the JSON to ``out`` when given."""
    result: dict[str, Any] = {
        "suite": suite,
        "machine": machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if suite in ("training", "all"):
        result["training"] = training(archs, per_class, epochs, workers, batch_size)
    if suite in ("demo", "all"):
        result["demo"] = demo()
    lines = [f"machine: {result['machine']['cpus']} CPUs, GPU {result['machine']['gpu'] or 'none'}"]
    for row in result.get("training", []):
        lines.append(
            f"train {row['arch']:<12} {row['input_size']:>3}px {row['device']} "
            f"{row['images_per_s_per_worker']:8.1f} img/s/worker "
            f"(first epoch {row['first_epoch_images_per_s']:.1f}), {row['train_images']} train images, "
            f"{row['epochs']} epochs, {row['wall_seconds']:.0f} s wall"
        )
    if "demo" in result:
        lines.append(f"demo wall time {result['demo']['demo_wall_seconds']:.0f} s")
    print("\n".join(lines), flush=True)
    if out:
        with open(out, "w") as handle:
            json.dump(result, handle, indent=2, default=str)
    return result
