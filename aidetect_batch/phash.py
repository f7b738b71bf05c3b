"""PDQ perceptual hashes of decoded images, for near-duplicate (repost) grouping.

PDQ is Meta's open perceptual hash (ThreatExchange): 256 bits and a quality in 0-100. Two images
whose hashes differ in at most 31 bits are the same picture after re-encoding, resizing, a small crop
or an overlay; a hash of quality 49 or less (a flat or near-uniform image) matches too much and is
not used for grouping. The hash is computed by ``pdqhash`` (the reference C++ code) on the decoded
image, after EXIF orientation and before any preprocessing.

A hash is stored as 32 bytes: the reference's hexadecimal form as bytes (bit 255 first), so
``pdq.hex()`` is the string other PDQ tools print and exchange.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pdqhash
from PIL import Image

PDQ_BYTES = 32
MATCH_DISTANCE = 31
MIN_QUALITY = 50


@dataclasses.dataclass(frozen=True)
class Pdq:
    """One image's PDQ hash (32 bytes, bit 255 first) and its quality (0-100)."""

    hash: bytes
    quality: int


def pdq_of(image: Image.Image) -> Pdq:
    """The PDQ hash and quality of an RGB image."""
    bits, quality = pdqhash.compute(np.ascontiguousarray(np.asarray(image.convert("RGB"))))
    return Pdq(np.packbits(bits.astype(np.uint8)).tobytes(), int(quality))


def unpack(hashes: list[bytes]) -> np.ndarray:
    """Hashes as an ``(n, 32)`` uint8 array, the layout binary indexes take."""
    return np.frombuffer(b"".join(hashes), np.uint8).reshape(len(hashes), PDQ_BYTES)


def distance(a: bytes, b: bytes) -> int:
    """Hamming distance between two stored hashes."""
    return int(np.unpackbits(np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).sum())
