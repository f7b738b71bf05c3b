"""``aidetect-batch demo``: the whole mission offline, on a local Ray instance, in a few minutes.

1. Build a small labelled corpus: **real** crops of photographs bundled with
   the package (scikit-image's CC0 / public-domain photos, see
   ``demo_data/LICENSES.md``) and **stand-in "AI" images** made by a small
   neural generator (:class:`StandInGenerator`), plus broken files.
2. Train a CIFAKE-style CNN on it with Ray Train on CPU.
3. Evaluate the checkpoint on the held-out test split through the scan
   pipeline, with a robustness sweep.
4. Scan the corpus and an unlabelled "dump" with broken files.

The stand-in generator is an *untrained* transposed-convolution decoder
applied to 2× downsampled real crops. It is not Stable Diffusion: it leaves
the periodic upsampling (checkerboard) artifacts that GAN detectors key on,
so the detector has something real to learn, but **the demo's numbers say
nothing about accuracy on real generator output.**
"""

from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from importlib import resources

import numpy as np
from PIL import Image

from aidetect_batch.detectors import registry
from aidetect_batch.detectors.policies import DEFAULT_TRAIN_POLICY
from aidetect_batch.report.aggregate import closing_line
from aidetect_batch.scan.config import ScanConfig
from aidetect_batch.scan.runner import run_scan
from aidetect_batch.schema import Status
from aidetect_batch.train.config import EvalConfig, TrainConfig
from aidetect_batch.train.evaluation import format_table, run_evaluate
from aidetect_batch.train.trainer import run_train

PHOTOS = ("astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg", "camera.jpg")

DEMO_BANNER = """
************************************************************************
*  DEMO NUMBERS ARE NOT REAL-WORLD ACCURACY. The "ai" class is made    *
*  by a tiny untrained stand-in generator from the same few photos,    *
*  not by Stable Diffusion, Midjourney or DALL-E. The demo shows the   *
*  workflow: train -> evaluate -> scan. Train on a real labelled       *
*  corpus for a real detector.                                         *
************************************************************************
"""
DEMO_SIDE = 64


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header announces ``width``×``height`` with almost no pixel data (a bomb probe)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    )


def photo_bytes(name: str) -> bytes:
    """Bytes of a bundled real photograph (CC0 / public domain, see demo_data/LICENSES.md)."""
    return resources.files("aidetect_batch.bench").joinpath("demo_data", name).read_bytes()


def write_demo_corpus(root: str) -> dict[str, Status]:
    """Write the demo corpus under ``root``; returns each file's expected status."""
    expected: dict[str, Status] = {}

    def put(relative: str, data: bytes, status: Status) -> None:
        path = os.path.join(root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data)
        expected[os.path.abspath(path)] = status

    for i, name in enumerate(PHOTOS):
        put(f"user_{i % 2}/{name}", photo_bytes(name), Status.OK)
    chelsea = Image.open(io.BytesIO(photo_bytes("chelsea.jpg")))
    buf = io.BytesIO()
    chelsea.convert("RGBA").save(buf, "PNG")
    put("user_2/chelsea_alpha.png", buf.getvalue(), Status.OK)
    buf = io.BytesIO()
    frames = [chelsea.convert("P"), chelsea.rotate(10).convert("P")]
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
    put("user_2/animated.gif", buf.getvalue(), Status.OK)
    put("user_2/no_extension", photo_bytes("coffee.jpg"), Status.OK)
    rocket = photo_bytes("rocket.jpg")
    put("broken/truncated.jpg", rocket[: len(rocket) // 2], Status.TRUNCATED)
    put("broken/zero_bytes.jpg", b"", Status.EMPTY)
    put("broken/notes.jpg", b"this is a text file someone named .jpg\n", Status.UNDECODABLE)
    put("broken/bomb.png", png_header_only(12_000, 12_000), Status.TOO_LARGE)
    return expected


class StandInGenerator:
    """A seeded, untrained 2× upsampling decoder: bilinear upsampling plus a transposed-conv residual.

    Stride-2 transposed convolutions with kernel 4 overlap unevenly, which
    prints a period-2 checkerboard into every output: the classic GAN
    upsampling artifact. The residual's amplitude is bounded, so colours and
    content stay those of the input crop.
    """

    def __init__(self, seed: int = 0, amplitude: float = 0.25) -> None:
        import torch
        from torch import nn

        generator = torch.Generator().manual_seed(seed)
        self.up = nn.ConvTranspose2d(3, 16, 4, stride=2, padding=1)
        self.out = nn.Conv2d(16, 3, 3, padding=1)
        with torch.no_grad():
            for layer in (self.up, self.out):
                bound = 1.0 / (layer.weight[0].numel() ** 0.5)
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)
        self.amplitude = amplitude

    def __call__(self, small: np.ndarray) -> np.ndarray:
        """Upsample an ``(H, W, 3)`` uint8 image to ``(2H, 2W, 3)`` uint8."""
        import torch
        from torch.nn import functional as F

        with torch.no_grad():
            x = torch.from_numpy(np.array(small, dtype=np.uint8)).permute(2, 0, 1)[None].float() / 255.0
            base = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            residual = torch.tanh(self.out(torch.relu(self.up(x))))
            y = (base + self.amplitude * residual).clamp(0, 1)
        return (y[0].permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)


def _photos() -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(photo_bytes(name))).convert("RGB")) for name in PHOTOS]


def _random_crop(photos: list[np.ndarray], rng: np.random.Generator, side: int) -> np.ndarray:
    photo = Image.fromarray(photos[int(rng.integers(len(photos)))])
    scale = rng.uniform(0.5, 1.0)
    photo = photo.resize((int(photo.width * scale), int(photo.height * scale)), Image.BILINEAR)
    pixels = np.asarray(photo)
    top = int(rng.integers(pixels.shape[0] - side))
    left = int(rng.integers(pixels.shape[1] - side))
    return pixels[top : top + side, left : left + side]


def write_labelled_corpus(root: str, per_class: int = 300, seed: int = 0) -> dict[str, int]:
    """Write ``real/`` and ``ai/`` PNGs (64×64) plus a few broken files; returns counts per class folder.

    Real images are random crops of the bundled photos at random scales.
    "AI" images are other crops, halved in size and passed through
    :class:`StandInGenerator`. Both classes are PNG of the same size, and
    file names carry no label, so only pixels tell them apart.
    """
    rng = np.random.default_rng(seed)
    photos = _photos()
    generator = StandInGenerator(seed)
    written = {"real": 0, "ai": 0}
    for label in ("real", "ai"):
        os.makedirs(os.path.join(root, label), exist_ok=True)
    for i in range(per_class):
        crop = _random_crop(photos, rng, DEMO_SIDE)
        Image.fromarray(crop).save(os.path.join(root, "real", f"img_{2 * i:05d}.png"))
        source = _random_crop(photos, rng, DEMO_SIDE)
        small = np.asarray(Image.fromarray(source).resize((DEMO_SIDE // 2, DEMO_SIDE // 2), Image.BILINEAR))
        Image.fromarray(generator(small)).save(os.path.join(root, "ai", f"img_{2 * i + 1:05d}.png"))
        written["real"] += 1
        written["ai"] += 1
    rocket = photo_bytes("rocket.jpg")
    broken = {
        "real/truncated.jpg": rocket[: len(rocket) // 3],
        "ai/zero_bytes.png": b"",
        "ai/notes.png": b"not a PNG\n",
    }
    for relative, data in broken.items():
        with open(os.path.join(root, relative), "wb") as handle:
            handle.write(data)
    return written


def run_demo(directory: str, epochs: int = 20) -> int:
    """Build the corpora, train, evaluate and scan; print where every result is."""
    import time

    started = time.monotonic()
    labelled = os.path.join(directory, "corpus", "labelled")
    dump = os.path.join(directory, "corpus", "dump")
    counts = write_labelled_corpus(labelled)
    dump_files = write_demo_corpus(dump)
    print(DEMO_BANNER, file=sys.stderr, flush=True)
    print(
        f"demo corpus: {counts['real']} real crops + {counts['ai']} stand-in generator images + 3 broken files "
        f"in {labelled}; {len(dump_files)} unlabelled files (some broken) in {dump}",
        flush=True,
    )
    train_out = os.path.join(directory, "train")
    trained = run_train(
        TrainConfig(
            dataset=labelled,
            out=train_out,
            arch=registry.SMALL_ARCH,
            init="none",
            epochs=epochs,
            patience=6,
            batch_size=32,
            overwrite=True,
        )
    )
    print(
        f"trained {registry.SMALL_ARCH} ({DEFAULT_TRAIN_POLICY}: random crops of native pixels, flip only, lr 1e-3): "
        f"kept epoch {trained.val_metrics['epoch']} of {len(trained.history)}, "
        f"val ROC-AUC {trained.val_metrics['roc_auc']:.3f}, threshold {trained.threshold:.3f}",
        flush=True,
    )
    eval_out = os.path.join(directory, "evaluation")
    evaluated = run_evaluate(
        EvalConfig(
            dataset=os.path.join(train_out, "splits.parquet"),
            checkpoint=trained.checkpoint,
            out=eval_out,
            perturb=("jpeg:90,50", "blur:1", "downscale:0.5"),
            overwrite=True,
        )
    )
    print(format_table(evaluated.metrics), flush=True)
    scan_out = os.path.join(directory, "scan")
    scanned = run_scan(
        ScanConfig(
            sources=(labelled, dump), out=scan_out, checkpoint=trained.checkpoint, all_files=True, overwrite=True
        )
    )
    print(closing_line(scanned.summary), flush=True)
    print(DEMO_BANNER, file=sys.stderr, flush=True)
    print(
        "\n".join(
            [
                f"demo finished in {time.monotonic() - started:.0f} s. Results:",
                f"  checkpoint:        {trained.checkpoint}  (history: {train_out}/history.png)",
                f"  splits + balance:  {train_out}/splits.parquet, {train_out}/dataset.json",
                f"  evaluation:        {eval_out}/metrics.json, plots in {eval_out}/plots/",
                f"  scan scores:       {scan_out}/scores/ (Parquet), report in {scan_out}/report/",
            ]
        ),
        flush=True,
    )
    return 0
