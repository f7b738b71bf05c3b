"""Measurements the benchmark suites share: the machine, test photographs, the bare model's ceiling,
decode speed, peak memory, and the steady-state rate of a scan from its delivery timestamps."""

from __future__ import annotations

import io
import os
import platform
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from aidetect_batch.bench import credentials
from aidetect_batch.config import DEFAULT_MAX_PIXELS
from aidetect_batch.detectors import policies
from aidetect_batch.detectors.checkpoints import build_model, default_input_size
from aidetect_batch.detectors.policies import decode_and_preprocess, native_shape, tiles_view
from aidetect_batch.detectors.registry import IMAGENET_MEAN, IMAGENET_STD
from aidetect_batch.media import decode, pdq, provenance
from aidetect_batch.runtime import versions
from aidetect_batch.scan.classifier import cpu_chunk

STEADY_WINDOW = (0.2, 0.9)


def machine() -> dict[str, Any]:
    """CPU count, GPU name and library versions of this machine."""

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpus": os.cpu_count(), "gpu": gpu, "processor": platform.processor(), "versions": versions()}


PHOTO_SIZES = ((1080, 1350), (1920, 1080), (2048, 1536), (1440, 1080))


def write_jpegs(root: str, count: int, sizes: tuple[tuple[int, int], ...], *, seed: int = 0) -> list[str]:
    """Photo-like JPEGs (smooth fields plus sensor-like noise, quality 90) of the given sizes."""

    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    paths = []
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        path = os.path.join(root, f"photo_{i:05d}.jpg")
        Image.fromarray(photo_pixels(width, height, rng)).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def photo_pixels(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A photo-like ``(height, width, 3)`` uint8 picture: smooth colour fields plus sensor-like noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 6.28, 3)
    base = np.stack([128 + 90 * np.sin(x / (40 + 9 * c) + y / (70 + 5 * c) + phase[c]) for c in range(3)], -1)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def model_ceiling(
    arch: str, batch_size: int, threads: int, *, precision: str, batches: int = 6, compile: bool = False
) -> dict[str, Any]:
    """Forward images/s of the bare model on this process's device, as the Classifier runs it:
    channels_last and autocast on CUDA, chunks of ``cpu_chunk`` images on CPU, ``torch.compile``d
    when asked (the first passes, which compile, are not timed)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(threads)
    net = build_model(arch, 1).eval().to(device)
    side = default_input_size(arch)
    x = torch.randn(batch_size, 3, side, side, device=device)
    if cuda:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision) if cuda else None
    chunk = batch_size if cuda else cpu_chunk(side)
    if compile:
        net = torch.compile(net)

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

    for _ in range(3 if compile else 1):
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
        "compiled": compile,
        "images_per_s": batches * batch_size / seconds,
    }


def decode_speed(paths: list[str], policy: str = "resize") -> dict[str, Any]:
    """Decode + preprocess images/s on one core: this project's path against PIL + torchvision."""

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


def steady_rate(deliveries: list[tuple[float, int]], window: tuple[float, float] = STEADY_WINDOW) -> float:
    """Rows per second between two fractions of a scan's rows, from its ``(seconds, rows so far)`` deliveries.

    Start-up (Ray workers, model load, the first batch) and the tail (the last partial batches) fall outside
    the window, so this is the rate a longer scan would keep."""
    total = deliveries[-1][1]
    start, end = (_time_at(deliveries, fraction * total) for fraction in window)
    return (window[1] - window[0]) * total / max(end - start, 1e-9)


def pass_rates(
    deliveries: list[tuple[float, int]], pass_rows: int, window: tuple[float, float] = STEADY_WINDOW
) -> list[float]:
    """Rows per second of each full pass through the photographs that lies inside the steady window."""
    total = deliveries[-1][1]
    rates = []
    for first in range(0, total, pass_rows):
        last = first + pass_rows
        if first >= window[0] * total and last <= window[1] * total:
            rates.append(pass_rows / max(_time_at(deliveries, last) - _time_at(deliveries, first), 1e-9))
    return rates


def _time_at(deliveries: list[tuple[float, int]], rows: float) -> float:
    """When the ``rows``-th row reached the driver, interpolated between deliveries."""
    before = (0.0, 0)
    for seconds, done in deliveries:
        if done >= rows:
            share = (rows - before[1]) / max(done - before[1], 1)
            return before[0] + share * (seconds - before[0])
        before = (seconds, done)
    return deliveries[-1][0]


def view_seconds(
    arch: str, *, threads: int, precision: str, batch_size: int, native_max_pixels: int
) -> Callable[[str, dict[str, Any]], float]:
    """Model-only seconds per scanned row, by the row's policy and view: a 224 view costs the bare
    model's batched rate, a ``tiles`` row that per tile, a ``native`` row one forward pass at its own
    shape, measured once per shape (a first pass warms up, the second is timed)."""
    per_224 = 1.0 / model_ceiling(arch, batch_size, threads, precision=precision)["images_per_s"]
    net = build_model(arch, 1).eval()
    shapes: dict[tuple[int, int], float] = {}

    def at_shape(shape: tuple[int, int]) -> float:
        if shape not in shapes:
            x = torch.randn(1, 3, *shape)
            with torch.inference_mode():
                net(x)
                start = time.perf_counter()
                net(x)
            shapes[shape] = time.perf_counter() - start
        return shapes[shape]

    def seconds(policy: str, row: dict[str, Any]) -> float:
        view = policies.get(policy).view
        if view is policies.ViewShape.ANY:
            return at_shape(native_shape(row["height"], row["width"], native_max_pixels))
        return per_224 * (row["n_tiles"] if view is policies.ViewShape.TILES else 1)

    return seconds


def tile_logit_agreement(arch: str, photos: list[Image.Image], size: int = 224, seed: int = 0) -> dict[str, Any]:
    """How close the mean of an image's tile logits comes to its whole-image logit on photographs, for a
    randomly initialised ``arch``: the mean and largest absolute difference, the spread of the
    whole-image logits for scale, and their correlation."""
    torch.manual_seed(seed)
    net = build_model(arch, 1).eval()
    normalise = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    whole, tiled = [], []
    with torch.inference_mode():
        for img in photos:
            whole.append(float(net(normalise(img)[None])[0, 0]))
            tiles = tiles_view(np.asarray(img), size, max_tiles=10_000).pixels
            tiled.append(float(net(torch.stack([normalise(Image.fromarray(t)) for t in tiles]))[:, 0].mean()))
    difference = np.abs(np.array(whole) - np.array(tiled))
    return {
        "arch": arch,
        "photos": len(photos),
        "mean_abs_difference": float(difference.mean()),
        "max_abs_difference": float(difference.max()),
        "whole_logit_std": float(np.std(whole)),
        "correlation": float(np.corrcoef(whole, tiled)[0, 1]) if len(photos) > 2 else None,
    }


def _ms_per_item(fn: Callable[[Any], Any], items: list[Any]) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - start) * 1000.0 / max(1, len(items))


def provenance_costs(paths: list[str], *, watermark_files: int = 4) -> dict[str, Any]:
    """Cost per image of each provenance check on one core, beside the file's decode + ``resize``.

    C2PA is timed on signed copies of the same photographs (a throwaway chain, signature validated);
    the other checks on the plain files, which is what a dump mostly holds.
    """
    torch.set_num_threads(1)
    data = [_read(path) for path in paths]
    signed = [credentials.sign_jpeg(blob, provenance.TRAINED) for blob in data]
    wm = data[:watermark_files]
    costs = {
        "decode_resize_ms": _ms_per_item(lambda b: decode_and_preprocess(b, "resize", DEFAULT_MAX_PIXELS), data),
        "metadata_ms": _ms_per_item(lambda b: provenance.inspect(b, provenance.Checks(c2pa=False)), data),
        "c2pa_marker_ms": _ms_per_item(provenance.has_c2pa_marker, data),
        "c2pa_read_validate_ms": _ms_per_item(provenance.c2pa_signals, signed),
        "watermark_ms": _ms_per_item(lambda b: provenance.watermark_signals(b, DEFAULT_MAX_PIXELS), wm),
    }
    return {
        "files": len(data),
        "watermark_files": len(wm),
        "signed_kb": np.mean([len(s) - len(d) for s, d in zip(signed, data, strict=True)]) / 1024,
        **costs,
    }


def heic_draft(paths: list[str], *, thumbnail: int = 1024) -> dict[str, Any]:
    """HEIC full decode against the embedded-thumbnail draft, both under ``resize``: time and pixel agreement.

    Each photograph is re-encoded as HEIC with a ``thumbnail``-pixel thumbnail; the draft asks for the
    same size JPEG draft mode keeps (twice the policy's short side)."""
    full_ms, draft_ms, mean_diff, max_diff = [], [], [], []
    for path in paths:
        buffer = io.BytesIO()
        Image.open(path).save(buffer, "HEIF", quality=90, thumbnails=[thumbnail])
        blob = buffer.getvalue()
        views = {}
        for mode, times in (("full", full_ms), ("draft", draft_ms)):
            start = time.perf_counter()
            views[mode] = _heic_view(blob, draft=mode == "draft")
            times.append((time.perf_counter() - start) * 1000.0)
        diff = np.abs(views["full"].astype(np.int16) - views["draft"].astype(np.int16))
        mean_diff.append(float(diff.mean()))
        max_diff.append(int(diff.max()))
    return {
        "files": len(paths),
        "thumbnail_px": thumbnail,
        "full_ms": float(np.mean(full_ms)),
        "draft_ms": float(np.mean(draft_ms)),
        "mean_abs_diff": float(np.mean(mean_diff)),
        "max_abs_diff": int(max(max_diff)),
    }


def _heic_view(blob: bytes, *, draft: bool) -> np.ndarray:
    image = Image.open(io.BytesIO(blob))
    if draft:
        keep = policies.needed_short_side("resize", policies.CROP) * decode.DRAFT_OVERSAMPLE
        scale = keep / min(image.size)
        image.draft("RGB", (int(image.width * scale), int(image.height * scale)))
    return policies.view_of(image.convert("RGB"), "resize", policies.CROP, None).pixels


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def planted_hashes(
    rows: int, *, groups: int, members: int, distances: tuple[int, ...], seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``rows`` random 256-bit hashes in which ``groups`` groups are planted: a base and ``members - 1`` copies,
    each exactly ``d`` bits from its base, ``d`` cycling through ``distances``. Returns the ``(rows, 32)`` codes,
    each row's planted group (-1: background) and each row's distance from its base."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (rows, 32), dtype=np.uint8)
    truth = np.full(rows, -1, np.int64)
    offset = np.zeros(rows, np.int64)
    for g in range(groups):
        first, d = g * members, distances[g % len(distances)]
        truth[first : first + members] = g
        bits = np.unpackbits(codes[first])
        for m in range(first + 1, first + members):
            copy = bits.copy()
            copy[rng.choice(256, d, replace=False)] ^= 1
            codes[m] = np.packbits(copy)
            offset[m] = d
    return codes, truth, offset


def grouping_quality(truth: np.ndarray, found: np.ndarray, offset: np.ndarray) -> dict[str, Any]:
    """Against planted groups: pairwise precision (rows put together that were planted together), and per
    planted distance the recall of copies joined to their base's group."""
    sizes = np.unique(found, return_counts=True)[1]
    predicted = int(np.sum(sizes * (sizes - 1) // 2))
    planted = truth >= 0
    pairs = np.unique(np.stack([found[planted], truth[planted]], 1), axis=0, return_counts=True)[1]
    together = int(np.sum(pairs * (pairs - 1) // 2))
    base_of = np.zeros(int(truth.max(initial=-1)) + 1, np.int64)
    bases = np.flatnonzero(planted & (offset == 0))
    base_of[truth[bases]] = bases
    recall = {}
    for d in sorted(set(offset[planted & (offset > 0)].tolist())):
        copies = np.flatnonzero(planted & (offset == d))
        recall[str(d)] = float(np.mean(found[copies] == found[base_of[truth[copies]]]))
    return {"pairwise_precision": together / predicted if predicted else None, "recall_by_distance": recall}


def phash_cost(paths: list[str]) -> dict[str, Any]:
    """PDQ per image on one core, on the full decode and on the ``resize`` policy's draft decode (what
    ``--phash`` hashes under ``resize``), beside those decodes, and how far apart the two hashes are."""
    torch.set_num_threads(1)
    full = [decode.decode_image(_read(p), DEFAULT_MAX_PIXELS).image for p in paths]
    short = policies.needed_short_side("resize", policies.CROP)
    drafted = [decode.decode_image(_read(p), DEFAULT_MAX_PIXELS, short).image for p in paths]
    apart = [pdq.distance(pdq.pdq_of(a).hash, pdq.pdq_of(b).hash) for a, b in zip(full, drafted, strict=True)]
    return {
        "files": len(paths),
        "decode_resize_ms": _ms_per_item(
            lambda p: decode_and_preprocess(_read(p), "resize", DEFAULT_MAX_PIXELS), paths
        ),
        "pdq_full_ms": _ms_per_item(pdq.pdq_of, full),
        "pdq_draft_ms": _ms_per_item(pdq.pdq_of, drafted),
        "full_vs_draft_bits": {"mean": float(np.mean(apart)), "max": int(max(apart))},
    }
