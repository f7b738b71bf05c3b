"""PDQ perceptual hashes of decoded images, for near-duplicate (repost) grouping.

PDQ is Meta's open perceptual hash (ThreatExchange): 256 bits and a quality in 0-100. Two images
whose hashes differ in at most 31 bits are the same picture after re-encoding, resizing, a small crop
or an overlay; a hash of quality 49 or less (a flat or near-uniform image) matches too much and is
not used for grouping. The hash is computed on the decoded image, after EXIF orientation and before
any preprocessing, as the published algorithm describes it: luminance; two passes of a box filter
ceil(side / 128) wide on each axis (the Jarosz tent filter); 64×64 samples at cell centres; the 16×16
DCT without its constant row; one bit per coefficient above their median. Quality is the luminance
gradient of the 64×64 samples. It is written here in numpy, bit for bit equal to the reference C++
(through ``pdqhash``, which the tests compare when it is installed) on every image tested, because
``pdqhash`` ships only as source and would make installing this package need a C++ compiler.

A hash is stored as 32 bytes: the reference's hexadecimal form as bytes (bit 255 first), so
``pdq.hex()`` is the string other PDQ tools print and exchange.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

PDQ_BYTES = 32
MATCH_DISTANCE = 31
MIN_QUALITY = 50


@dataclasses.dataclass(frozen=True)
class Pdq:
    """One image's PDQ hash (32 bytes, bit 255 first) and its quality (0-100)."""

    hash: bytes
    quality: int


_LUMA = np.array([0.299, 0.587, 0.114])
_DCT = math.sqrt(2 / 64) * np.cos(math.pi / 128 * np.arange(1, 17)[:, None] * (2 * np.arange(64)[None, :] + 1))


def pdq_of(image: Image.Image) -> Pdq:
    """The PDQ hash and quality of an image (converted to RGB)."""
    luma = np.asarray(image.convert("RGB"), dtype=np.float64) @ _LUMA
    height, width = luma.shape
    rows = ((np.arange(64) + 0.5) * height / 64).astype(np.int64)
    cols = ((np.arange(64) + 0.5) * width / 64).astype(np.int64)
    luma = _box(_box(luma, 1), 0)
    samples = _box(_box(luma, 1, keep=cols), 0, keep=rows)
    coefficients = _DCT @ samples @ _DCT.T
    bits = (coefficients > np.median(coefficients)).astype(np.uint8).ravel()[::-1]
    return Pdq(np.packbits(bits).tobytes(), _quality(samples))


def _box(a: np.ndarray, axis: int, keep: np.ndarray | None = None) -> np.ndarray:
    """Mean over a window of ceil(n / 128) samples along ``axis`` reaching (window - 1) // 2 back, clipped at the
    edges; only at the ``keep`` positions when given (the second pass needs only the sampled rows and columns)."""
    n = a.shape[axis]
    window = max(1, math.ceil(n / 128))
    back = (window - 1) // 2
    positions = np.arange(n) if keep is None else keep
    lo = np.clip(positions - back, 0, n)
    hi = np.clip(positions + window - back, 0, n)
    cumulative = np.insert(np.cumsum(a, axis=axis), 0, 0.0, axis=axis)
    shape = [1, 1]
    shape[axis] = len(positions)
    return (np.take(cumulative, hi, axis=axis) - np.take(cumulative, lo, axis=axis)) / (hi - lo).reshape(shape)


def _quality(samples: np.ndarray) -> int:
    """Sum of the neighbouring samples' differences in percent of full scale (each truncated), over 90, at most 100."""
    steps = [np.trunc(np.diff(samples, axis=axis) * 100 / 255) for axis in (0, 1)]
    return min(100, int(sum(np.abs(step).sum() for step in steps) // 90))


def unpack(hashes: list[bytes]) -> np.ndarray:
    """Hashes as an ``(n, 32)`` uint8 array, the layout binary indexes take."""
    return np.frombuffer(b"".join(hashes), np.uint8).reshape(len(hashes), PDQ_BYTES)


def distance(a: bytes, b: bytes) -> int:
    """Hamming distance between two stored hashes."""
    return int(np.unpackbits(np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).sum())
