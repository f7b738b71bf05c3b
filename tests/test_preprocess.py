import numpy as np
import pytest
import torchvision.transforms as T
from helpers import photo
from PIL import Image

from aidetect_batch.detectors.policies import center_crop, needed_short_side, preprocess_image


def reference(img: Image.Image, policy: str) -> np.ndarray:
    """torchvision's Resize(256) + CenterCrop(224), where ``resize`` only ever scales down (issue 16)."""
    shrinks = policy == "resize" and min(img.size) > 256
    steps = [T.Resize(256), T.CenterCrop(224)] if shrinks else [T.CenterCrop(224)]
    return np.asarray(T.Compose(steps)(img))


@pytest.mark.parametrize("size", [(320, 240), (240, 320), (1000, 257), (300, 300), (100, 60), (1, 1), (223, 500)])
@pytest.mark.parametrize("policy", ["resize", "center-crop"])
def test_matches_torchvision_transforms_exactly(size, policy):
    img = photo(*size, seed=1)
    ours = preprocess_image(img, policy)
    assert ours.shape == (224, 224, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, reference(img, policy))


def test_center_crop_pads_small_images_with_black_centered():
    arr = np.full((100, 51, 3), 200, dtype=np.uint8)
    out = center_crop(arr)
    rows = np.where(out[:, 112, 0] == 200)[0]
    cols = np.where(out[112, :, 0] == 200)[0]
    assert (rows[0], rows[-1]) == (62, 161)
    assert (cols[0], cols[-1]) == (86, 136)
    assert out[0, 0].tolist() == [0, 0, 0]


def test_center_crop_policy_never_resamples():
    img = photo(500, 400, seed=2)
    arr = np.asarray(img)
    np.testing.assert_array_equal(preprocess_image(img, "center-crop"), arr[88:312, 138:362])


def test_only_resize_allows_draft_decoding():
    assert needed_short_side("resize") == 256
    assert needed_short_side("center-crop") is None


def test_unknown_policy_is_an_error():
    with pytest.raises(ValueError, match="unknown preprocess policy"):
        preprocess_image(photo(), "stretch")
