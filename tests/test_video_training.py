"""Training and evaluation on a labelled folder of videos: each file is one unit of the split, each sampled frame
a training example with its file's label, and validation and evaluation score a video once, as the scan does."""

from __future__ import annotations

import collections
import json
import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import animated, blocky, encode, encode_clip, photo
from sklearn import metrics as skm

from aidetect_batch import schema
from aidetect_batch.config import DEFAULT_MAX_PIXELS
from aidetect_batch.errors import ConfigError
from aidetect_batch.inputs.sources import DEFAULT_EXTENSIONS
from aidetect_batch.scan.cpu_stage import PrepareOptions, prepare_batch
from aidetect_batch.train import datasets
from aidetect_batch.train.config import EvalConfig, TrainConfig
from aidetect_batch.train.evaluation import run_evaluate
from aidetect_batch.train.trainer import prepare, run_train, select_split_batch
from aidetect_batch.train.worker import FILE_COLUMN, file_id, file_scores, train_window

FRAMES = 4  # --video-frames: a 1-s clip at 8 fps gives 4 distinct frames, the 3-frame GIF its 3
SIZE = 32  # cifake_cnn's input
TINY = dict(arch="cifake_cnn", init="none", preprocess="center-crop", lr=1e-3, batch_size=16, video_frames=FRAMES)


@pytest.fixture(scope="module")
def clip_set(tmp_path_factory) -> dict[str, str]:
    """``real/`` and ``ai/``: 64x48 one-second clips (MP4, WebM, and an MP4 named ``.jpg``), an animated GIF and
    stills. Returns path → label."""
    root = tmp_path_factory.mktemp("clips")
    labels = {}

    def add(relative: str, data: bytes | None = None) -> str:
        path = root / relative
        path.parent.mkdir(exist_ok=True)
        if data is not None:
            path.write_bytes(data)
        labels[str(path)] = relative.split("/")[0]
        return str(path)

    for label, base in (("real", 0), ("ai", 100)):
        for i, (name, codec, fmt) in enumerate(
            (("a.mp4", "libx264", "mp4"), ("b.webm", "libvpx-vp9", "webm"), ("c.mp4", "libx264", "mp4"))
        ):
            encode_clip(add(f"{label}/{name}"), codec, fmt, frames=8, size=(64, 48), seed=base + i)
        for i in range(3):
            still = photo(64, 48, seed=base + i) if label == "real" else blocky(64, seed=base + i)
            add(f"{label}/still{i}.png", encode(still, "PNG"))
    add("ai/loop.gif", animated("GIF"))
    encode_clip(add("ai/really_a_video.jpg"), "libx264", "mp4", frames=8, size=(64, 48), seed=7)
    return labels


def test_a_video_is_one_unit_of_the_split_and_each_of_its_frames_one_example(clip_set):
    root = os.path.dirname(os.path.dirname(next(iter(clip_set))))
    cfg = TrainConfig(dataset=root, out="unused", **TINY)
    listing, _ = datasets.list_labelled(root, cfg.extensions)
    assert set(listing.column(schema.PATH).to_pylist()) == set(clip_set), "videos are listed with the stills"
    window = train_window("center-crop", SIZE)
    options = PrepareOptions(policy="center-crop", max_pixels=DEFAULT_MAX_PIXELS, size=window, video_frames=FRAMES)
    decoded = prepare_batch(listing, options)
    paths = decoded.column(schema.PATH).to_pylist()
    frames = dict(zip(paths, decoded.column(schema.N_FRAMES).to_pylist(), strict=True))
    assert all(frames[p] == FRAMES for p in clip_set if p.endswith((".mp4", ".webm", ".jpg")))
    assert frames[next(p for p in clip_set if p.endswith(".gif"))] == 3
    split, _ = datasets.assign_splits(decoded, seed=3)
    assignment = dict(zip(paths, split.to_pylist(), strict=True))
    assert set(assignment.values()) == {"train", "val", "test"} and None not in assignment.values()

    owner = {file_id(p): p for p in clip_set}
    seen: dict[str, collections.Counter] = {}
    for name in ("train", "val", "test"):
        examples = select_split_batch(decoded, name, assignment, side=window, boxes=True)
        assert examples.column(schema.IMAGE).chunk(0).to_numpy().shape[1:] == (window, window, 3)
        seen[name] = collections.Counter(owner[i] for i in examples.column(FILE_COLUMN).to_pylist())
        targets = examples.column("target").to_pylist()
        assert targets == [float(clip_set[owner[i]] == "ai") for i in examples.column(FILE_COLUMN).to_pylist()]
    for path in clip_set:
        holding = [name for name in seen if path in seen[name]]
        assert holding == [assignment[path]], f"{path}: all its frames in its own split, none elsewhere"
        assert seen[assignment[path]][path] == (frames[path] or 1), "one example per sampled frame, a still once"
    with_split = decoded.set_column(decoded.schema.get_field_index(schema.SPLIT), schema.SPLIT, split)
    examples = datasets.balance(with_split, per_frame=True)
    assert {name: examples[name].images for name in seen} == {name: sum(c.values()) for name, c in seen.items()}


def test_validation_scores_a_video_by_its_frames_mean_log_odds():
    files, logits, targets = [7, 5, 7, 7, 9], [2.0, -1.5, -1.0, 0.5, 30.0], [1, 0, 1, 1, 0]
    scores, file_targets = file_scores(files, logits, targets)
    assert scores == pytest.approx([1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(1.5)), 1.0])
    assert file_targets == [1, 0, 0]
    still = torch.tensor([-1.5], dtype=torch.float32)
    assert file_scores([5], still.tolist(), [0])[0] == torch.sigmoid(still).tolist(), "a still scores as before"
    assert file_scores([], [], []) == ([], [])


def test_train_and_evaluate_list_videos_unless_no_frames_are_sampled(tmp_path):
    train = TrainConfig(dataset=str(tmp_path), out=str(tmp_path / "o"), **TINY)
    assert set(train.extensions) >= {*DEFAULT_EXTENSIONS, "mp4", "webm", "mkv"}
    assert TrainConfig(dataset=str(tmp_path), out="o", video_frames=0).extensions == DEFAULT_EXTENSIONS
    evaluate = EvalConfig(dataset=str(tmp_path), checkpoint="m.pt", out="o")
    assert "mov" in evaluate.extensions and evaluate.scan_options.video_frames == 8
    with pytest.raises(ConfigError, match="--video-frames"):
        TrainConfig(dataset=str(tmp_path), out="o", video_frames=-1)


def test_training_data_holds_each_file_in_one_split_and_each_frame_once(ray_cluster, clip_set):
    root = os.path.dirname(os.path.dirname(next(iter(clip_set))))
    prepared = prepare(TrainConfig(dataset=root, out="unused", **TINY))
    files = prepared.splits.to_pylist()
    assert {r[schema.PATH] for r in files} == set(clip_set) and all(r[schema.SPLIT] for r in files)
    for name, examples in (("train", prepared.train), ("val", prepared.val)):
        held = [r for r in files if r[schema.SPLIT] == name]
        ids = collections.Counter(r[FILE_COLUMN] for r in examples.select_columns([FILE_COLUMN]).take_all())
        assert ids == {file_id(r[schema.PATH]): r[schema.N_FRAMES] or 1 for r in held}, "each frame once, here only"
        assert ids.total() == prepared.described.examples_in(name).images


@pytest.mark.slow  # about a minute on 2 cores: Ray Train, then an evaluation scan (--runslow runs it)
def test_a_trained_checkpoint_is_validated_and_evaluated_per_file(ray_cluster, clip_set, tmp_path):
    """The one end-to-end run: one epoch of Ray Train on the clips, then evaluate through the scan."""
    root = os.path.dirname(os.path.dirname(next(iter(clip_set))))
    result = run_train(TrainConfig(dataset=root, out=str(tmp_path / "run"), epochs=1, **TINY))
    splits = pq.read_table(os.path.join(tmp_path, "run", schema.SPLITS_FILE)).to_pylist()
    per_split = collections.defaultdict(lambda: [0, 0])
    for row in splits:
        per_split[row[schema.SPLIT]][0] += 1
        per_split[row[schema.SPLIT]][1] += row[schema.N_FRAMES] or 1
    described = json.load(open(os.path.join(tmp_path, "run", schema.DATASET_FILE)))
    for name in ("train", "val", "test"):
        assert described["balance"][name]["real"] + described["balance"][name]["ai"] == per_split[name][0]
        assert described["examples"][name]["real"] + described["examples"][name]["ai"] == per_split[name][1]
    assert result.val_metrics["at_0.5"]["n"] == per_split["val"][0], "validation scores files, not frames"

    evaluated = run_evaluate(
        EvalConfig(
            dataset=os.path.join(tmp_path, "run", schema.SPLITS_FILE),
            checkpoint=result.checkpoint,
            out=str(tmp_path / "eval"),
            split="all",
        )
    )
    rows = pq.read_table(str(tmp_path / "eval" / schema.EVAL_SCAN_DIR / schema.SCORES_DIR)).to_pylist()
    assert sorted(r[schema.PATH] for r in rows) == sorted(clip_set), "one row, so one score, per file"
    videos = [r for r in rows if r[schema.N_FRAMES]]
    assert evaluated.metrics["videos"] == {"files": len(videos), "frames": sum(r[schema.N_FRAMES] for r in videos)}
    assert evaluated.metrics["scored"] == len(clip_set) and len(videos) == 8, "6 clips, a .jpg that is one, a GIF"
    y = np.array([clip_set[r[schema.PATH]] == "ai" for r in rows], dtype=int)
    s = np.array([r[schema.SCORE] for r in rows])
    assert evaluated.metrics["overall"]["average_precision"] == pytest.approx(skm.average_precision_score(y, s))
