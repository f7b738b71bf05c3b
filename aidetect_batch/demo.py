"""``aidetect-batch demo``: a small corpus of real photos and broken files, scanned end to end.

Runs offline on a local Ray instance. Until a trained checkpoint ships with
the project, the demo scans with a randomly initialised ResNet50 and says
loudly that its scores mean nothing: it shows the pipeline, not a verdict.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from importlib import resources

from PIL import Image

from aidetect_batch.schema import Status

PHOTOS = ("astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg", "camera.jpg")

UNTRAINED_BANNER = """
************************************************************************
*  DEMO CHECKPOINT IS UNTRAINED: randomly initialised ResNet50.        *
*  Its scores and ai/real labels MEAN NOTHING. The demo shows the      *
*  pipeline (listing, decoding, failures, Parquet output), not a       *
*  verdict. Scan with a trained detector: --checkpoint detector.pt     *
************************************************************************
"""


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
    return resources.files("aidetect_batch").joinpath("demo_data", name).read_bytes()


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


def write_untrained_checkpoint(path: str, arch: str = "resnet50", seed: int = 0) -> None:
    """Save a randomly initialised detector, flagged ``untrained`` so every scan warns."""
    import torch

    from aidetect_batch.model import build_model, save_checkpoint

    torch.manual_seed(seed)
    save_checkpoint(
        path,
        build_model(arch, 1),
        arch,
        info={"untrained": True, "note": "random weights for the demo; scores mean nothing"},
    )
