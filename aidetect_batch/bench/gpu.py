"""``aidetect-batch benchmark --suite gpu``: what a scan does with one GPU, in at most 8 minutes.

In one run, on the same photographs:

1. the bare model's ceiling, eager and ``torch.compile``d: bf16 autocast, channels_last, the scan's
   batch size (:func:`aidetect_batch.bench.measure.model_ceiling`);
2. a short pilot scan that measures the fastest end-to-end rate, which sizes the corpus so that the
   steady state (20% to 90% of the rows, from the delivery timestamps) lasts at least 60 s;
3. end-to-end scans of that corpus with CPU decoding, with ``--gpu-decode``, and with
   ``--gpu-decode --compile``: the whole-run rate, the steady-state rate and its spread over the
   passes through the photographs, the time to the first result, and each as a share of the ceiling.

A scan that would overrun the time budget is skipped and said so. The suite refuses to run without
CUDA; the tests run its code on the CPU with ``require_cuda=False`` and a tiny model.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from aidetect_batch import runtime
from aidetect_batch.bench import measure
from aidetect_batch.detectors import registry
from aidetect_batch.detectors.checkpoints import build_model, save_checkpoint
from aidetect_batch.errors import ConfigError
from aidetect_batch.scan.config import ScanConfig
from aidetect_batch.scan.runner import ScanResult, plan_classifier, run_scan

BUDGET_S = 480.0
STEADY_S = 60.0
PILOT_ROWS = 4_000
NO_CUDA = (
    "benchmark --suite gpu needs a CUDA GPU, and torch sees none on this machine "
    "(torch.cuda.is_available() is False); run it on a GPU node, or use --suite scan on CPU"
)


@dataclasses.dataclass(frozen=True)
class GpuSuiteOptions:
    """Sizes of the GPU suite. Defaults fit one H100/H200 in ``budget_s``; the tests shrink them."""

    arch: str = registry.DEFAULT_ARCH
    batch_size: int = 256
    precision: str = "bf16"
    photos: int = 48
    photo_sizes: tuple[tuple[int, int], ...] = measure.PHOTO_SIZES
    pilot_rows: int = PILOT_ROWS
    steady_s: float = STEADY_S
    budget_s: float = BUDGET_S
    max_rows: int = 2_000_000
    ceiling_batches: int = 20
    compile: bool = True
    require_cuda: bool = True


def run_gpu_suite(options: GpuSuiteOptions | None = None) -> dict[str, Any]:
    """Run the suite (module docstring) and return its figures.

    Raises:
        ConfigError: no CUDA device, unless ``options.require_cuda`` is off.
    """
    options = options or GpuSuiteOptions()
    if options.require_cuda and not torch.cuda.is_available():
        raise ConfigError(NO_CUDA)
    started = time.monotonic()
    result: dict[str, Any] = {"options": dataclasses.asdict(options)}
    with tempfile.TemporaryDirectory() as tmp:
        base = _base_config(tmp, options)
        resources = runtime.start_ray()
        plan = plan_classifier(base, resources)
        threads = plan.cpu_threads or 1
        ceiling = {"eager": _ceiling(options, threads), "actors": plan.actors[1]}
        if options.compile:
            ceiling["compiled"] = _ceiling(options, threads, compile=True)
        result["ceiling"] = ceiling
        pilot = _scan(dataclasses.replace(base, gpu_decode=True, limit=options.pilot_rows), tmp, "pilot")
        rows = _corpus_rows(measure.steady_rate(pilot.deliveries), options)
        result["corpus"] = {"rows": rows, "pilot_rows": options.pilot_rows, "photos": options.photos}
        result["scans"] = {}
        for name, change in _SCANS.items():
            if change.get("compile") and not options.compile:
                continue
            bare = ceiling["compiled" if change.get("compile") else "eager"]["images_per_s"] * plan.actors[1]
            result["scans"][name] = _measured_scan(
                dataclasses.replace(base, limit=rows, **change),
                tmp,
                name,
                ceiling=bare,
                options=options,
                started=started,
            )
    result["wall_seconds"] = time.monotonic() - started
    return result


_SCANS: dict[str, dict[str, bool]] = {
    "cpu_decode": {},
    "gpu_decode": {"gpu_decode": True},
    "gpu_decode_compile": {"gpu_decode": True, "compile": True},
}


def _ceiling(options: GpuSuiteOptions, threads: int, *, compile: bool = False) -> dict[str, Any]:
    return measure.model_ceiling(
        options.arch,
        options.batch_size,
        threads,
        precision=options.precision,
        batches=options.ceiling_batches,
        compile=compile,
    )


def _base_config(tmp: str, options: GpuSuiteOptions) -> ScanConfig:
    torch.manual_seed(0)
    checkpoint = os.path.join(tmp, f"{options.arch}.pt")
    save_checkpoint(checkpoint, build_model(options.arch, 1), options.arch, info={"untrained": True})
    paths = measure.write_jpegs(os.path.join(tmp, "photos"), options.photos, options.photo_sizes)
    manifest = os.path.join(tmp, "photos.parquet")
    repeats = math.ceil(options.max_rows / len(paths))
    pq.write_table(pa.table({"path": paths * repeats}), manifest)
    return ScanConfig(
        sources=(),
        manifest=manifest,
        out=os.path.join(tmp, "unused"),
        checkpoint=checkpoint,
        batch_size=options.batch_size,
        precision=options.precision,
    )


def _corpus_rows(rate: float, options: GpuSuiteOptions) -> int:
    """Rows whose steady window lasts ``steady_s`` at ``rate``, in whole passes through the photographs."""
    needed = rate * options.steady_s / (measure.STEADY_WINDOW[1] - measure.STEADY_WINDOW[0])
    passes = max(3, math.ceil(needed / options.photos))
    return min(passes * options.photos, options.max_rows)


def _scan(cfg: ScanConfig, tmp: str, name: str) -> ScanResult:
    return run_scan(dataclasses.replace(cfg, out=os.path.join(tmp, name)))


def _measured_scan(
    cfg: ScanConfig, tmp: str, name: str, *, ceiling: float, options: GpuSuiteOptions, started: float
) -> dict[str, Any]:
    """One end-to-end scan with its rates, or why it was skipped."""
    left = options.budget_s - (time.monotonic() - started)
    if left < 30:
        return {"skipped": f"{left:.0f} s of the {options.budget_s:.0f} s budget left"}
    run = _scan(cfg, tmp, name)
    steady = measure.steady_rate(run.deliveries)
    passes = measure.pass_rates(run.deliveries, options.photos)
    window = (measure.STEADY_WINDOW[1] - measure.STEADY_WINDOW[0]) * run.summary.total
    return {
        "images": run.summary.total,
        "images_per_s": run.summary.facts.images_per_s,
        "steady_images_per_s": steady,
        "steady_seconds": window / steady,
        "steady_pass_images_per_s": {
            "median": sorted(passes)[len(passes) // 2] if passes else None,
            "min": min(passes, default=None),
            "max": max(passes, default=None),
            "passes": len(passes),
        },
        "first_result_seconds": run.summary.facts.first_result_seconds,
        "wall_seconds": run.summary.facts.wall_seconds,
        "ceiling_images_per_s": ceiling,
        "steady_share_of_ceiling": steady / ceiling,
    }


def gpu_lines(result: dict[str, Any]) -> list[str]:
    """The suite as a printed table."""
    eager, compiled = result["ceiling"]["eager"], result["ceiling"].get("compiled")
    compiled_text = f", compiled {compiled['images_per_s']:.0f} img/s" if compiled else ""
    lines = [
        f"ceiling  {eager['arch']} {eager['device']} {eager['precision']} channels_last batch {eager['batch_size']}: "
        f"eager {eager['images_per_s']:.0f} img/s{compiled_text}",
        f"corpus   {result['corpus']['rows']} rows ({result['corpus']['photos']} photos, 1080-2048 px JPEG)",
        f"{'scan':<20} {'whole run':>10} {'steady':>10} {'spread (passes)':>22} {'first':>7} {'of ceiling':>10}",
    ]
    for name, row in result["scans"].items():
        if "skipped" in row:
            lines.append(f"{name:<20} skipped: {row['skipped']}")
            continue
        spread = row["steady_pass_images_per_s"]
        spread_text = "-" if spread["min"] is None else f"{spread['min']:.0f}-{spread['max']:.0f} ({spread['passes']})"
        lines.append(
            f"{name:<20} {row['images_per_s']:>10.0f} {row['steady_images_per_s']:>10.0f} {spread_text:>22} "
            f"{row['first_result_seconds']:>6.1f}s {row['steady_share_of_ceiling']:>10.0%}"
        )
    lines.append(f"suite wall time {result['wall_seconds']:.0f} s")
    return lines
