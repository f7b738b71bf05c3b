"""Robustness perturbations: parsing, and that each one changes the image the way its name says."""

import numpy as np
import pytest
from helpers import photo

from aidetect_batch.media import perturb


def test_parse_sweep_expands_value_lists():
    names = [p.name for p in perturb.parse_sweep(["jpeg:95,75", "blur:1,2", "downscale:0.5"])]
    assert names == ["jpeg:95", "jpeg:75", "blur:1", "blur:2", "downscale:0.5"]


@pytest.mark.parametrize("spec", ["jpeg:101", "jpeg:7.5", "blur:0", "downscale:1.5", "sharpen:2", "jpeg:", "blur:x"])
def test_bad_specs_name_the_problem(spec):
    with pytest.raises(ValueError, match="perturbation"):
        perturb.parse(spec)


def high_frequency(img) -> float:
    arr = np.asarray(img.convert("L"), dtype=np.float64)
    return float(np.abs(np.diff(arr, axis=1)).mean())


def test_each_perturbation_changes_the_image_as_named():
    img = photo(200, 150, seed=1)
    assert perturb.parse("downscale:0.5").apply(img).size == (100, 75)
    assert high_frequency(perturb.parse("blur:2").apply(img)) < 0.5 * high_frequency(img)
    strong = np.asarray(perturb.parse("jpeg:30").apply(img), dtype=np.int16)
    mild = np.asarray(perturb.parse("jpeg:95").apply(img), dtype=np.int16)
    original = np.asarray(img, dtype=np.int16)
    assert np.abs(strong - original).mean() > np.abs(mild - original).mean() > 0
