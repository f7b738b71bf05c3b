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
  same files, for the whole run and at scale: the steady-state rate between
  20% and 90% of the rows, from the times result blocks reached the driver
  (one run, so no second scan's warm caches or drift enter it), its spread
  over the passes through the photographs inside that window, and the fixed
  start-up cost this implies (Ray workers, model load, the first batch);
  (d) the ratios (c)/(a) and (b)/baseline; (e) peak RSS of the
  driver and of the largest Ray worker while scanning 2,000 and then 20,000
  small images with the 32 px CIFAKE CNN (so the run takes minutes, not
  hours, on a CPU). Linux only for (e): it reads ``/proc``.
  (f) every preprocess policy (``resize``, ``center-crop``, ``tiles``, ``native``) scanned end to end
  on the same photographs (``--policy-photos``) in one run, each against the bare model's ceiling for
  the views it produced (224 views at the batched rate, native images one forward pass at their
  shape), how close tile-averaged logits come to whole-image logits on the bundled photographs, and
  the peak memory one CPU forward pass adds per megapixel. ``--suite policies`` runs (f) alone.
- ``provenance``: the added cost per image of each provenance check (EXIF/XMP/text chunks, the C2PA
  marker scan, reading and validating a signed manifest, the invisible watermark) on the benchmark's
  photographs, beside their decode + ``resize``; and HEIC full decode against the embedded-thumbnail
  draft: time and how far the draft moves the model's input.
- ``reposts``: PDQ's cost per image on the benchmark's photographs (full decode and the ``resize``
  draft), then near-duplicate grouping of ``--reposts-rows`` (1 million) synthetic hashes with planted
  groups at several distances, in a fresh interpreter: time, peak RSS, pairwise precision and recall
  by distance against the planted groups.
- ``report``: the report's aggregation over 10 million synthetic score rows
  (``--report-rows``) in a fresh interpreter: time and peak RSS.
- ``corpora``: the same photographs as loose files, WebDataset tar shards, a zip and a Parquet image column,
  through the CPU stage on one core and end to end; a decode task's peak RSS on multi-GB archives; the
  decode watchdog's cost per file (:mod:`aidetect_batch.bench.corpora`).
- ``video``: clips made with PyAV (H.264 and VP9 at 720p and 1080p): frames per second decoding every frame
  against sampling N by keyframe seeking, and a scan's videos per second at each N as a share of the
  model's ceiling (:mod:`aidetect_batch.bench.video`).
- ``gpu``: one GPU's ceiling (eager and compiled), and end-to-end scans with CPU decoding, GPU
  decoding and a compiled model, each long enough for 60 s of steady state
  (:mod:`aidetect_batch.bench.gpu`); refuses to run without CUDA.
- ``listing``: for one ``s3://`` prefix (``--listing-prefix``), the time to
  list it on the driver against the time until a streamed scan's listing
  stage hands on its first input block, and how many keys that block holds,
  at the scan's block size and at 4 MiB (the earlier setting).

Figures are printed as a table and written as JSON; ``BENCHMARKS.md``
records them with the command that produced them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from PIL import Image

from aidetect_batch import runtime, schema
from aidetect_batch.bench import corpora, gpu, measure, video
from aidetect_batch.bench.config import BenchmarkConfig
from aidetect_batch.bench.demo import PHOTOS, photo_bytes, run_demo, write_labelled_corpus
from aidetect_batch.detectors import policies as preprocess
from aidetect_batch.detectors import registry
from aidetect_batch.detectors.checkpoints import build_model, save_checkpoint
from aidetect_batch.errors import ConfigError
from aidetect_batch.inputs import manifest, sources
from aidetect_batch.report import groups as neardup
from aidetect_batch.scan import runner
from aidetect_batch.scan.config import ScanConfig
from aidetect_batch.scan.runner import plan_classifier, run_scan
from aidetect_batch.scan.sink import ROW_GROUP_ROWS
from aidetect_batch.train.config import TrainConfig
from aidetect_batch.train.trainer import run_train

# Peak RSS is read from VmHWM: ru_maxrss of a child started by fork and exec keeps the parent's peak.
_PEAK_RSS_MB = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024"


def training(
    archs: tuple[str, ...], per_class: int, epochs: int, *, workers: int, batch_size: int
) -> list[dict[str, Any]]:
    """Train each architecture on a generated set; return per-architecture throughput rows."""

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
                    preprocess=registry.get(arch).train_preprocess,
                )
            )
            speeds = [h["images_per_s_per_worker"] for h in result.history]
            steady = speeds[1:] or speeds
            rows.append(
                {
                    "arch": arch,
                    "input_size": result.input_size,
                    "device": "cuda" if result.use_gpu else "cpu",
                    "workers": workers,
                    "batch_size": batch_size,
                    "train_images": result.dataset.counts("train").images,
                    "epochs": len(result.history),
                    "images_per_s_per_worker": statistics.median(steady),
                    "first_epoch_images_per_s": speeds[0],
                    "wall_seconds": time.monotonic() - start,
                }
            )
    return rows


def scan(
    arch: str, batch_size: int, precision: str, *, photos: int, repeats: int, small: tuple[int, int]
) -> dict[str, Any]:
    """The scan suite (module docstring): ceiling, decode, end to end, ratios and memory at two corpus sizes."""

    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        ckpt = os.path.join(tmp, f"{arch}.pt")
        save_checkpoint(ckpt, build_model(arch, 1), arch, info={"untrained": True, "purpose": "benchmark"})
        paths = measure.write_jpegs(os.path.join(tmp, "photos"), photos, measure.PHOTO_SIZES)
        result["decode"] = measure.decode_speed(paths)
        manifest = os.path.join(tmp, "photos.parquet")
        pq.write_table(pa.table({"path": paths * repeats}), manifest)
        runtime.start_ray()
        base = ScanConfig(
            sources=(),
            manifest=manifest,
            out=os.path.join(tmp, "e2e"),
            checkpoint=ckpt,
            batch_size=batch_size,
            precision=precision,
        )
        plan = plan_classifier(base, ray.cluster_resources())
        result["ceiling"] = measure.model_ceiling(arch, batch_size, plan.cpu_threads or 1, precision=precision)
        result["ceiling"]["actors"] = plan.actors[1]
        run = run_scan(base)
        after = measure.model_ceiling(arch, batch_size, plan.cpu_threads or 1, precision=precision)["images_per_s"]
        result["ceiling"]["measured_images_per_s"] = [result["ceiling"]["images_per_s"], after]
        result["ceiling"]["images_per_s"] = max(result["ceiling"]["images_per_s"], after)
        total = len(paths) * repeats
        e2e = run.summary.facts.images_per_s
        ceiling = result["ceiling"]["images_per_s"] * plan.actors[1]
        steady = measure.steady_rate(run.deliveries)
        passes = measure.pass_rates(run.deliveries, len(paths))
        result["end_to_end"] = {
            "images": total,
            "images_per_s": e2e,
            "fraction_of_ceiling": e2e / ceiling,
            "wall_seconds": run.summary.facts.wall_seconds,
            "first_result_seconds": run.summary.facts.first_result_seconds,
            "infer_stage_images_per_s": run.summary.stage_images_per_s["infer"],
            "steady_images_per_s": steady,
            "steady_fraction_of_ceiling": steady / ceiling,
            "steady_pass_images_per_s": passes,
            "startup_seconds": run.summary.facts.wall_seconds - total / steady,
            "decode_speedup_over_baseline": result["decode"]["speedup"],
        }
        result["memory"] = memory_runs(base, tmp, small)
        first, last = result["memory"][0], result["memory"][-1]
        result["memory_growth"] = {
            "driver": last["driver_peak_rss_mb"] / first["driver_peak_rss_mb"] - 1,
            "worker": last["worker_peak_rss_mb"] / max(first["worker_peak_rss_mb"], 1e-9) - 1,
        }
    return result


def policies(
    arch: str,
    batch_size: int,
    precision: str,
    *,
    photos: int,
    max_tiles: int = preprocess.DEFAULT_MAX_TILES,
    memory_sides: tuple[int, ...] = (512, 1024, 2048),
    sizes: tuple[tuple[int, int], ...] = measure.PHOTO_SIZES,
) -> dict[str, Any]:
    """Every preprocess policy scanned end to end on the same photographs in one run, each against the
    bare model's ceiling for the views it produced, and how close tile-averaged logits come to the
    whole-image logit on the bundled photographs."""
    result: dict[str, Any] = {"arch": arch, "photos": photos, "max_tiles": max_tiles, "policies": []}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        ckpt = os.path.join(tmp, f"{arch}.pt")
        save_checkpoint(ckpt, build_model(arch, 1), arch, info={"untrained": True, "purpose": "benchmark"})
        paths = measure.write_jpegs(os.path.join(tmp, "photos"), photos, sizes)
        manifest = os.path.join(tmp, "photos.parquet")
        pq.write_table(pa.table({"path": paths}), manifest)
        runtime.start_ray()
        threads = (
            plan_classifier(
                ScanConfig(sources=(), manifest=manifest, out="unused", checkpoint=ckpt), ray.cluster_resources()
            ).cpu_threads
            or 1
        )
        seconds = measure.view_seconds(
            arch,
            threads=threads,
            precision=precision,
            batch_size=batch_size,
            native_max_pixels=preprocess.DEFAULT_NATIVE_MAX_PIXELS,
        )
        for policy in preprocess.POLICIES:
            cfg = ScanConfig(
                sources=(),
                manifest=manifest,
                out=os.path.join(tmp, policy),
                checkpoint=ckpt,
                batch_size=batch_size,
                precision=precision,
                preprocess=policy,
                max_tiles=max_tiles,
            )
            result["policies"].append(_policy_row(cfg, seconds))
        photographs = [Image.open(io.BytesIO(photo_bytes(name))).convert("RGB") for name in PHOTOS]
        result["tile_logits"] = measure.tile_logit_agreement(arch, photographs)
    result["forward_memory"] = forward_memory(arch, memory_sides)
    return result


def provenance_suite(photos: int, sizes: tuple[tuple[int, int], ...] = measure.PHOTO_SIZES) -> dict[str, Any]:
    """The provenance suite (module docstring), on ``photos`` benchmark photographs."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = measure.write_jpegs(os.path.join(tmp, "photos"), photos, sizes)
        return {"checks": measure.provenance_costs(paths), "heic": measure.heic_draft(paths)}


def provenance_lines(section: dict[str, Any]) -> list[str]:
    """The provenance suite as printed lines: each check's ms per image and its share of the decode."""
    checks, heic = section["checks"], section["heic"]
    base = checks["decode_resize_ms"]
    lines = [f"provenance checks on {checks['files']} photographs, one core; decode + resize {base:.1f} ms/image"]
    for key, name in (
        ("metadata_ms", "EXIF/XMP/text chunks"),
        ("c2pa_marker_ms", "C2PA marker scan"),
        ("c2pa_read_validate_ms", "C2PA read + validate (signed copy)"),
        ("watermark_ms", f"invisible watermark ({checks['watermark_files']} files)"),
    ):
        lines.append(f"  {name:<40}{checks[key]:9.2f} ms  ({checks[key] / base:6.1%} of decode)")
    lines.append(
        f"HEIC {heic['files']} files: full decode + resize {heic['full_ms']:.1f} ms, {heic['thumbnail_px']} px "
        f"thumbnail draft {heic['draft_ms']:.1f} ms; draft moves the input by {heic['mean_abs_diff']:.2f} "
        f"grey levels on average, {heic['max_abs_diff']} at most"
    )
    return lines


def _policy_row(cfg: ScanConfig, seconds: Any) -> dict[str, Any]:
    """One policy's scan: images/s, views per image, coverage, and the share of the model's ceiling."""
    run = run_scan(cfg)
    table = pq.read_table(os.path.join(cfg.out, schema.SCORES_DIR))
    rows = table.to_pylist()
    model_seconds = sum(seconds(cfg.preprocess, r) for r in rows)
    rate = run.summary.facts.images_per_s
    ceiling = len(rows) / model_seconds
    return {
        "policy": cfg.preprocess,
        "images": len(rows),
        "images_per_s": rate,
        "views_per_image": statistics.mean(r[schema.N_TILES] for r in rows),
        "mean_coverage": statistics.mean(r[schema.COVERAGE] for r in rows),
        "ceiling_images_per_s": ceiling,
        "fraction_of_ceiling": rate / ceiling,
        "wall_seconds": run.summary.facts.wall_seconds,
    }


_FORWARD_PEAK = f"""
import json, sys, torch
from aidetect_batch.detectors.checkpoints import build_model
torch.set_num_threads(1)
net = build_model(sys.argv[1], 1).eval()
x = torch.zeros(1, 3, int(sys.argv[2]), int(sys.argv[2]))
before = {_PEAK_RSS_MB}
with torch.inference_mode():
    net(x)
print(json.dumps({{"peak_rss_mb": {_PEAK_RSS_MB}, "before_mb": before}}))
"""


def forward_memory(arch: str, sides: tuple[int, ...] = (512, 1024, 2048)) -> list[dict[str, Any]]:
    """Peak RSS one CPU forward pass adds at each square input side, each in a fresh interpreter: what
    ``--native-max-pixels`` costs an actor."""
    rows = []
    for side in sides:
        run = subprocess.run(
            [sys.executable, "-c", _FORWARD_PEAK, arch, str(side)], capture_output=True, text=True, check=True
        )
        peak = json.loads(run.stdout.strip().splitlines()[-1])
        added = peak["peak_rss_mb"] - peak["before_mb"]
        rows.append({"side": side, "megapixels": side * side / 1e6, "forward_peak_mb": added})
    for row in rows:
        row["mb_per_megapixel"] = row["forward_peak_mb"] / row["megapixels"]
    return rows


def policy_lines(section: dict[str, Any]) -> list[str]:
    """The per-policy section as printed lines."""
    lines = [f"(f) policies       {section['arch']} on {section['photos']} photographs 1080-2048 px, one run:"]
    for row in section["policies"]:
        lines.append(
            f"    {row['policy']:<11} {row['images_per_s']:7.2f} img/s, {row['views_per_image']:5.1f} views/image, "
            f"coverage {row['mean_coverage']:6.1%}, ceiling {row['ceiling_images_per_s']:7.2f} img/s, "
            f"{row['fraction_of_ceiling']:.0%} of it"
        )
    t = section["tile_logits"]
    lines.append(
        f"    tile-mean vs whole-image logit on {t['photos']} photographs: mean |diff| "
        f"{t['mean_abs_difference']:.3f}, max {t['max_abs_difference']:.3f} (whole-image logits spread "
        f"{t['whole_logit_std']:.3f}), correlation {t['correlation']:.3f}"
    )
    for row in section["forward_memory"]:
        lines.append(
            f"    one CPU forward pass at {row['side']}x{row['side']} ({row['megapixels']:.2f} MP): "
            f"+{row['forward_peak_mb']:.0f} MB peak RSS ({row['mb_per_megapixel']:.0f} MB/MP)"
        )
    return lines


def memory_runs(base: ScanConfig, tmp: str, sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    """Peak RSS of the driver and the largest Ray worker while scanning each number of small images
    with the 32 px CIFAKE CNN: memory that grows with the scan's length shows between the sizes."""
    checkpoint = os.path.join(tmp, "small.pt")
    small = registry.get(registry.SMALL_ARCH)
    save_checkpoint(checkpoint, build_model(small.name, 1), small.name, preprocess=small.train_preprocess)
    paths = measure.write_jpegs(os.path.join(tmp, "small"), max(sizes), ((96, 96), (128, 96)), seed=1)
    manifest = os.path.join(tmp, "small.parquet")
    pq.write_table(pa.table({"path": paths}), manifest)
    memory = []
    for count in sorted(sizes):
        cfg = dataclasses.replace(
            base,
            manifest=manifest,
            limit=count,
            checkpoint=checkpoint,
            batch_size=256,
            decode_batch_size=64,
            out=os.path.join(tmp, f"mem{count}"),
        )
        with measure.RssSampler() as sampler:
            start = time.monotonic()
            run_scan(cfg)
        memory.append(
            {
                "images": count,
                "driver_peak_rss_mb": sampler.peak_driver_bytes / 2**20,
                "worker_peak_rss_mb": sampler.peak_worker_bytes / 2**20,
                "wall_seconds": time.monotonic() - start,
            }
        )
    return memory


def listing(prefix: str, storage_options: dict[str, Any] | None = None, rounds: int = 2) -> dict[str, Any]:
    """The listing suite (module docstring): driver listing against the streamed listing's first block.

    Both block sizes are measured ``rounds`` times, alternating, because the first streamed
    listing also pays for starting its Ray worker.
    """

    options = storage_options or {}
    cfg = ScanConfig(sources=(prefix,), out="unused", checkpoint="unused", storage_options=options)
    start = time.monotonic()
    keys = sources.list_sources(cfg.sources, cfg.extensions, storage_options=options).num_rows
    result: dict[str, Any] = {"prefix": prefix, "keys": keys, "driver_listing_seconds": time.monotonic() - start}
    units = sources.listing_units(cfg.sources, options)
    runtime.start_ray()
    streamed = []
    for block_bytes in (runner.STREAM_BLOCK_BYTES, 4 << 20) * rounds:
        state = ray.remote(num_cpus=0)(manifest.ListingState).remote()
        ds = runner.streamed_inputs(
            cfg, units, shard_rows=runner.STREAM_SHARD_ROWS, done={}, state=state, block_bytes=block_bytes
        )
        start = time.monotonic()
        row: dict[str, Any] = {"block_bytes": block_bytes, "blocks": 0, "keys": 0}
        for batch in runner.delivered(ds):
            if not row["blocks"]:
                row["first_block_seconds"] = time.monotonic() - start
                row["first_block_keys"] = batch.num_rows
            row["blocks"] += 1
            row["keys"] += batch.num_rows
        row["all_blocks_seconds"] = time.monotonic() - start
        streamed.append(row)
    result["streamed"] = streamed
    return result


REPORT_SOURCES = ("/dump", "s3://bucket/posts")
REPORT_STATUSES = ("ok",) * 8 + ("undecodable", "unreadable", "truncated", "duplicate", "too_large")


def synthetic_scores(directory: str, rows: int, *, rows_per_file: int = 250_000, seed: int = 0) -> None:
    """Write ``rows`` score rows as a scan writes them (the scores schema, files of 250,000 rows in
    16,384-row groups, zstd): 2 sources, 1,000 users, and statuses, errors and labels in realistic shares."""

    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    for f, first in enumerate(range(0, rows, rows_per_file)):
        n = min(rows_per_file, rows - first)
        status = np.array(REPORT_STATUSES)[rng.integers(0, len(REPORT_STATUSES), n)]
        ok = status == "ok"
        score = np.where(ok, rng.random(n), np.nan).astype(np.float32)
        source = np.array(REPORT_SOURCES)[rng.integers(0, 2, n)]
        folder = np.char.add(np.char.add("/u", rng.integers(0, 1000, n).astype(str)), "/")
        name = np.char.add(np.char.add("img", np.arange(first, first + n).astype(str)), ".jpg")
        failed = ~ok & (status != "duplicate")
        error = np.char.add("OSError: [Errno ", np.char.add(rng.integers(1, 6, n).astype(str), "] failed"))
        columns = {
            schema.PATH: pa.array(np.char.add(np.char.add(source, folder), name)),
            schema.SOURCE: pa.array(source),
            schema.STATUS: pa.array(status),
            schema.ERROR: pa.array(error, mask=~failed),
            schema.SCORE: pa.array(score),
            schema.LABEL: pa.array(np.where(score >= 0.5, "ai", "real"), mask=~ok),
            schema.FORMAT: pa.array(np.where(rng.random(n) < 0.7, "JPEG", "PNG"), mask=~ok),
            schema.T_READ_MS: pa.array(rng.random(n).astype(np.float32)),
            schema.T_DECODE_MS: pa.array(rng.random(n).astype(np.float32), mask=~ok),
            schema.T_INFER_MS: pa.array(rng.random(n).astype(np.float32), mask=~ok),
        }
        table = pa.table(
            {
                field.name: columns[field.name].cast(field.type) if field.name in columns else pa.nulls(n, field.type)
                for field in schema.SCORES_SCHEMA
            },
            schema=schema.SCORES_SCHEMA,
        )
        path = os.path.join(directory, f"part-bench-{f:05d}.parquet")
        pq.write_table(table, path, compression="zstd", row_group_size=ROW_GROUP_ROWS)


_SUMMARISE = f"""
import json, sys, time
from aidetect_batch.report.aggregate import summarise
start = time.monotonic()
summary = summarise(sys.argv[1], 1)
print(json.dumps({{"seconds": time.monotonic() - start, "rows": summary.total,
                  "prefixes": len(summary.prefixes), "peak_rss_mb": {_PEAK_RSS_MB}}}))
"""
_IMPORT_ONLY = f"""
import json
import aidetect_batch.report.aggregate
print(json.dumps({{"peak_rss_mb": {_PEAK_RSS_MB}}}))
"""


def report_aggregation(rows: int = 10_000_000) -> dict[str, Any]:
    """The report's aggregation (``report.summarise``, group depth 1) over ``rows`` synthetic score rows,
    in a fresh interpreter: wall time and peak RSS, next to the RSS of that interpreter after imports.
    Linux only: it reads ``/proc``."""

    with tempfile.TemporaryDirectory() as tmp:
        start = time.monotonic()
        synthetic_scores(tmp, rows)
        written = time.monotonic() - start
        run = subprocess.run([sys.executable, "-c", _SUMMARISE, tmp], capture_output=True, text=True, check=True)
        imports = subprocess.run([sys.executable, "-c", _IMPORT_ONLY], capture_output=True, text=True, check=True)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    result.update(
        rows_per_s=result["rows"] / result["seconds"],
        import_only_rss_mb=json.loads(imports.stdout.strip().splitlines()[-1])["peak_rss_mb"],
        write_seconds=written,
    )
    return result


_GROUP = f"""
import json, sys, time
import numpy as np
from aidetect_batch.report import groups
codes = np.load(sys.argv[1])
start = time.monotonic()
found = groups.near_duplicate_groups(codes, int(sys.argv[2]))
np.save(sys.argv[3], found)
print(json.dumps({{"seconds": time.monotonic() - start, "peak_rss_mb": {_PEAK_RSS_MB}}}))
"""
_GROUP_IMPORT_ONLY = f"""
import json
import numpy as np
from aidetect_batch.report import groups
codes = np.load(__import__("sys").argv[1])
print(json.dumps({{"peak_rss_mb": {_PEAK_RSS_MB}}}))
"""


def reposts_grouping(
    rows: int = 1_000_000, *, groups: int = 20_000, members: int = 5, distances: tuple[int, ...] = (4, 12, 20, 28, 31)
) -> dict[str, Any]:
    """Near-duplicate grouping over ``rows`` synthetic PDQ hashes with planted groups (copies at each of
    ``distances`` bits from their base), in a fresh interpreter: time, peak RSS beside the RSS of the loaded
    hashes, pairwise precision and recall per distance against the planted groups."""
    codes, truth, offset = measure.planted_hashes(rows, groups=groups, members=members, distances=distances)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(os.path.join(tmp, "codes.npy"), codes)
        argv = [os.path.join(tmp, "codes.npy"), "31", os.path.join(tmp, "found.npy")]
        run = subprocess.run([sys.executable, "-c", _GROUP, *argv], capture_output=True, text=True, check=True)
        base = subprocess.run(
            [sys.executable, "-c", _GROUP_IMPORT_ONLY, argv[0]], capture_output=True, text=True, check=True
        )
        found = np.load(argv[2])
    result = json.loads(run.stdout.strip().splitlines()[-1])
    result.update(
        rows=rows,
        planted_groups=groups,
        members=members,
        chunk_bits=neardup.chunk_bits(rows),
        loaded_rss_mb=json.loads(base.stdout.strip().splitlines()[-1])["peak_rss_mb"],
        **measure.grouping_quality(truth, found, offset),
    )
    return result


def reposts_suite(photos: int, rows: int) -> dict[str, Any]:
    """The reposts suite (module docstring): PDQ's cost per image, then grouping ``rows`` planted hashes."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = measure.write_jpegs(os.path.join(tmp, "photos"), photos, measure.PHOTO_SIZES)
        hashing = measure.phash_cost(paths)
    return {"hashing": hashing, "grouping": reposts_grouping(rows)}


def reposts_lines(section: dict[str, Any]) -> list[str]:
    """The reposts suite as printed lines."""
    h, g = section["hashing"], section["grouping"]
    per_mb = (g["peak_rss_mb"] - g["loaded_rss_mb"]) / (g["rows"] / 1e6)
    apart = h["full_vs_draft_bits"]
    return [
        f"PDQ on {h['files']} photographs, one core: {h['pdq_full_ms']:.1f} ms on the full decode, "
        f"{h['pdq_draft_ms']:.1f} ms on the resize draft (decode + resize {h['decode_resize_ms']:.1f} ms); "
        f"the two hashes differ by {apart['mean']:.1f} bits on average, {apart['max']} at most",
        f"grouping {g['rows']:,} hashes ({g['planted_groups']:,} planted groups of {g['members']}), "
        f"{g['chunk_bits']}-bit chunks: {g['seconds']:.1f} s, peak RSS {g['peak_rss_mb']:.0f} MB "
        f"({per_mb:.0f} MB per million hashes above the loaded hashes); "
        f"pairwise precision {g['pairwise_precision']:.4f}; recall by distance "
        + ", ".join(f"{d}: {r:.3f}" for d, r in g["recall_by_distance"].items()),
    ]


def demo() -> dict[str, Any]:
    """Run the whole demo once and time it."""

    with tempfile.TemporaryDirectory() as tmp:
        start = time.monotonic()
        code = run_demo(tmp)
        return {"demo_wall_seconds": time.monotonic() - start, "exit_code": code}


SCAN_BATCH_SIZE = 64


def _training_suite(
    *, archs: tuple[str, ...], per_class: int, epochs: int, workers: int, batch_size: int
) -> dict[str, Any]:
    return {"training": training(archs, per_class, epochs, workers=workers, batch_size=batch_size)}


def _demo_suite() -> dict[str, Any]:
    return {"demo": demo()}


def _policies_suite(*, scan_arch: str, precision: str, policy_photos: int) -> dict[str, Any]:
    return {"policies": policies(scan_arch, SCAN_BATCH_SIZE, precision, photos=policy_photos)}


def _scan_suite(
    *, scan_arch: str, precision: str, photos: int, repeats: int, memory_sizes: tuple[int, ...], policy_photos: int
) -> dict[str, Any]:
    section = scan(scan_arch, SCAN_BATCH_SIZE, precision, photos=photos, repeats=repeats, small=memory_sizes)
    return {"scan": section, **_policies_suite(scan_arch=scan_arch, precision=precision, policy_photos=policy_photos)}


def _provenance_suite(*, policy_photos: int) -> dict[str, Any]:
    return {"provenance": provenance_suite(policy_photos)}


def _reposts_suite(*, policy_photos: int, reposts_rows: int) -> dict[str, Any]:
    return {"reposts": reposts_suite(policy_photos, reposts_rows)}


def _listing_suite(*, listing_prefix: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    return {"listing": listing(listing_prefix, storage_options)}


def _report_suite(*, report_rows: int) -> dict[str, Any]:
    return {"report": report_aggregation(report_rows)}


def _corpora_suite(*, corpora_photos: int, archive_gb: float) -> dict[str, Any]:
    return {"corpora": corpora.run_corpora(corpora_photos, archive_gb)}


def _video_suite(*, video_seconds: float, video_copies: int, video_frames: tuple[int, ...]) -> dict[str, Any]:
    return {"video": video.run_video(video_seconds, video_copies, video_frames)}


def _gpu_suite(*, scan_arch: str, precision: str, photos: int) -> dict[str, Any]:
    options = gpu.GpuSuiteOptions(arch=scan_arch, precision=precision, photos=photos)
    return {"gpu": gpu.run_gpu_suite(options)}


@dataclasses.dataclass(frozen=True)
class Suite:
    """One benchmark suite.

    Attributes:
        run: Runs it; takes ``options`` by keyword and returns the result's sections by name.
        options: The :class:`~aidetect_batch.bench.config.BenchmarkConfig` fields it takes.
        in_all: ``--suite all`` runs it.
        json: Where its results go when ``--json`` is not given.
    """

    run: Callable[..., dict[str, Any]]
    options: tuple[str, ...] = ()
    in_all: bool = True
    json: str | None = None


ALL = "all"
# The one table of suites: the CLI's --suite choices are its names and "all".
SUITES: dict[str, Suite] = {
    "training": Suite(_training_suite, ("archs", "per_class", "epochs", "workers", "batch_size")),
    "demo": Suite(_demo_suite),
    "scan": Suite(_scan_suite, ("scan_arch", "precision", "photos", "repeats", "memory_sizes", "policy_photos")),
    "policies": Suite(_policies_suite, ("scan_arch", "precision", "policy_photos"), in_all=False),
    "provenance": Suite(_provenance_suite, ("policy_photos",)),
    "reposts": Suite(_reposts_suite, ("policy_photos", "reposts_rows")),
    "listing": Suite(_listing_suite, ("listing_prefix", "storage_options"), in_all=False),
    "report": Suite(_report_suite, ("report_rows",), in_all=False),
    "corpora": Suite(_corpora_suite, ("corpora_photos", "archive_gb"), in_all=False),
    "video": Suite(_video_suite, ("video_seconds", "video_copies", "video_frames"), in_all=False),
    "gpu": Suite(_gpu_suite, ("scan_arch", "precision", "photos"), in_all=False, json="benchmark-gpu.json"),
}


def suite_names() -> tuple[str, ...]:
    """The names ``--suite`` accepts: every suite of :data:`SUITES`, and ``all``."""
    return (*SUITES, ALL)


def chosen_suites(name: str) -> list[str]:
    """The suites ``--suite name`` runs, in table order; raises :class:`ConfigError` for an unknown name."""
    if name == ALL:
        return [n for n, suite in SUITES.items() if suite.in_all]
    if name not in SUITES:
        raise ConfigError(f"--suite must be one of {', '.join(suite_names())}, not {name!r}")
    return [name]


def run_benchmark(cfg: BenchmarkConfig) -> dict[str, Any]:
    """Run the chosen suite(s), print their table, and write the JSON where ``cfg`` (or the suite) says."""
    names = chosen_suites(cfg.suite)
    result: dict[str, Any] = {
        "suite": cfg.suite,
        "machine": measure.machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for name in names:
        suite = SUITES[name]
        result.update(suite.run(**{option: getattr(cfg, option) for option in suite.options}))
    lines = [f"machine: {result['machine']['cpus']} CPUs, GPU {result['machine']['gpu'] or 'none'}"]
    for section, printed in _LINES.items():
        if section in result:
            lines += printed(result[section])
    print("\n".join(lines), flush=True)
    out = cfg.json or (SUITES[cfg.suite].json if cfg.suite in SUITES else None)
    if out:
        with open(out, "w") as handle:
            json.dump(result, handle, indent=2, default=str)
    return result


def training_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The training suite as printed lines."""
    return [
        f"train {row['arch']:<12} {row['input_size']:>3}px {row['device']} "
        f"{row['images_per_s_per_worker']:8.1f} img/s/worker "
        f"(first epoch {row['first_epoch_images_per_s']:.1f}), {row['train_images']} train images, "
        f"{row['epochs']} epochs, {row['wall_seconds']:.0f} s wall"
        for row in rows
    ]


def report_lines(r: dict[str, Any]) -> list[str]:
    """The report suite as printed lines."""
    return [
        f"report aggregation: {r['rows']:,} rows in {r['seconds']:.1f} s ({r['rows_per_s']:,.0f} rows/s), "
        f"peak RSS {r['peak_rss_mb']:.0f} MB ({r['import_only_rss_mb']:.0f} MB after imports), "
        f"{r['prefixes']} prefixes"
    ]


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
        f"(c) at scale       {e['steady_images_per_s']:.1f} img/s steady (20-90% of rows); passes "
        f"{_spread(e['steady_pass_images_per_s'])}; fixed start-up {e['startup_seconds']:.1f} s",
        f"(d) ratios         end to end / ceiling {e['fraction_of_ceiling']:.0%} (whole run), "
        f"{e['steady_fraction_of_ceiling']:.0%} (at scale); decode speed-up {d['speedup']:.2f}x",
    ]
    for row in scan["memory"]:
        lines.append(
            f"(e) {row['images']:>6} images: driver peak RSS {row['driver_peak_rss_mb']:.0f} MB, "
            f"largest worker {row['worker_peak_rss_mb']:.0f} MB, {row['wall_seconds']:.0f} s"
        )
    growth = scan["memory_growth"]
    lines.append(f"    growth: driver {growth['driver']:+.0%}, worker {growth['worker']:+.0%}")
    return lines


def _spread(rates: list[float]) -> str:
    if not rates:
        return "none inside the window"
    return f"median {statistics.median(rates):.1f}, {min(rates):.1f}-{max(rates):.1f} img/s over {len(rates)}"


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


# Each result section and how it prints, in the order the table prints them.
_LINES: dict[str, Callable[[Any], list[str]]] = {
    "training": training_lines,
    "demo": lambda section: [f"demo wall time {section['demo_wall_seconds']:.0f} s"],
    "scan": scan_lines,
    "policies": policy_lines,
    "provenance": provenance_lines,
    "reposts": reposts_lines,
    "listing": listing_lines,
    "gpu": gpu.gpu_lines,
    "report": report_lines,
    "corpora": corpora.corpora_lines,
    "video": video.video_lines,
}
