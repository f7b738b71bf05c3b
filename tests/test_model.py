import io
import os
import pickle

import numpy as np
import pyarrow as pa
import pytest
import torch
from helpers import tiny_model

from aidetect_batch import schema
from aidetect_batch.detectors import registry
from aidetect_batch.detectors.checkpoints import (
    CheckpointError,
    build_model,
    parse_checkpoint,
    read_checkpoint_bytes,
    save_checkpoint,
    scores_from_logits,
)
from aidetect_batch.scan.classifier import Classifier


def to_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def images(n=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


def reference_scores(model, imgs, two_logits_ai=None):
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model.eval()((x - mean) / std)
    if two_logits_ai is None:
        return torch.sigmoid(logits[:, 0]).numpy()
    return torch.softmax(logits, 1)[:, two_logits_ai].numpy()


def test_own_format_round_trips_metadata(tmp_path):
    path = str(tmp_path / "own.pt")
    model = tiny_model(2)
    save_checkpoint(path, model, "resnet_tiny", num_logits=2, preprocess="center-crop", threshold=0.7, info={"a": 1})
    ckpt = parse_checkpoint(read_checkpoint_bytes(path))
    assert (ckpt.kind, ckpt.arch, ckpt.num_logits, ckpt.ai_class_index) == ("aidetect-batch", "resnet_tiny", 2, 1)
    assert (ckpt.preprocess, ckpt.threshold, ckpt.info) == ("center-crop", 0.7, {"a": 1})
    clf = Classifier(read_checkpoint_bytes(path), device="cpu")
    imgs = images()
    np.testing.assert_allclose(clf.predict(imgs), reference_scores(model, imgs, two_logits_ai=1), atol=1e-5)


def test_cnndetection_format_loads_resnet50_with_one_logit():
    torch.manual_seed(0)
    model = build_model("resnet50", 1)
    data = to_bytes({"model": model.state_dict()})
    ckpt = parse_checkpoint(data)
    assert (ckpt.kind, ckpt.arch, ckpt.num_logits) == ("cnndetection", "cnndetection", 1)
    assert ckpt.preprocess == "native", "scored by the authors' protocol: the whole image"
    scores = Classifier(data, device="cpu").predict(images(2))
    np.testing.assert_allclose(scores, reference_scores(model, images(2)), atol=1e-5)


def test_cpu_forward_runs_in_chunks_with_the_scores_of_one_pass():
    """On CPU a batch runs in chunks of ``cpu_chunk`` images (glibc mmap churn, see classifier.py)."""
    from aidetect_batch.scan.classifier import CPU_CHUNK_224, cpu_chunk

    assert (cpu_chunk(224), cpu_chunk(448), cpu_chunk(1024), cpu_chunk(32)) == (CPU_CHUNK_224, 2, 1, 392)
    model = tiny_model()
    clf = Classifier(to_bytes({"model": model.state_dict()}), arch="resnet_tiny", device="cpu")
    seen = []
    clf.model.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    imgs = images(2 * CPU_CHUNK_224 + 3)
    np.testing.assert_allclose(clf.predict(imgs), reference_scores(model, imgs), atol=1e-5)
    assert seen == [CPU_CHUNK_224, CPU_CHUNK_224, 3]
    assert clf.predict(images(0)).shape == (0,)


def test_dataparallel_prefix_is_stripped():
    model = tiny_model()
    data = to_bytes({"model": {f"module.{k}": v for k, v in model.state_dict().items()}})
    assert parse_checkpoint(data, arch="resnet_tiny").arch == "resnet_tiny"


@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet_tiny"])
@pytest.mark.parametrize("num_logits", [1, 2])
def test_plain_state_dict_with_one_or_two_logits(arch, num_logits):
    torch.manual_seed(1)
    model = build_model(arch, num_logits)
    data = to_bytes(model.state_dict())
    ckpt = parse_checkpoint(data, arch=arch, ai_class_index=0 if num_logits == 2 else None)
    assert (ckpt.kind, ckpt.num_logits) == ("state_dict", num_logits)
    clf = Classifier(data, arch=arch, ai_class_index=0 if num_logits == 2 else None, device="cpu")
    expected = reference_scores(model, images(2), two_logits_ai=0 if num_logits == 2 else None)
    np.testing.assert_allclose(clf.predict(images(2)), expected, atol=1e-5)


def test_arch_is_guessed_from_keys():
    assert parse_checkpoint(to_bytes(build_model("mobilenet_v2", 1).state_dict())).arch == "mobilenet_v2"
    assert parse_checkpoint(to_bytes(build_model("efficientnet_b0", 2).state_dict())).arch == "efficientnet_b0"


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_tampered_pickle_is_refused_without_running_it(tmp_path):
    marker = str(tmp_path / "code-ran")
    buf = io.BytesIO()
    torch.save({"state": torch.zeros(1), "evil": Evil(marker)}, buf)
    for blob in (buf.getvalue(), pickle.dumps({"x": Evil(marker)}, protocol=2)):
        with pytest.raises(CheckpointError, match=r"refused.*GLOBAL posix\.mkdir"):
            parse_checkpoint(blob)
    assert not os.path.exists(marker)


def test_imagenet_head_is_a_clear_error():
    data = to_bytes(build_model("resnet_tiny", 1000).state_dict())
    with pytest.raises(CheckpointError, match="1000 outputs.*ImageNet classifier"):
        parse_checkpoint(data, arch="resnet_tiny")


def test_mismatched_state_dict_names_the_keys():
    state = tiny_model().state_dict()
    state.pop("layer1.0.conv1.weight")
    state["extra.weight"] = torch.zeros(1)
    ckpt = parse_checkpoint(to_bytes({"model": state}), arch="resnet_tiny")
    with pytest.raises(CheckpointError, match=r"missing keys layer1\.0\.conv1\.weight.*unexpected keys extra\.weight"):
        ckpt.build()


def test_wrong_architecture_is_a_clear_error():
    data = to_bytes({"model": tiny_model().state_dict()})
    with pytest.raises(CheckpointError, match="do not fit resnet50|does not match resnet50"):
        parse_checkpoint(data, arch="resnet50").build()


def test_missing_and_garbage_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint_bytes(str(tmp_path / "nope.pt"))
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        parse_checkpoint(b"definitely not a zip")


def test_classifier_passes_failed_rows_through_with_nan():
    clf = Classifier(to_bytes({"model": tiny_model().state_dict()}), arch="resnet_tiny", device="cpu", threshold=0.5)
    batch = pa.table(
        {
            schema.STATUS: ["ok", "truncated", "ok"],
            schema.IMAGE: pa.array([0, 1, 2]),
        }
    )
    from ray.data.extensions import ArrowTensorArray

    batch = batch.set_column(1, schema.IMAGE, ArrowTensorArray.from_numpy(images(3)))
    out = clf(batch)
    scores = out.column(schema.SCORE).to_numpy(zero_copy_only=False)
    assert np.isnan(scores[1]) and np.all((scores[[0, 2]] >= 0) & (scores[[0, 2]] <= 1))
    assert out.column(schema.LABEL).to_pylist()[1] is None
    assert schema.IMAGE not in out.column_names


def test_scores_from_logits():
    logits = torch.tensor([[0.0], [100.0]])
    assert scores_from_logits(logits, 0).tolist() == [0.5, 1.0]
    two = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
    np.testing.assert_allclose(scores_from_logits(two, 1).numpy(), [0.5, 0.0], atol=1e-6)


@pytest.mark.parametrize("arch", registry.ARCHS)
def test_every_trainable_arch_builds_with_a_one_logit_head_and_a_separate_head(arch):
    from aidetect_batch.detectors.checkpoints import default_input_size, head_parameters, initial_model

    net, record = initial_model(arch, 1, "none")
    entry = registry.get(arch)
    # A network that pools globally scores any size: a small input keeps the large ones fast.
    size = min(default_input_size(arch), 64) if entry.any_size else default_input_size(arch)
    assert record == {"init": "none"}
    head = head_parameters(net, arch)
    assert 0 < sum(p.numel() for p in head) < sum(p.numel() for p in net.parameters())
    with torch.no_grad():
        assert net.eval()(torch.zeros(2, 3, size, size)).shape == (2, 1)


def test_init_from_a_file_copies_fitting_weights_and_reinitialises_a_mismatched_head(tmp_path):
    from aidetect_batch.detectors.checkpoints import build_model, initial_model

    imagenet_like = build_model("resnet_tiny", 1000).state_dict()
    torch.save(imagenet_like, tmp_path / "backbone.pth")
    net, record = initial_model("resnet_tiny", 1, str(tmp_path / "backbone.pth"))
    assert torch.equal(net.state_dict()["conv1.weight"], imagenet_like["conv1.weight"])
    assert set(record["fresh"]) == {"fc.weight", "fc.bias"}
    torch.save(build_model("cifake_cnn", 1).state_dict(), tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no weight fits resnet_tiny"):
        initial_model("resnet_tiny", 1, str(tmp_path / "other.pth"))
