"""Named preprocess policies: what part of a decoded RGB image the model sees, as uint8 pixels.

The policy decides what the detector sees, and detectors depend on
high-frequency artifacts that resampling destroys, so the policy is explicit,
chosen per scan (``--preprocess``, default: the checkpoint's) and recorded on
every row, with the share of the image's pixels it showed the model
(``coverage``).

- ``resize``: short side to 256 with bilinear, antialiased resampling, then a
  224 center crop: torchvision's ``Resize(256)`` + ``CenterCrop(224)``. An
  image whose short side is already 256 or less is never resampled: it is
  center-cropped (and padded) as it is.
- ``center-crop``: no resampling at all: the central 224×224 pixels of the
  original. Images smaller than 224 on a side are padded with black (zeros)
  equally on both sides (the odd pixel goes right/bottom), exactly like
  torchvision's ``CenterCrop`` on a small image.
- ``tiles``: non-overlapping ``size``×``size`` tiles on a grid that covers the
  image, which is padded like ``center-crop`` to a whole number of tiles. At
  most ``max_tiles`` are kept, on rows and columns spread evenly over the grid.
- ``native``: the whole image as decoded, no resampling (CNNDetection's and
  Corvi et al.'s protocol). An image above ``native_max_pixels`` is
  center-cropped to that area with its aspect ratio, never resized.

Models with another input side (the 32×32 CIFAKE CNN) keep the same ratio:
``resize`` scales the short side to ``round(size * 256 / 224)`` and crops ``size``.

The output stays uint8 HWC: four times smaller than float32 on the way to the
Classifier, which normalises with the checkpoint's mean/std on its device.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from aidetect_batch.detectors import registry
from aidetect_batch.errors import ConfigError
from aidetect_batch.media import decode
from aidetect_batch.schema import Status

DEFAULT_POLICY = "resize"
# Training draws random crops of native pixels unless told otherwise (``train --preprocess``).
DEFAULT_TRAIN_POLICY = "center-crop"
CROP = 224
RESIZE_SHORT = 256
# ResNet50's forward pass on CPU peaks at about 200 MB per megapixel of input (BENCHMARKS.md), so
# 2048×2048 keeps one image under 1 GB while still showing the model a third of a 12 MP photo.
DEFAULT_NATIVE_MAX_PIXELS = 2048 * 2048
DEFAULT_MAX_TILES = 16
# Views of any size (``native``) are batched by bytes: a batch holds at most this many bytes of the
# largest allowed image, so a batch of 12 MP photos cannot swamp a decode task or a Classifier actor.
ANY_SIZE_BATCH_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True)
class Framing:
    """How the ``tiles`` and ``native`` policies frame an image; the fixed policies ignore it."""

    native_max_pixels: int = DEFAULT_NATIVE_MAX_PIXELS
    max_tiles: int = DEFAULT_MAX_TILES


@dataclasses.dataclass(frozen=True)
class View:
    """What the model sees of one image.

    Attributes:
        pixels: uint8: ``(size, size, 3)`` for ``resize``/``center-crop``, ``(n, size, size, 3)`` tiles,
            or ``(H, W, 3)`` for ``native``.
        coverage: The share of the decoded image's pixels in ``pixels``.
    """

    pixels: np.ndarray
    coverage: float


def resize_short_side(size: int = CROP) -> int:
    """Short side the ``resize`` policy scales to before cropping ``size``: 256 for 224."""
    return int(round(size * RESIZE_SHORT / CROP))


def _resize_short(img: Image.Image, size: int) -> Image.Image:
    """Scale the short side down to ``resize``'s target for ``size``; a smaller image is returned as it is."""
    height, width = resized_size(img.size[1], img.size[0], size)
    if (width, height) == img.size:
        return img
    return img.resize((width, height), Image.BILINEAR)


def center_crop(arr: np.ndarray, size: int = CROP, width: int | None = None) -> np.ndarray:
    """Central ``size``×``width`` (default square) crop of an HWC array, zero-padded like torchvision if smaller."""
    out_h, out_w = size, size if width is None else width
    height, in_w = arr.shape[:2]
    if height < out_h or in_w < out_w:
        pad_h, pad_w = max(out_h - height, 0), max(out_w - in_w, 0)
        arr = np.pad(arr, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        height, in_w = arr.shape[:2]
    top = int(round((height - out_h) / 2.0))
    left = int(round((in_w - out_w) / 2.0))
    return np.ascontiguousarray(arr[top : top + out_h, left : left + out_w])


def _shown(height: int, width: int, size: int) -> float:
    """The share of a ``height``×``width`` image inside its central ``size``×``size`` window."""
    return min(height, size) * min(width, size) / (height * width)


def resized_size(height: int, width: int, size: int = CROP) -> tuple[int, int]:
    """``(height, width)`` after ``resize`` scales the short side down to its target (never up)."""
    short = resize_short_side(size)
    if min(height, width) <= short:
        return height, width
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def native_shape(height: int, width: int, max_pixels: int = DEFAULT_NATIVE_MAX_PIXELS) -> tuple[int, int]:
    """``(height, width)`` of the ``native`` view: the image's, or the largest central crop with its aspect
    ratio and at most ``max_pixels``."""
    if height * width <= max_pixels:
        return height, width
    scale = math.sqrt(max_pixels / (height * width))
    return max(1, int(height * scale)), max(1, int(width * scale))


def native_view(arr: np.ndarray, max_pixels: int = DEFAULT_NATIVE_MAX_PIXELS) -> View:
    """The whole image, or its central crop of at most ``max_pixels`` with the same aspect ratio."""
    height, width = arr.shape[:2]
    crop_h, crop_w = native_shape(height, width, max_pixels)
    if (crop_h, crop_w) == (height, width):
        return View(np.ascontiguousarray(arr), 1.0)
    return View(center_crop(arr, crop_h, crop_w), crop_h * crop_w / (height * width))


def tile_grid(height: int, width: int, size: int, max_tiles: int) -> tuple[list[int], list[int]]:
    """The grid rows and columns kept: all of them, or evenly spread ones when there are more than ``max_tiles``."""
    rows, cols = math.ceil(height / size), math.ceil(width / size)
    if rows * cols <= max_tiles:
        return list(range(rows)), list(range(cols))
    keep_rows = max(1, min(rows, round(math.sqrt(max_tiles * rows / cols))))
    keep_cols = max(1, min(cols, max_tiles // keep_rows))
    return _spread(rows, keep_rows), _spread(cols, keep_cols)


def _spread(n: int, k: int) -> list[int]:
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, k)})


def tiles_view(arr: np.ndarray, size: int = CROP, max_tiles: int = DEFAULT_MAX_TILES) -> View:
    """Non-overlapping ``size`` tiles of the image padded to whole tiles (as ``center-crop`` pads)."""
    height, width = arr.shape[:2]
    rows, cols = tile_grid(height, width, size, max_tiles)
    grid_h, grid_w = math.ceil(height / size) * size, math.ceil(width / size) * size
    padded = center_crop(arr, grid_h, grid_w)
    top, left = (grid_h - height) // 2, (grid_w - width) // 2
    tiles, seen = [], 0
    for r in rows:
        for c in cols:
            tiles.append(padded[r * size : (r + 1) * size, c * size : (c + 1) * size])
            seen += _overlap(r * size - top, height, size) * _overlap(c * size - left, width, size)
    return View(np.stack(tiles), seen / (height * width))


def _overlap(start: int, length: int, size: int) -> int:
    return max(0, min(start + size, length) - max(start, 0))


class ViewShape(enum.Enum):
    """The shape of the pixels a policy hands the model for one image."""

    SQUARE = "square"  # one ``size``×``size`` view: a batch stacks into one tensor
    TILES = "tiles"  # ``(n, size, size, 3)``: a stack of fixed-size tiles
    ANY = "any"  # ``(H, W, 3)``: the image's own shape


def _frame_resize(img: Image.Image, size: int, framing: Framing) -> View:
    coverage = _shown(*resized_size(img.size[1], img.size[0], size), size)
    return View(center_crop(np.asarray(_resize_short(img, size), dtype=np.uint8), size), coverage)


def _frame_center_crop(img: Image.Image, size: int, framing: Framing) -> View:
    return View(center_crop(np.asarray(img, dtype=np.uint8), size), _shown(img.size[1], img.size[0], size))


def _frame_tiles(img: Image.Image, size: int, framing: Framing) -> View:
    return tiles_view(np.asarray(img, dtype=np.uint8), size, framing.max_tiles)


def _frame_native(img: Image.Image, size: int, framing: Framing) -> View:
    return native_view(np.asarray(img, dtype=np.uint8), framing.native_max_pixels)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Everything the pipeline needs to know about one preprocess policy.

    Attributes:
        name: The ``--preprocess`` value recorded on every row.
        frame: ``frame(rgb_image, size, framing)`` returns the :class:`View` the model sees.
        view: The shape of that view; it decides how views batch and which Classifier path scores them.
        resamples: The pixels are resampled (which erases the traces detectors read).
        draft: Decode may downscale to :func:`resize_short_side` (JPEG draft mode); otherwise decode
            keeps full resolution.
        needs_any_size: Only a network that pools globally can score its views.
        framing_fields: The :class:`Framing` fields it reads; a scan's identity records them.
        train_view: The fixed-size policy whose view training decodes: the view itself when the policy
            resamples, otherwise the central window of native pixels that random crops are drawn from.
    """

    name: str
    frame: Callable[[Image.Image, int, Framing], View]
    view: ViewShape
    resamples: bool = False
    draft: bool = False
    needs_any_size: bool = False
    framing_fields: tuple[str, ...] = ()
    train_view: str = "center-crop"

    @property
    def fixed(self) -> bool:
        """Every image becomes one ``size``×``size`` view, so views stack into one tensor."""
        return self.view is ViewShape.SQUARE

    def decode_short_side(self, size: int = CROP) -> int | None:
        """Short-side pixels this policy needs from the decoder; ``None`` means full resolution."""
        return resize_short_side(size) if self.draft else None

    def coverage(self, height: int, width: int, size: int = CROP) -> float:
        """The share of a ``height``×``width`` image a fixed-size view shows the model."""
        if self.resamples:
            height, width = resized_size(height, width, size)
        return _shown(height, width, size)

    def batch_rows(self, rows: int, framing: Framing) -> int:
        """Rows per batch: fixed-size views (and bounded tile stacks) batch freely; views of any size by
        :data:`ANY_SIZE_BATCH_BYTES` of the largest image ``framing`` allows."""
        if self.view is not ViewShape.ANY:
            return rows
        return max(1, min(rows, ANY_SIZE_BATCH_BYTES // (framing.native_max_pixels * 3)))


_RECORDS = (
    Policy("resize", _frame_resize, ViewShape.SQUARE, resamples=True, draft=True, train_view="resize"),
    Policy("center-crop", _frame_center_crop, ViewShape.SQUARE),
    Policy("tiles", _frame_tiles, ViewShape.TILES, framing_fields=("max_tiles",)),
    Policy("native", _frame_native, ViewShape.ANY, needs_any_size=True, framing_fields=("native_max_pixels",)),
)
_BY_NAME = {policy.name: policy for policy in _RECORDS}
POLICIES = tuple(_BY_NAME)
FIXED_POLICIES = tuple(p.name for p in _RECORDS if p.fixed)


def get(name: str) -> Policy:
    """The record of policy ``name``; raises ``ValueError`` naming the choices."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown preprocess policy {name!r}; choose one of {', '.join(POLICIES)}") from None


def needed_short_side(policy: str, size: int = CROP) -> int | None:
    """Short-side pixels the policy needs from the decoder; ``None`` means full resolution."""
    return get(policy).decode_short_side(size)


def fixed_coverage(policy: str, height: int, width: int, size: int = CROP) -> float:
    """The share of an image a ``resize`` or ``center-crop`` view shows the model."""
    return get(policy).coverage(height, width, size)


def view_of(img: Image.Image, policy: str, size: int = CROP, framing: Framing | None = None) -> View:
    """Apply ``policy`` to an RGB image: the pixels the model sees and the share of the image they are."""
    return get(policy).frame(img, size, framing or Framing())


def preprocess_image(img: Image.Image, policy: str, size: int = CROP, framing: Framing | None = None) -> np.ndarray:
    """Apply ``policy`` to an RGB image; returns its uint8 pixels (a ``(size, size, 3)`` array for
    ``resize`` and ``center-crop``)."""
    return view_of(img, policy, size, framing).pixels


def decode_and_preprocess(
    data: bytes,
    policy: str,
    max_pixels: int,
    *,
    size: int = CROP,
    change: Any = None,
    framing: Framing | None = None,
) -> tuple[Any, View | None]:
    """Decode one file's bytes and apply ``policy``: the CPU path of the decode stage, ``--gpu-decode``
    and the upload page.

    Returns the :class:`aidetect_batch.media.decode.Decoded` result and the :class:`View`
    (``None`` unless the status is ok). ``change`` is a robustness perturbation applied at full resolution.
    """

    result = decode.decode_image(data, max_pixels, None if change else needed_short_side(policy, size))
    if result.status is not Status.OK:
        return result, None
    image = change.apply(result.image) if change else result.image
    return result, view_of(image, policy, size, framing)


def check_policy(policy: str, arch: str | None, *, gpu_decode: bool = False) -> None:
    """Refuse a policy the model or the decode path cannot serve; raises :class:`ConfigError`."""
    try:
        record = get(policy)
    except ValueError as exc:
        raise ConfigError(f"--preprocess: {exc}") from None
    if record.needs_any_size and arch in registry.REGISTRY and not registry.get(arch).any_size:
        raise ConfigError(
            f"--preprocess {policy} needs a network that pools globally; {arch} takes only its input size: "
            "use tiles (native pixels, fixed-size views)"
        )
    if gpu_decode and not record.fixed:
        raise ConfigError(f"--gpu-decode produces {' or '.join(FIXED_POLICIES)} views; {policy} is decoded on the CPU")
