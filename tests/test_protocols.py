"""Keep the evidence: the ``native`` and ``tiles`` policies, and published detectors scored by their own protocol.

The golden checks compute each protocol directly with torchvision (``ToTensor`` + ``Normalize`` on the
whole image, CNNDetection's ``demo.py``; the same on a ResNet50 whose stem does not downsample, Corvi et
al.'s network; a plain loop over tiles) and compare them with what a scan writes.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
import torchvision.transforms as T
from helpers import animated, encode, exif_rotated_jpeg, photo, png_16bit, tiny_model
from PIL import Image

from aidetect_batch import schema
from aidetect_batch.detectors.checkpoints import build_model, parse_checkpoint
from aidetect_batch.detectors.policies import center_crop, native_view, tile_grid, tiles_view, view_of
from aidetect_batch.errors import ConfigError
from aidetect_batch.scan.classifier import Classifier, split_even
from aidetect_batch.scan.config import ScanConfig
from aidetect_batch.scan.runner import load_detector, run_scan

NORMALISE = T.Compose([T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])


def to_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def resnet50(nodown: bool = False, seed: int = 0) -> torch.nn.Module:
    """torchvision's ResNet50 with one logit; ``nodown``: stride 1 in conv1 and the stem max-pool."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet50(weights=None, num_classes=1)
    if nodown:
        model.conv1.stride = (1, 1)
        model.maxpool.stride = 1
    return model.eval()


def logit(model: torch.nn.Module, img: Image.Image) -> float:
    with torch.inference_mode():
        return float(model(NORMALISE(img)[None])[0, 0])


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def scan_rows(folder: str, out: str, checkpoint: str, **options) -> dict[str, dict]:
    run_scan(ScanConfig(sources=(folder,), out=out, checkpoint=checkpoint, **options))
    rows = pq.read_table(os.path.join(out, schema.SCORES_DIR)).to_pylist()
    return {os.path.basename(r[schema.PATH]): r for r in rows}


# ---- the views, without Ray ------------------------------------------------------------------------------


def test_native_view_is_the_whole_image_and_a_central_crop_of_the_area_above_the_cap():
    arr = np.asarray(photo(301, 203, seed=1))
    whole = native_view(arr, max_pixels=301 * 203)
    assert whole.coverage == 1.0
    np.testing.assert_array_equal(whole.pixels, arr)
    cropped = native_view(arr, max_pixels=20_000)
    height, width = cropped.pixels.shape[:2]
    assert height * width <= 20_000 and abs(width / height - 301 / 203) < 0.02
    assert cropped.coverage == pytest.approx(height * width / (301 * 203))
    expected = np.asarray(T.CenterCrop((height, width))(photo(301, 203, seed=1)))
    np.testing.assert_array_equal(cropped.pixels, expected)


def test_tiles_cover_the_image_padded_like_center_crop():
    img = photo(500, 300, seed=2)
    view = tiles_view(np.asarray(img), 224, max_tiles=16)
    assert view.pixels.shape == (6, 224, 224, 3) and view.coverage == 1.0
    grid = np.asarray(T.CenterCrop((448, 672))(img))
    for k, tile in enumerate(view.pixels):
        r, c = divmod(k, 3)
        np.testing.assert_array_equal(tile, grid[r * 224 : (r + 1) * 224, c * 224 : (c + 1) * 224])


def test_an_image_smaller_than_a_tile_is_one_tile_padded_as_center_crop():
    arr = np.asarray(photo(100, 60, seed=3))
    view = tiles_view(arr, 224)
    assert view.pixels.shape == (1, 224, 224, 3) and view.coverage == 1.0
    np.testing.assert_array_equal(view.pixels[0], center_crop(arr, 224))


def test_capped_tiles_are_spread_evenly_over_rows_and_columns():
    assert tile_grid(2240, 2240, 224, 16) == ([0, 3, 6, 9], [0, 3, 6, 9])
    assert tile_grid(300, 500, 224, 4) == ([0, 1], [0, 2])
    view = tiles_view(np.asarray(photo(2240, 2240, seed=4)), 224, max_tiles=16)
    assert view.pixels.shape[0] == 16 and view.coverage == pytest.approx(16 / 100)


def test_resize_never_resamples_an_image_at_or_below_its_target():
    img = photo(256, 300, seed=5)
    view = view_of(img, "resize")
    np.testing.assert_array_equal(view.pixels, center_crop(np.asarray(img), 224))
    assert view.coverage == pytest.approx(224 * 224 / (256 * 300))


def test_native_pieces_are_near_equal_and_at_most_the_tile_side():
    assert split_even(1536, 1024) == [(0, 768), (768, 1536)]
    assert split_even(1000, 1024) == [(0, 1000)]
    assert split_even(3001, 1024) == [(0, 1000), (1000, 2001), (2001, 3001)]


def test_tile_scores_equal_a_plain_loop_over_the_tiles():
    model = tiny_model(seed=3)
    clf = Classifier(to_bytes({"model": model.state_dict()}), arch="resnet_tiny", device="cpu")
    images = [photo(500, 300, seed=6), photo(90, 700, seed=7)]
    views = [tiles_view(np.asarray(img), 224, max_tiles=4).pixels for img in images]
    got = clf.score_views(views)
    for k, tiles in enumerate(views):
        z = [logit(model, Image.fromarray(t)) for t in tiles]
        assert got.parts[k] == len(tiles)
        assert got.score[k] == pytest.approx(sigmoid(float(np.mean(z))), abs=1e-5)
        assert got.score_max[k] == pytest.approx(sigmoid(max(z)), abs=1e-5)


def test_native_needs_a_network_that_pools_globally(tmp_path):
    path = str(tmp_path / "cifake.pt")
    torch.save(build_model("cifake_cnn", 1).state_dict(), path)
    with pytest.raises(ConfigError, match="pools globally"):
        load_detector(ScanConfig(sources=("x",), out="o", checkpoint=path, preprocess="native"))
    assert load_detector(ScanConfig(sources=("x",), out="o", checkpoint=path, preprocess="tiles")).policy == "tiles"
    with pytest.raises(ConfigError, match="gpu-decode"):
        ScanConfig(sources=("x",), out="o", checkpoint=path, preprocess="tiles", gpu_decode=True)


# ---- golden scans -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def odd_sizes(tmp_path_factory) -> str:
    """Photographs of odd and mixed sizes, one above a 20,000-pixel cap, scanned in one batch."""
    root = tmp_path_factory.mktemp("odd")
    for name, (w, h, seed) in {
        "a.png": (97, 131, 1),
        "b.png": (130, 96, 2),
        "c.png": (64, 64, 3),
        "d.png": (250, 180, 4),
    }.items():
        photo(w, h, seed=seed).save(root / name)
    return str(root)


def test_cnndetection_checkpoint_is_scored_like_its_demo(ray_cluster, odd_sizes, tmp_path):
    model = resnet50(seed=1)
    path = str(tmp_path / "blur_jpg_prob0.5.pth")
    torch.save({"model": model.state_dict()}, path)
    assert parse_checkpoint(open(path, "rb").read()).preprocess == "native"
    rows = scan_rows(odd_sizes, str(tmp_path / "out"), path, native_max_pixels=20_000)
    for name, row in rows.items():
        img = Image.open(os.path.join(odd_sizes, name)).convert("RGB")
        w, h = img.size
        if w * h > 20_000:
            scale = math.sqrt(20_000 / (w * h))
            img = T.CenterCrop((int(h * scale), int(w * scale)))(img)
            assert row[schema.COVERAGE] == pytest.approx(img.size[0] * img.size[1] / (w * h))
        else:
            assert row[schema.COVERAGE] == 1.0
        expected = sigmoid(logit(model, img))
        assert row[schema.PREPROCESS] == "native" and row[schema.N_TILES] == 1
        assert row[schema.SCORE] == pytest.approx(expected, abs=1e-4), name
        assert row[schema.SCORE_MAX] == pytest.approx(row[schema.SCORE], abs=1e-6)
    assert np.ptp([r[schema.SCORE] for r in rows.values()]) > 1e-4, "scores must differ to mean anything"


def test_resnet50_nodown_is_scored_at_full_resolution_with_large_images_in_pieces(ray_cluster, tmp_path):
    model = resnet50(nodown=True, seed=2)
    folder = tmp_path / "imgs"
    folder.mkdir()
    sizes = {"small.png": (45, 37), "wide.png": (1600, 24)}
    for k, (name, size) in enumerate(sizes.items()):
        photo(*size, seed=10 + k).save(folder / name)
    path = str(tmp_path / "model_epoch_best.pth")
    torch.save({"model": model.state_dict()}, path)
    rows = scan_rows(str(folder), str(tmp_path / "out"), path, arch="resnet50_nodown")
    small = Image.open(folder / "small.png").convert("RGB")
    assert rows["small.png"][schema.SCORE] == pytest.approx(sigmoid(logit(model, small)), abs=1e-4)
    wide = Image.open(folder / "wide.png").convert("RGB")
    z = [logit(model, wide.crop((0, 0, 800, 24))), logit(model, wide.crop((800, 0, 1600, 24)))]
    row = rows["wide.png"]
    assert row[schema.N_TILES] == 2, "a side above 1536 px goes in pieces of at most 1024"
    assert row[schema.SCORE] == pytest.approx(sigmoid(float(np.mean(z))), abs=1e-4)
    assert row[schema.SCORE_MAX] == pytest.approx(sigmoid(max(z)), abs=1e-4)
    with_default_stem = resnet50(seed=2)
    assert abs(sigmoid(logit(with_default_stem, small)) - rows["small.png"][schema.SCORE]) > 1e-4


def test_tiles_scan_equals_a_plain_loop_over_the_tiles(ray_cluster, tiny_checkpoint, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    photo(500, 300, seed=20).save(folder / "wide.png")
    photo(100, 60, seed=21).save(folder / "small.png")
    rows = scan_rows(str(folder), str(tmp_path / "out"), tiny_checkpoint, preprocess="tiles", max_tiles=4)
    model = parse_checkpoint(open(tiny_checkpoint, "rb").read()).build()
    grid = T.CenterCrop((448, 672))(Image.open(folder / "wide.png"))
    z = [logit(model, grid.crop((c * 224, r * 224, (c + 1) * 224, (r + 1) * 224))) for r in (0, 1) for c in (0, 2)]
    wide = rows["wide.png"]
    assert (wide[schema.PREPROCESS], wide[schema.N_TILES]) == ("tiles", 4)
    # the grid is padded 74 px top and 86 px left; the corner tiles hold 150 of 300 rows each and 138 of
    # 500 columns each
    assert wide[schema.COVERAGE] == pytest.approx(300 * 276 / (500 * 300))
    assert wide[schema.SCORE] == pytest.approx(sigmoid(float(np.mean(z))), abs=1e-4)
    assert wide[schema.SCORE_MAX] == pytest.approx(sigmoid(max(z)), abs=1e-4)
    small = Image.open(folder / "small.png")
    assert rows["small.png"][schema.SCORE] == pytest.approx(sigmoid(logit(model, T.CenterCrop(224)(small))), abs=1e-4)


@pytest.mark.parametrize("policy", ["native", "tiles"])
def test_every_decoded_mode_scores_under_native_and_tiles(ray_cluster, tiny_checkpoint, tmp_path, policy):
    folder = tmp_path / "modes"
    folder.mkdir()
    files = {
        "rgba.png": encode(photo(60, 50, seed=30).convert("RGBA"), "PNG"),
        "cmyk.jpg": encode(photo(70, 40, seed=31).convert("CMYK"), "JPEG"),
        "deep.png": png_16bit(),
        "moving.gif": animated("GIF"),
        "rotated.jpg": exif_rotated_jpeg(),
        "big.png": encode(photo(300, 260, seed=32), "PNG"),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    rows = scan_rows(str(folder), str(tmp_path / "out"), tiny_checkpoint, preprocess=policy, native_max_pixels=40_000)
    assert {r[schema.STATUS] for r in rows.values()} == {"ok"}
    assert all(0.0 <= r[schema.SCORE] <= 1.0 and r[schema.PREPROCESS] == policy for r in rows.values())
    assert rows["rotated.jpg"][schema.WIDTH] == 32, "EXIF rotation is applied before the view"
    if policy == "native":
        assert rows["big.png"][schema.COVERAGE] < 1.0 and rows["rgba.png"][schema.COVERAGE] == 1.0
    else:
        assert rows["big.png"][schema.N_TILES] == 4 and rows["cmyk.jpg"][schema.N_TILES] == 1


def test_resume_refuses_another_policy_tile_setting_or_provenance_check(ray_cluster, tiny_checkpoint, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    photo(300, 200, seed=40).save(folder / "a.png")
    out = str(tmp_path / "out")
    run_scan(ScanConfig(sources=(str(folder),), out=out, checkpoint=tiny_checkpoint, preprocess="tiles", max_tiles=4))
    changes = (
        ({"preprocess": "tiles", "max_tiles": 2}, "max_tiles"),
        ({"preprocess": "native"}, "preprocess"),
        ({"preprocess": "tiles", "max_tiles": 4, "watermark": True}, "provenance_checks"),
    )
    for change, named in changes:
        cfg = ScanConfig(sources=(str(folder),), out=out, checkpoint=tiny_checkpoint, resume=True, **change)
        with pytest.raises(ConfigError, match=named):
            run_scan(cfg)


@pytest.mark.slow
def test_the_policy_benchmark_scans_every_policy_on_the_same_photographs(ray_cluster):
    from aidetect_batch.bench import suites  # heavy: the benchmark suites import training and the demo

    section = suites.policies("resnet_tiny", 8, "fp32", photos=1, max_tiles=4, memory_sides=(64,), sizes=((600, 500),))
    rows = {row["policy"]: row for row in section["policies"]}
    assert set(rows) == {"resize", "center-crop", "tiles", "native"}
    for row in rows.values():
        assert row["images"] == 1 and row["images_per_s"] > 0 and row["ceiling_images_per_s"] > 0
    assert rows["tiles"]["views_per_image"] == 4 and rows["native"]["mean_coverage"] == 1.0
    assert rows["center-crop"]["mean_coverage"] < rows["tiles"]["mean_coverage"] < 1.0
    assert section["tile_logits"]["photos"] == 5 and section["tile_logits"]["mean_abs_difference"] >= 0
    assert suites.policy_lines(section)[1].lstrip().startswith("resize")
    assert [row["side"] for row in section["forward_memory"]] == [64]
