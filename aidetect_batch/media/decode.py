"""Bytes → RGB image plus metadata, on CPU workers. Never raises on data.

Every failure becomes a :class:`~aidetect_batch.schema.Status` and a short
error string. The decoder:

- rejects images whose header announces more than ``max_pixels`` *before*
  decoding any pixel data (decompression-bomb guard);
- records truncated files as ``truncated`` instead of padding them with grey
  (Pillow's global ``LOAD_TRUNCATED_IMAGES`` is left off);
- applies EXIF orientation; takes the first frame of animations and the primary image of a HEIF;
- converts every mode to RGB: alpha is composited on white (how a browser on a
  white page shows it), 16/32-bit integer images are scaled to 8 bits rather
  than clipped, CMYK goes through Pillow's conversion;
- uses JPEG draft mode (DCT-domain downscaling by 1/2, 1/4 or 1/8) when the
  caller says how many pixels on the short side it needs, keeping at least
  twice that many so the later antialiased resize dominates the result.
"""

from __future__ import annotations

import dataclasses
import io
import warnings

import numpy as np
import pillow_heif
from PIL import Image, ImageOps, UnidentifiedImageError

from aidetect_batch.schema import Status

# HEIC/HEIF through libheif: 10-bit images arrive as 8-bit RGB, the HEIF transforms (the phone's
# orientation) are applied by libheif, which then reports EXIF orientation 1 so it is not applied twice.
# One thread per decode: a decode task holds one CPU, and the parallelism is across tasks.
pillow_heif.options.DECODE_THREADS = 1
pillow_heif.register_heif_opener()

_ORIENTATION_TAG = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)
DRAFT_OVERSAMPLE = 2

# Magic bytes of media that Pillow cannot decode here, so the row says what the file is.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "PDF document"),
    (b"<svg", "SVG vector image"),
    (b"\x1aE\xdf\xa3", "Matroska/WebM video"),
)
_FTYP_BRANDS = {
    b"heic": "HEIC image",
    b"heix": "HEIC image",
    b"mif1": "HEIF image",
    b"msf1": "HEIF image sequence",
    b"avif": "AVIF image",
    b"avis": "AVIF image sequence",
    b"isom": "MP4 video",
    b"mp41": "MP4 video",
    b"mp42": "MP4 video",
    b"qt  ": "QuickTime video",
    b"M4V ": "MP4 video",
}

# Sniffed kinds that do have a decoder here (pillow-heif, Pillow's AVIF): failing to open one is corruption.
DECODABLE_KINDS = frozenset(("HEIC image", "HEIF image", "HEIF image sequence", "AVIF image", "AVIF image sequence"))
# How Pillow and libheif say that the data ends early.
_TRUNCATION_WORDS = ("truncat", "end of file")


@dataclasses.dataclass
class Decoded:
    """Result of decoding one file. ``image`` is an RGB PIL image when ``status`` is OK."""

    status: Status
    error: str | None = None
    image: Image.Image | None = None
    format: str | None = None
    mode: str | None = None
    width: int | None = None
    height: int | None = None


def sniff(data: bytes) -> str | None:
    """Name a known non-decodable media type from its magic bytes, or ``None``."""
    head = data[:64]
    if head[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(head[8:12], "ISO media file")
    for magic, name in _SIGNATURES:
        if head.startswith(magic):
            return name
    stripped = head.lstrip()
    if stripped.startswith(b"<?xml") and b"<svg" in data[:1024]:
        return "SVG vector image"
    return None


def _looks_like_text(data: bytes) -> bool:
    sample = data[:512]
    if not sample:
        return False
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c >= 9 for c in sample)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without clipping high-bit-depth data."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        arr = np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    elif mode == "1":
        img = img.convert("L")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")


def _draft(img: Image.Image, min_short_side: int) -> None:
    width, height = img.size
    short = min(width, height)
    keep = min_short_side * DRAFT_OVERSAMPLE
    if short <= keep:
        return
    scale = keep / short
    img.draft("RGB", (max(1, int(width * scale)), max(1, int(height * scale))))


def _failure(exc: BaseException) -> Decoded:
    message = f"{type(exc).__name__}: {exc}"[:300]
    if isinstance(exc, EOFError) or any(word in message.lower() for word in _TRUNCATION_WORDS):
        return Decoded(Status.TRUNCATED, message)
    return Decoded(Status.UNDECODABLE, message)


def decode_image(data: bytes, max_pixels: int, min_short_side: int | None = None) -> Decoded:
    """Decode ``data`` into an RGB image.

    Args:
        data: The whole file.
        max_pixels: Reject images whose header announces more pixels than this.
        min_short_side: Pixels the preprocess policy needs on the short side; enables
            JPEG draft mode. ``None`` decodes at full resolution.
    """
    if not data:
        return Decoded(Status.EMPTY, "file has zero bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            return Decoded(Status.TOO_LARGE, f"{exc} (Pillow's hard limit; max_pixels={max_pixels})"[:300])
        except UnidentifiedImageError:
            kind = sniff(data)
            if kind in DECODABLE_KINDS:
                return Decoded(Status.UNDECODABLE, f"{kind} that the decoder could not open (corrupt or truncated)")
            if kind:
                return Decoded(Status.UNSUPPORTED, f"{kind} (no decoder for it here)")
            what = "text, not an image" if _looks_like_text(data) else "not a recognised image format"
            return Decoded(Status.UNDECODABLE, what)
        except Exception as exc:  # noqa: BLE001 - Pillow's plugins raise many types on malformed headers
            return _failure(exc)

        fmt, mode = img.format, img.mode
        width, height = img.size
        if width * height > max_pixels:
            return Decoded(
                Status.TOO_LARGE,
                f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}",
                format=fmt,
                mode=mode,
                width=width,
                height=height,
            )
        try:
            orientation = img.getexif().get(_ORIENTATION_TAG, 1)
        except Exception:  # noqa: BLE001 - a broken EXIF block must not cost the image
            orientation = 1
        if orientation in _TRANSPOSED_ORIENTATIONS:
            width, height = height, width
        meta = {"format": fmt, "mode": mode, "width": width, "height": height}
        try:
            if min_short_side and fmt == "JPEG":
                _draft(img, min_short_side)
            img.load()
            if orientation != 1:
                try:
                    img = ImageOps.exif_transpose(img)
                except Exception:  # noqa: BLE001 - keep the pixels even if the EXIF block is bad
                    pass
            rgb = to_rgb(img)
        except Exception as exc:  # noqa: BLE001 - decoders raise many types on corrupt data
            failed = _failure(exc)
            return dataclasses.replace(failed, **meta)
    return Decoded(Status.OK, None, rgb, **meta)
