"""Named preprocess policies: RGB image → fixed-size uint8 array for the model.

The policy decides what the detector sees, and detectors depend on
high-frequency artifacts that resampling destroys, so the policy is explicit,
chosen per scan (``--preprocess``, default: the checkpoint's) and recorded on
every row.

- ``resize``: short side to 256 with bilinear, antialiased resampling, then a
  224 center crop: torchvision's ``Resize(256)`` + ``CenterCrop(224)``, the
  standard the published ResNet50 detectors were trained with.
- ``center-crop``: no resampling at all: the central 224×224 pixels of the
  original. Images smaller than 224 on a side are padded with black (zeros)
  equally on both sides (the odd pixel goes right/bottom), exactly like
  torchvision's ``CenterCrop`` on a small image.

Models with another input side (the 32×32 CIFAKE CNN) keep the same ratio:
``resize`` scales the short side to ``round(size * 256 / 224)`` and crops ``size``.

The output stays uint8 HWC: four times smaller than float32 on the way to the
Classifier, which normalises with the checkpoint's mean/std on its device.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from aidetect_batch import decode
from aidetect_batch.schema import Status

POLICIES = ("resize", "center-crop")
DEFAULT_POLICY = "resize"
CROP = 224
RESIZE_SHORT = 256


def resize_short_side(size: int = CROP) -> int:
    """Short side the ``resize`` policy scales to before cropping ``size``: 256 for 224."""
    return int(round(size * RESIZE_SHORT / CROP))


def needed_short_side(policy: str, size: int = CROP) -> int | None:
    """Short-side pixels the policy needs from the decoder; ``None`` means full resolution."""
    return resize_short_side(size) if policy == "resize" else None


def _resize_short(img: Image.Image, short: int) -> Image.Image:
    width, height = img.size
    if width <= height:
        size = (short, int(short * height / width))
    else:
        size = (int(short * width / height), short)
    if size == img.size:
        return img
    return img.resize(size, Image.BILINEAR)


def center_crop(arr: np.ndarray, size: int = CROP) -> np.ndarray:
    """Central ``size``×``size`` crop of an HWC array, zero-padded like torchvision if smaller."""
    height, width = arr.shape[:2]
    if height < size or width < size:
        pad_h, pad_w = max(size - height, 0), max(size - width, 0)
        arr = np.pad(arr, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        height, width = arr.shape[:2]
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return np.ascontiguousarray(arr[top : top + size, left : left + size])


def preprocess_image(img: Image.Image, policy: str, size: int = CROP) -> np.ndarray:
    """Apply ``policy`` to an RGB image; returns a ``(size, size, 3)`` uint8 array."""
    if policy == "resize":
        img = _resize_short(img, resize_short_side(size))
    elif policy != "center-crop":
        raise ValueError(f"unknown preprocess policy {policy!r}; choose one of {POLICIES}")
    return center_crop(np.asarray(img, dtype=np.uint8), size)


def decode_and_preprocess(
    data: bytes, policy: str, max_pixels: int, *, size: int = CROP, change: Any = None
) -> tuple[Any, np.ndarray | None]:
    """Decode one file's bytes and apply ``policy``: the CPU path of both the decode stage and ``--gpu-decode``.

    Returns the :class:`aidetect_batch.decode.Decoded` result and the
    ``(size, size, 3)`` uint8 array (``None`` unless the status is ok).
    ``change`` is a robustness perturbation applied at full resolution.
    """

    result = decode.decode_image(data, max_pixels, None if change else needed_short_side(policy, size))
    if result.status is not Status.OK:
        return result, None
    image = change.apply(result.image) if change else result.image
    return result, preprocess_image(image, policy, size)
