"""``aidetect-batch benchmark``: measured speed, reported with the machine it ran on.

Suites:

- ``training``: for each architecture, train on a generated labelled set
  for a few epochs with Ray Train and report images/s per worker (median
  over the epochs after the first, which pays for start-up), plus the time
  to first epoch.
- ``demo``: wall time of the whole offline demo (corpus, train, evaluate, scan).
- ``scan``: in one run, (a) the bare model's forward images/s on the
  Classifier's device, precision, batch size and thread count: the ceiling,
  measured before and after the end-to-end scan (the higher one counts: a
  shared CPU drifted by ~15% between runs here);
  (b) decode + preprocess images/s on one core for realistic JPEGs
  (1080-2048 px), against PIL full decode + torchvision
  ``Resize(256)``/``CenterCrop(224)``; (c) end-to-end scan images/s on the
  same files, for the whole run and at scale: a second scan of the first
  half of the same manifest gives the marginal rate (half the images over
  the difference in wall time) and the fixed start-up cost (Ray worker and
  model start, the first batch); the half scan runs second, so it finds
  warm worker processes and page cache, which makes the marginal rate
  lower, not higher; (d) the ratios (c)/(a) and (b)/baseline; (e) peak RSS of the
  driver and of the largest Ray worker while scanning 2,000 and then 20,000
  small images with the 32 px CIFAKE CNN (so the run takes minutes, not
  hours, on a CPU). Linux only for (e): it reads ``/proc``.
- ``listing``: for one ``s3://`` prefix (``--listing-prefix``), the time to
  list it on the driver against the time until a streamed scan's listing
  stage hands on its first input block, and how many keys that block holds,
  at the scan's block size and at 4 MiB (the earlier setting).

Figures are printed as a table and written as JSON; ``BENCHMARKS.md``
records them with the command that produced them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import tempfile
import threading
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


PHOTO_SIZES = ((1080, 1350), (1920, 1080), (2048, 1536), (1440, 1080))


def write_jpegs(root: str, count: int, sizes: tuple[tuple[int, int], ...], seed: int = 0) -> list[str]:
    """Photo-like JPEGs (smooth fields plus sensor-like noise, quality 90) of the given sizes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    paths = []
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        phase = rng.uniform(0, 6.28, 3)
        base = np.stack([128 + 90 * np.sin(x / (40 + 9 * c) + y / (70 + 5 * c) + phase[c]) for c in range(3)], -1)
        pixels = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        path = os.path.join(root, f"photo_{i:05d}.jpg")
        Image.fromarray(pixels).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def model_ceiling(arch: str, batch_size: int, threads: int, precision: str, batches: int = 6) -> dict[str, Any]:
    """Forward images/s of the bare model on this process's device, as the Classifier runs it:
    channels_last and autocast on CUDA, chunks of ``cpu_chunk`` images on CPU."""
    import torch

    from aidetect_batch.classifier import cpu_chunk
    from aidetect_batch.model import build_model

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(threads)
    net = build_model(arch, 1).eval().to(device)
    x = torch.randn(batch_size, 3, 224, 224, device=device)
    if cuda:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision) if cuda else None
    chunk = batch_size if cuda else cpu_chunk(224)

    def step() -> None:
        with torch.inference_mode():
            for part in x.split(chunk):
                if dtype is not None:
                    with torch.autocast("cuda", dtype=dtype):
                        net(part)
                else:
                    net(part)
        if cuda:
            torch.cuda.synchronize()

    step()
    start = time.perf_counter()
    for _ in range(batches):
        step()
    seconds = time.perf_counter() - start
    return {
        "arch": arch,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "threads": None if cuda else threads,
        "precision": precision if cuda else "fp32",
        "batch_size": batch_size,
        "forward_chunk": chunk,
        "images_per_s": batches * batch_size / seconds,
    }


def decode_speed(paths: list[str], policy: str = "resize") -> dict[str, Any]:
    """Decode + preprocess images/s on one core: this project's path against PIL + torchvision."""
    import torch
    from PIL import Image
    from torchvision import transforms

    from aidetect_batch.config import DEFAULT_MAX_PIXELS
    from aidetect_batch.preprocess import decode_and_preprocess

    torch.set_num_threads(1)
    baseline = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    data = []
    for path in paths:
        with open(path, "rb") as handle:
            data.append(handle.read())

    def ours() -> None:
        for blob in data:
            decode_and_preprocess(blob, policy, DEFAULT_MAX_PIXELS)

    def plain() -> None:
        import io

        for blob in data:
            img = Image.open(io.BytesIO(blob)).convert("RGB")
            baseline(img).tobytes()

    timings = {}
    for name, fn in (("ours", ours), ("baseline", plain)):
        start = time.perf_counter()
        fn()
        timings[name] = len(data) / (time.perf_counter() - start)
    return {
        "policy": policy,
        "files": len(data),
        "images_per_s_per_core": timings["ours"],
        "baseline_images_per_s_per_core": timings["baseline"],
        "speedup": timings["ours"] / timings["baseline"],
    }


class RssSampler:
    """Peak resident memory of this (driver) process and of Ray worker processes while it runs.

    Sampled from ``/proc`` twice a second, so each scan gets its own peak
    (``ru_maxrss`` is the process's peak since it started, which earlier
    work in the same benchmark would dominate).
    """

    def __init__(self) -> None:
        self.peak_worker_bytes = 0
        self.peak_driver_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = str(os.getpid())
        while not self._stop.is_set():
            self.peak_driver_bytes = max(self.peak_driver_bytes, _rss(me))
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as handle:
                        if not handle.read(200).startswith(b"ray::"):
                            continue
                except OSError:
                    continue
                self.peak_worker_bytes = max(self.peak_worker_bytes, _rss(pid))
            self._stop.wait(0.5)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _rss(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmRSS:"))
    except (OSError, StopIteration, ValueError):
        return 0


def scan(
    arch: str, batch_size: int, precision: str, photos: int, repeats: int, small: tuple[int, int]
) -> dict[str, Any]:
    """The scan suite (module docstring): ceiling, decode, end to end, ratios and memory at two corpus sizes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import torch

    from aidetect_batch.config import ScanConfig
    from aidetect_batch.model import build_model, save_checkpoint
    from aidetect_batch.pipeline import plan_classifier, run_scan

    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        ckpt = os.path.join(tmp, f"{arch}.pt")
        save_checkpoint(ckpt, build_model(arch, 1), arch, info={"untrained": True, "purpose": "benchmark"})
        paths = write_jpegs(os.path.join(tmp, "photos"), photos, PHOTO_SIZES)
        result["decode"] = decode_speed(paths)
        manifest = os.path.join(tmp, "photos.parquet")
        pq.write_table(pa.table({"path": paths * repeats}), manifest)
        if not ray.is_initialized():
            ray.init(logging_level="WARNING")
        base = ScanConfig(
            sources=(),
            manifest=manifest,
            out=os.path.join(tmp, "e2e"),
            checkpoint=ckpt,
            batch_size=batch_size,
            precision=precision,
        )
        plan = plan_classifier(base, ray.cluster_resources())
        result["ceiling"] = model_ceiling(arch, batch_size, plan["cpu_threads"] or 1, precision)
        result["ceiling"]["actors"] = plan["actors"][1]
        run = run_scan(base)
        after = model_ceiling(arch, batch_size, plan["cpu_threads"] or 1, precision)["images_per_s"]
        result["ceiling"]["measured_images_per_s"] = [result["ceiling"]["images_per_s"], after]
        result["ceiling"]["images_per_s"] = max(result["ceiling"]["images_per_s"], after)
        total = len(paths) * repeats
        half = run_scan(dataclasses.replace(base, limit=total // 2, out=os.path.join(tmp, "e2e_half")))
        e2e = run.summary["images_per_s"]
        ceiling = result["ceiling"]["images_per_s"] * plan["actors"][1]
        added = total - total // 2
        marginal = added / max(run.summary["wall_seconds"] - half.summary["wall_seconds"], 1e-9)
        result["end_to_end"] = {
            "images": total,
            "images_per_s": e2e,
            "fraction_of_ceiling": e2e / ceiling,
            "wall_seconds": run.summary["wall_seconds"],
            "first_result_seconds": run.summary["first_result_seconds"],
            "infer_stage_images_per_s": run.summary["stage_images_per_s"]["infer"],
            "half_images": total // 2,
            "half_wall_seconds": half.summary["wall_seconds"],
            "marginal_images_per_s": marginal,
            "marginal_fraction_of_ceiling": marginal / ceiling,
            "startup_seconds": run.summary["wall_seconds"] - total / marginal,
            "decode_speedup_over_baseline": result["decode"]["speedup"],
        }
        small_ckpt = os.path.join(tmp, "cifake.pt")
        save_checkpoint(small_ckpt, build_model("cifake_cnn", 1), "cifake_cnn", preprocess="center-crop")
        small_root = os.path.join(tmp, "small")
        small_paths = write_jpegs(small_root, max(small), ((96, 96), (128, 96)), seed=1)
        small_manifest = os.path.join(tmp, "small.parquet")
        pq.write_table(pa.table({"path": small_paths}), small_manifest)
        memory = []
        for count in sorted(small):
            with RssSampler() as sampler:
                start = time.monotonic()
                run_scan(
                    dataclasses.replace(
                        base,
                        manifest=small_manifest,
                        limit=count,
                        checkpoint=small_ckpt,
                        batch_size=256,
                        decode_batch_size=64,
                        out=os.path.join(tmp, f"mem{count}"),
                    )
                )
            memory.append(
                {
                    "images": count,
                    "driver_peak_rss_mb": sampler.peak_driver_bytes / 2**20,
                    "worker_peak_rss_mb": sampler.peak_worker_bytes / 2**20,
                    "wall_seconds": time.monotonic() - start,
                }
            )
        result["memory"] = memory
        first, last = memory[0], memory[-1]
        result["memory_growth"] = {
            "driver": last["driver_peak_rss_mb"] / first["driver_peak_rss_mb"] - 1,
            "worker": last["worker_peak_rss_mb"] / max(first["worker_peak_rss_mb"], 1e-9) - 1,
        }
    return result


def listing(prefix: str, storage_options: dict[str, Any] | None = None, rounds: int = 2) -> dict[str, Any]:
    """The listing suite (module docstring): driver listing against the streamed listing's first block.

    Both block sizes are measured ``rounds`` times, alternating, because the first streamed
    listing also pays for starting its Ray worker.
    """
    import ray

    from aidetect_batch import inputs, pipeline, sources
    from aidetect_batch.config import ScanConfig

    options = storage_options or {}
    cfg = ScanConfig(sources=(prefix,), out="unused", checkpoint="unused", storage_options=options)
    start = time.monotonic()
    keys = sources.list_sources(cfg.sources, cfg.extensions, options).num_rows
    result: dict[str, Any] = {"prefix": prefix, "keys": keys, "driver_listing_seconds": time.monotonic() - start}
    units = sources.listing_units(cfg.sources, options)
    if not ray.is_initialized():
        ray.init(logging_level="WARNING")
    streamed = []
    for block_bytes in (pipeline.STREAM_BLOCK_BYTES, 4 << 20) * rounds:
        state = ray.remote(num_cpus=0)(inputs.ListingState).remote()
        ds = pipeline.streamed_inputs(cfg, units, pipeline.STREAM_SHARD_ROWS, {}, state, block_bytes)
        start = time.monotonic()
        row: dict[str, Any] = {"block_bytes": block_bytes, "blocks": 0, "keys": 0}
        for batch in pipeline.delivered(ds):
            if not row["blocks"]:
                row["first_block_seconds"] = time.monotonic() - start
                row["first_block_keys"] = batch.num_rows
            row["blocks"] += 1
            row["keys"] += batch.num_rows
        row["all_blocks_seconds"] = time.monotonic() - start
        streamed.append(row)
    result["streamed"] = streamed
    return result


def demo() -> dict[str, Any]:
    """Run the whole demo once and time it."""
    from aidetect_batch.demo import run_demo

    with tempfile.TemporaryDirectory() as tmp:
        start = time.monotonic()
        code = run_demo(tmp)
        return {"demo_wall_seconds": time.monotonic() - start, "exit_code": code}


def run_benchmark(
    suite: str,
    archs: tuple[str, ...],
    per_class: int,
    epochs: int,
    workers: int,
    batch_size: int,
    out: str | None,
    scan_options: dict[str, Any] | None = None,
    listing_options: dict[str, Any] | None = None,
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
    if suite in ("scan", "all"):
        result["scan"] = scan(**(scan_options or {}))
    if suite == "listing":
        result["listing"] = listing(**(listing_options or {}))
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
    if "scan" in result:
        lines += scan_lines(result["scan"])
    if "listing" in result:
        lines += listing_lines(result["listing"])
    print("\n".join(lines), flush=True)
    if out:
        with open(out, "w") as handle:
            json.dump(result, handle, indent=2, default=str)
    return result


def scan_lines(scan: dict[str, Any]) -> list[str]:
    """The scan suite as printed lines."""
    c, d, e = scan["ceiling"], scan["decode"], scan["end_to_end"]
    threads = "" if c["threads"] is None else f", {c['threads']} thread(s)"
    lines = [
        f"(a) model ceiling  {c['arch']} {c['device']} {c['precision']} batch {c['batch_size']}{threads}: "
        f"{c['images_per_s']:.1f} img/s per actor x {c['actors']} actor(s)",
        f"(b) decode+resize  {d['images_per_s_per_core']:.1f} img/s/core vs PIL+torchvision "
        f"{d['baseline_images_per_s_per_core']:.1f} ({d['speedup']:.2f}x), {d['files']} JPEGs 1080-2048 px",
        f"(c) end to end     {e['images_per_s']:.1f} img/s over {e['images']} images; first result after "
        f"{e['first_result_seconds']:.1f} s; forward passes in the actors {e['infer_stage_images_per_s']:.1f} img/s",
        f"(c) at scale       {e['marginal_images_per_s']:.1f} img/s marginal "
        f"({e['images'] - e['half_images']} more images took {e['wall_seconds'] - e['half_wall_seconds']:.1f} s more); "
        f"fixed start-up {e['startup_seconds']:.1f} s",
        f"(d) ratios         end to end / ceiling {e['fraction_of_ceiling']:.0%} (whole run), "
        f"{e['marginal_fraction_of_ceiling']:.0%} (at scale); decode speed-up {d['speedup']:.2f}x",
    ]
    for row in scan["memory"]:
        lines.append(
            f"(e) {row['images']:>6} images: driver peak RSS {row['driver_peak_rss_mb']:.0f} MB, "
            f"largest worker {row['worker_peak_rss_mb']:.0f} MB, {row['wall_seconds']:.0f} s"
        )
    growth = scan["memory_growth"]
    lines.append(f"    growth: driver {growth['driver']:+.0%}, worker {growth['worker']:+.0%}")
    return lines


def listing_lines(listing: dict[str, Any]) -> list[str]:
    """The listing suite as printed lines."""
    lines = [
        f"driver listing     {listing['keys']} keys in {listing['driver_listing_seconds']:.1f} s ({listing['prefix']})"
    ]
    for row in listing["streamed"]:
        lines.append(
            f"streamed, {row['block_bytes'] >> 10:>5} KiB blocks: first block after {row['first_block_seconds']:.1f} s "
            f"with {row['first_block_keys']} keys; "
            f"{row['blocks']} blocks, {row['keys']} keys in {row['all_blocks_seconds']:.1f} s"
        )
    return lines
