"""Pruning: structured cuts really shrink the model, unstructured does not, fine-tuning and Ray Tune."""

import os

import pyarrow.parquet as pq
import pytest
import torch
from helpers import tiny_model, write_labelled_set

from aidetect_batch import schema
from aidetect_batch.detectors import checkpoints
from aidetect_batch.scan.config import ScanConfig
from aidetect_batch.scan.runner import run_scan
from aidetect_batch.train.config import PruneConfig
from aidetect_batch.train.pruning import count_parameters, prune_structured, prune_unstructured, run_prune


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("labelled"))
    write_labelled_set(root, per_class=16, side=32)
    return root


@pytest.fixture(scope="module")
def cifake_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("ckpt") / "cifake.pt")
    checkpoints.save_checkpoint(path, checkpoints.build_model("cifake_cnn", 1), "cifake_cnn", preprocess="center-crop")
    return path


def save(path, net, arch, **kwargs):
    checkpoints.save_checkpoint(str(path), net, arch, **kwargs)
    return str(path)


@pytest.mark.parametrize("arch,size", [("resnet_tiny", 64), ("cifake_cnn", 32), ("resnet50", 64)])
def test_structured_pruning_removes_channels_and_still_runs(arch, size):
    net = checkpoints.build_model(arch, 1).eval()
    pruned = prune_structured(net, arch, 0.5).eval()
    assert count_parameters(pruned)[0] < 0.75 * count_parameters(net)[0]
    with torch.no_grad():
        assert pruned(torch.randn(2, 3, size, size)).shape == (2, 1)


def test_structured_checkpoint_is_smaller_and_scans_as_is(ray_cluster, corpus, tmp_path):
    net = tiny_model()
    pruned = prune_structured(net, "resnet_tiny", 0.5)
    full = save(tmp_path / "full.pt", net, "resnet_tiny")
    small = save(tmp_path / "small.pt", pruned, "resnet_tiny", pruning={"method": "structured", "amount": 0.5})
    assert os.path.getsize(small) < 0.75 * os.path.getsize(full)
    ckpt = checkpoints.parse_checkpoint(checkpoints.read_checkpoint_bytes(small))
    assert ckpt.structured and ckpt.metadata()["pruning"]["amount"] == 0.5
    assert count_parameters(ckpt.build())[0] == count_parameters(pruned)[0]
    # The images only: the corpus's default listing is its image extensions (videos are test_video's).
    cfg = ScanConfig(sources=(corpus["root"],), out=str(tmp_path / "scan"), checkpoint=small, video_frames=0)
    result = run_scan(cfg)
    rows = pq.read_table(result.files).to_pylist()
    assert {r[schema.PATH] for r in rows} == set(corpus["default"])
    assert all(0.0 <= r[schema.SCORE] <= 1.0 for r in rows if r[schema.STATUS] == "ok")


@pytest.mark.slow  # a whole Ray scan: moved out of the default suite to keep it under 10 minutes (--runslow)
def test_zero_pruning_scores_equal_the_original(ray_cluster, corpus, tmp_path):
    net = tiny_model()
    original = save(tmp_path / "o.pt", net, "resnet_tiny")
    zero = save(
        tmp_path / "z.pt",
        prune_structured(net, "resnet_tiny", 0.0),
        "resnet_tiny",
        pruning={"method": "structured", "amount": 0.0},
    )
    files = tuple(p for p, s in corpus["default"].items() if s.value == "ok")
    scores = []
    for name, ckpt in (("a", original), ("b", zero)):
        out = run_scan(ScanConfig(sources=files, out=str(tmp_path / name), checkpoint=ckpt))
        scores.append({r[schema.PATH]: r[schema.SCORE] for r in pq.read_table(out.files).to_pylist()})
    assert scores[0] == scores[1]


def test_unstructured_pruning_keeps_shapes_and_zeroes_weights():
    net = checkpoints.build_model("resnet_tiny", 1)
    pruned = prune_unstructured(net, 0.4)
    assert {k: v.shape for k, v in pruned.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    total, nonzero = count_parameters(pruned)
    weights = [m.weight for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert total == count_parameters(net)[0]
    zeros_before = total - count_parameters(net)[1]  # batch-norm biases start at zero
    assert total - nonzero == zeros_before + sum(round(0.4 * w.numel()) for w in weights)
    assert not any(hasattr(m, "weight_orig") for m in pruned.modules()), "pruning is made permanent"


@pytest.mark.slow
def test_prune_unstructured_reports_measured_size_and_speed(ray_cluster, labelled, cifake_checkpoint, tmp_path):
    cfg = PruneConfig(
        checkpoint=cifake_checkpoint,
        dataset=labelled,
        out=str(tmp_path / "u"),
        amounts=(0.5,),
        method="unstructured",
        epochs=1,
        lr=1e-3,
        batch_size=16,
        bench_batches=3,
    )
    result = run_prune(cfg)
    base, half = result.rows
    assert (base["amount"], half["amount"]) == (0.0, 0.5)
    assert half["params"] == base["params"] and half["nonzero"] < 0.6 * base["params"]
    assert abs(half["file_bytes"] - base["file_bytes"]) < 0.05 * base["file_bytes"]
    assert f"measured dense speed {half['speedup']:.2f}x" in result.markdown
    assert half["speedup"] == pytest.approx(half["images_per_s"] / base["images_per_s"])
    for name in ("prune.parquet", "prune.md", "prune.png", "prune.json"):
        assert os.path.exists(os.path.join(cfg.out, name)), name
    assert pq.read_table(os.path.join(cfg.out, "prune.parquet")).num_rows == 2
    ckpt = checkpoints.parse_checkpoint(checkpoints.read_checkpoint_bytes(half["checkpoint"]))
    assert ckpt.pruning == {"method": "unstructured", "amount": 0.5, "source": cifake_checkpoint}
    assert count_parameters(ckpt.build())[1] == half["nonzero"], "fine-tuning kept the pruned weights at zero"
    assert not (half["val_auc_before"] != half["val_auc_before"]), "validation before fine-tuning is measured"


@pytest.mark.slow
def test_prune_structured_fine_tunes_a_smaller_model(ray_cluster, labelled, cifake_checkpoint, tmp_path):
    cfg = PruneConfig(
        checkpoint=cifake_checkpoint,
        dataset=labelled,
        out=str(tmp_path / "s"),
        amounts=(0.5,),
        epochs=1,
        lr=1e-3,
        batch_size=16,
        bench_batches=3,
    )
    base, half = run_prune(cfg).rows
    assert half["params"] < 0.5 * base["params"] and half["file_bytes"] < 0.6 * base["file_bytes"]
    assert half["checkpoint"] == os.path.join(cfg.out, "amount_50", schema.MODEL_FILE)
    ckpt = checkpoints.parse_checkpoint(checkpoints.read_checkpoint_bytes(half["checkpoint"]))
    assert ckpt.structured and ckpt.preprocess == "center-crop" and ckpt.input_size == 32
    assert count_parameters(ckpt.build())[0] == half["params"], "the fine-tuned checkpoint keeps the pruned widths"
