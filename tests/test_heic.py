"""Phone formats decode like every other: HEIC/HEIF through pillow-heif, AVIF through Pillow.

Each file is encoded here from a crop of a bundled photograph (scikit-image's, CC0 / public domain, see
aidetect_batch/bench/demo_data/LICENSES.md) and compared with the same pixels, within the lossy codec's
tolerance; the wrong answer (no rotation, the other frame) is far outside it.
"""

from __future__ import annotations

import io

import numpy as np
import pillow_heif
import pytest
from helpers import encode, photo
from PIL import Image

from aidetect_batch.bench.demo import PHOTOS, photo_bytes
from aidetect_batch.media.decode import decode_image
from aidetect_batch.schema import Status

MAX = 89_478_485
# Mean absolute error of a quality-95 lossy encode of the test photo, in grey levels; measured 0.4-1.5.
TOLERANCE = 3.0


def picture(seed: int, size: tuple[int, int] = (300, 200)) -> Image.Image:
    """A crop of a real photograph: lossy phone codecs are tuned for these, not for synthetic noise."""
    full = Image.open(io.BytesIO(photo_bytes(PHOTOS[seed % len(PHOTOS)]))).convert("RGB")
    left = (seed * 37) % (full.width - size[0])
    return full.crop((left, 0, left + size[0], size[1]))


def _error(decoded: Image.Image, reference: Image.Image) -> float:
    return float(np.abs(np.asarray(decoded, dtype=float) - np.asarray(reference, dtype=float)).mean())


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_phone_formats_decode_ok_and_match_their_pixels(fmt):
    original = picture(1)
    png = Image.open(io.BytesIO(encode(original, "PNG")))
    result = decode_image(encode(original, fmt, quality=95), MAX)
    assert result.status is Status.OK, result.error
    assert result.format == fmt and (result.width, result.height) == (300, 200)
    assert _error(result.image, png) < TOLERANCE


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_exif_orientation_is_applied_once(fmt):
    original = picture(2)
    exif = Image.Exif()
    exif[0x0112] = 6
    result = decode_image(encode(original, fmt, quality=95, exif=exif.tobytes()), MAX)
    assert result.status is Status.OK, result.error
    assert (result.width, result.height) == (200, 300) == result.image.size
    upright = original.transpose(Image.Transpose.ROTATE_270)
    assert _error(result.image, upright) < TOLERANCE
    assert _error(result.image, upright.transpose(Image.Transpose.ROTATE_180)) > 10 * TOLERANCE


def test_ten_bit_heic_becomes_eight_bit_without_clipping():
    original = np.asarray(picture(3)).astype(np.uint16)
    ten_bit = original * 4 + 2
    heif = pillow_heif.from_bytes(mode="RGB;16", size=(300, 200), data=(ten_bit << 6).tobytes())
    buffer = io.BytesIO()
    heif.save(buffer, quality=95)
    data = buffer.getvalue()
    assert pillow_heif.open_heif(data).info["bit_depth"] == 10
    result = decode_image(data, MAX)
    assert result.status is Status.OK, result.error
    assert result.image.mode == "RGB"
    assert _error(result.image, Image.fromarray(original.astype(np.uint8))) < TOLERANCE


def test_heic_renamed_jpg_is_read_by_its_bytes(tmp_path):
    original = picture(4)
    path = tmp_path / "IMG_0001.jpg"
    path.write_bytes(encode(original, "HEIF", quality=95))
    result = decode_image(path.read_bytes(), MAX)
    assert result.status is Status.OK and result.format == "HEIF"
    assert _error(result.image, original) < TOLERANCE


def test_sequence_yields_its_first_image():
    first, second = picture(5), picture(6)
    buffer = io.BytesIO()
    first.save(buffer, "HEIF", quality=95, save_all=True, append_images=[second])
    assert len(pillow_heif.open_heif(buffer.getvalue())) == 2
    result = decode_image(buffer.getvalue(), MAX)
    assert result.status is Status.OK
    assert _error(result.image, first) < TOLERANCE < _error(result.image, second)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_broken_phone_files_are_failures_not_unsupported(fmt):
    data = encode(photo(seed=27), fmt)
    for cut in (len(data) // 2, 100):
        result = decode_image(data[:cut], MAX)
        assert result.status in (Status.TRUNCATED, Status.UNDECODABLE), result
        assert result.error


def test_header_pixel_guard_applies_to_heic():
    result = decode_image(encode(photo(300, 200, seed=28), "HEIF"), 300 * 200 - 1)
    assert result.status is Status.TOO_LARGE
    assert (result.width, result.height) == (300, 200)
