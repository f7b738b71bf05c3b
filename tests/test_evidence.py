"""Training keeps the traces: random crops of native pixels, full-resolution blur/JPEG, defaults by initialisation.

The measured case of issue 16: 32×32 crops of real photographs (the bundled scikit-image pictures, CC0 /
public domain, see aidetect_batch/bench/demo_data/LICENSES.md) against the same kind of crop downsampled 2× and
upsampled back with nearest-neighbour, a textbook generator trace. With the old defaults (resize, every
augmentation, lr 1e-4) a held-out ROC-AUC of 0.57-0.62 was measured; the defaults must now reach 0.9.
"""

from __future__ import annotations

import glob
import io
import os

import numpy as np
import pyarrow as pa
import pytest
import torch
from helpers import photo
from PIL import Image

from aidetect_batch import schema
from aidetect_batch.bench.demo import PHOTOS, photo_bytes
from aidetect_batch.config import DEFAULT_MAX_PIXELS
from aidetect_batch.detectors.checkpoints import parse_checkpoint
from aidetect_batch.detectors.policies import center_crop
from aidetect_batch.scan.classifier import Classifier
from aidetect_batch.scan.cpu_stage import PrepareOptions, prepare_batch
from aidetect_batch.train import metrics
from aidetect_batch.train.config import TrainConfig
from aidetect_batch.train.trainer import run_train
from aidetect_batch.train.worker import native_crop, train_window, window_boxes


def upsampling_case(root: str, *, train: int, test: int, seed: int = 0) -> None:
    """``train`` and ``test`` PNG crops per class: real 32×32 native crops, and 'AI' ones that went 2× down
    (box filter) and back up with nearest-neighbour."""
    rng = np.random.default_rng(seed)
    photos = [np.asarray(Image.open(io.BytesIO(photo_bytes(name))).convert("RGB")) for name in PHOTOS]
    for split, count in (("train", train), ("test", test)):
        for label in ("real", "ai"):
            folder = os.path.join(root, split, label)
            os.makedirs(folder)
            for i in range(count):
                source = photos[int(rng.integers(len(photos)))]
                top, left = (int(rng.integers(0, side - 32)) for side in source.shape[:2])
                crop = Image.fromarray(source[top : top + 32, left : left + 32])
                if label == "ai":
                    crop = crop.resize((16, 16), Image.BOX).resize((32, 32), Image.NEAREST)
                crop.save(os.path.join(folder, f"{i:04d}.png"))


@pytest.mark.slow
def test_the_upsampling_case_is_learned_with_the_defaults(ray_cluster, tmp_path):
    data = str(tmp_path / "case")
    upsampling_case(data, train=400, test=120)
    cfg = TrainConfig(dataset=data, out=str(tmp_path / "train"), arch="cifake_cnn", epochs=20)
    assert (cfg.resolved_lr, cfg.preprocess, cfg.augment) == (1e-3, "center-crop", ("flip",))
    trained = run_train(cfg)
    scores, labels = held_out_scores(data, trained.checkpoint)
    assert len(scores) == 240
    assert metrics.roc_auc(labels, scores) >= 0.9


def held_out_scores(root: str, checkpoint: str) -> tuple[np.ndarray, np.ndarray]:
    """The checkpoint's scores on the test split, through the scan's own CPU stage and Classifier under the
    checkpoint's policy (what ``evaluate`` runs, without its report and plots)."""
    paths = sorted(glob.glob(os.path.join(root, "test", "*", "*.png")))
    listing = pa.table({schema.PATH: paths, schema.SOURCE: [root] * len(paths)})
    with open(checkpoint, "rb") as handle:
        data = handle.read()
    ckpt = parse_checkpoint(data)
    options = PrepareOptions(policy=ckpt.preprocess, max_pixels=DEFAULT_MAX_PIXELS, size=ckpt.input_size)
    scored = Classifier(data, device="cpu")(prepare_batch(listing, options))
    assert set(scored.column(schema.STATUS).to_pylist()) == {"ok"}
    labels = np.array([p.split(os.sep)[-2] == "ai" for p in paths], dtype=np.int64)
    return np.asarray(scored.column(schema.SCORE).to_numpy(zero_copy_only=False)), labels


def test_defaults_depend_on_the_initialisation():
    scratch = TrainConfig(dataset="d", out="o", arch="cifake_cnn")
    tuned = TrainConfig(dataset="d", out="o", arch="resnet50", init="weights.pt")
    assert (scratch.resolved_lr, scratch.resolved_epochs, scratch.resolved_patience) == (1e-3, 30, 5)
    assert (tuned.resolved_lr, tuned.resolved_epochs, tuned.resolved_patience) == (1e-4, 5, 3)
    assert TrainConfig(dataset="d", out="o", arch="cifake_cnn", lr=0.01).resolved_lr == 0.01
    assert "rotate" not in scratch.augment and "translate" not in scratch.augment


@pytest.mark.parametrize("side", [20, 32, 40, 47, 48, 97])
def test_the_validation_crop_is_the_scans_center_crop_and_training_crops_are_native(side):
    """Whatever the image's size, its window's central crop equals center_crop of the image itself, and
    every training crop is a window of the image's own pixels (or its padded view when smaller)."""
    size, window = 32, train_window("center-crop", 32)
    image = np.asarray(photo(side, side + 3, seed=side))
    held = center_crop(image, window)
    box = [v[0] for v in window_boxes([image.shape[0]], [image.shape[1]], window).values()]
    tensor = torch.from_numpy(held.copy()).permute(2, 0, 1)
    central = native_crop(tensor, box, size=size, window=window, train=False).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(central, center_crop(image, size))
    torch.manual_seed(0)
    for _ in range(5):
        crop = native_crop(tensor, box, size=size, window=window, train=True).permute(1, 2, 0).numpy()
        if min(image.shape[:2]) >= size:
            found = any(
                np.array_equal(crop, image[y : y + size, x : x + size])
                for y in range(image.shape[0] - size + 1)
                for x in range(image.shape[1] - size + 1)
            )
            assert found, "a training crop is a window of the original pixels, never resampled"
        else:
            np.testing.assert_array_equal(crop, center_crop(image, size))
