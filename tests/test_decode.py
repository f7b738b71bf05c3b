import io

import numpy as np
import pytest
from helpers import CORPUS, encode, exif_rotated_jpeg, photo
from PIL import Image

from aidetect_batch.bench.demo import png_header_only
from aidetect_batch.detectors.policies import preprocess_image
from aidetect_batch.media.decode import decode_image, sniff, to_rgb
from aidetect_batch.schema import Status

MAX = 89_478_485


@pytest.mark.parametrize("relative,factory,expected", CORPUS, ids=[c[0] for c in CORPUS])
def test_every_corpus_kind_gets_its_status(relative, factory, expected):
    result = decode_image(factory(), MAX)
    assert result.status is expected, result.error
    if expected is Status.OK:
        assert result.error is None
        assert result.image.mode == "RGB"
        assert result.image.size == (result.width, result.height)
    else:
        assert result.image is None and result.error


def test_exif_orientation_is_applied():
    result = decode_image(exif_rotated_jpeg(), MAX)
    assert result.status is Status.OK
    assert (result.width, result.height) == (32, 64)
    assert result.image.size == (32, 64)
    upright = Image.open(io.BytesIO(exif_rotated_jpeg())).convert("RGB").transpose(Image.Transpose.ROTATE_270)
    diff = np.abs(np.asarray(result.image, dtype=int) - np.asarray(upright, dtype=int)).mean()
    assert diff < 1.0


def test_sixteen_bit_is_scaled_not_clipped():
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    rgb = np.asarray(to_rgb(Image.fromarray(arr)))
    assert rgb[0, :, 0].tolist() == [0, 128, 255]


def test_transparency_is_composited_on_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    img.putpixel((0, 0), (0, 0, 255, 255))
    rgb = np.asarray(to_rgb(img))
    assert rgb[1, 1].tolist() == [255, 255, 255]
    assert rgb[0, 0].tolist() == [0, 0, 255]
    palette = Image.open(io.BytesIO(encode(img.convert("P"), "PNG", transparency=0)))
    assert to_rgb(palette).mode == "RGB"


def test_cmyk_becomes_rgb_close_to_original():
    original = photo(64, 64, seed=1)
    result = decode_image(encode(original.convert("CMYK"), "JPEG", quality=95), MAX)
    assert result.status is Status.OK and result.mode == "CMYK"
    assert np.abs(np.asarray(result.image, dtype=int) - np.asarray(original, dtype=int)).mean() < 8


def test_animation_takes_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((250, 0, 0), (0, 250, 0))]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    result = decode_image(data, MAX)
    assert result.status is Status.OK
    assert np.asarray(result.image)[8, 8].tolist() == [250, 0, 0]


def test_bomb_guard_rejects_before_decoding_pixels():
    # The file holds almost no pixel data: had the decoder run, the status would be truncated.
    result = decode_image(png_header_only(12_000, 12_000), max_pixels=1_000_000)
    assert result.status is Status.TOO_LARGE
    assert (result.width, result.height) == (12_000, 12_000)
    assert "max_pixels=1000000" in result.error


def test_beyond_pillows_hard_limit_is_too_large_too():
    result = decode_image(png_header_only(60_000, 60_000), max_pixels=MAX)
    assert result.status is Status.TOO_LARGE
    assert "max_pixels" in result.error


def test_max_pixels_is_configurable():
    data = encode(photo(100, 100), "PNG")
    assert decode_image(data, max_pixels=9_999).status is Status.TOO_LARGE
    assert decode_image(data, max_pixels=10_000).status is Status.OK


def test_truncated_is_recorded_with_metadata():
    data = encode(photo(400, 300), "JPEG")[:3000]
    result = decode_image(data, MAX)
    assert result.status is Status.TRUNCATED
    assert (result.format, result.width, result.height) == ("JPEG", 400, 300)


@pytest.mark.parametrize(
    "data,needle",
    [
        (b"%PDF-1.7\n...", "PDF"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "SVG"),
        (b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00", "MP4"),
    ],
)
def test_known_media_are_unsupported_with_a_name(data, needle):
    assert needle in sniff(data)
    result = decode_image(data, MAX)
    assert result.status is Status.UNSUPPORTED and needle in result.error


def test_draft_mode_matches_full_decode_closely():
    big = encode(photo(2048, 1536, seed=2), "JPEG", quality=92)
    fast = decode_image(big, MAX, min_short_side=256)
    full = decode_image(big, MAX)
    assert fast.image.size[1] < full.image.size[1]
    assert (fast.width, fast.height) == (full.width, full.height) == (2048, 1536)
    a = preprocess_image(fast.image, "resize").astype(float)
    b = preprocess_image(full.image, "resize").astype(float)
    assert np.abs(a - b).mean() < 2.0
