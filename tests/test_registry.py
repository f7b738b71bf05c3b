"""The registry and the policy records own their facts: a new architecture is one entry, even one whose
backbone comes from a library's pretrained weights and whose checkpoint holds only the head."""

import dataclasses
import io
import os
import re
import types
import urllib.error

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision.transforms as T
from helpers import photo, tiny_model
from PIL import Image

from aidetect_batch import schema
from aidetect_batch.detectors import checkpoints, policies, registry
from aidetect_batch.detectors.checkpoints import CheckpointError, parse_checkpoint, read_checkpoint_bytes

PROBE = "probe_tiny"
PROBE_MEAN, PROBE_STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
PROBE_SIZE = 64


def to_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def probe_entry(load=None) -> registry.Arch:
    """A tiny torchvision ResNet whose backbone comes from a test-local "pretrained" hook: fixed random
    weights, no network. Defined in a function so Ray ships its callables by value to the actors."""

    def build(num_logits: int, input_size: int):
        import torchvision.models.resnet as tvr

        return tvr.ResNet(tvr.BasicBlock, [1, 1, 1, 1], num_classes=num_logits)

    def pretrained_weights():
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(1234)
        weights = build(1000, PROBE_SIZE).state_dict()
        torch.random.set_rng_state(generator_state)
        return weights

    return registry.Arch(
        PROBE,
        build,
        head="fc",
        head_prefix="fc",
        signature=("probe_tiny.only",),
        input_size=PROBE_SIZE,
        mean=PROBE_MEAN,
        std=PROBE_STD,
        preprocess="center-crop",
        pretrained=registry.Pretrained("torchvision", "test-random", load or pretrained_weights),
    )


@pytest.fixture
def probe():
    entry = registry.register(probe_entry())
    yield entry
    registry.REGISTRY.pop(PROBE)


def probe_model(entry: registry.Arch, seed: int = 7) -> torch.nn.Module:
    """Backbone from the hook, a fresh random 512→1 linear probe."""
    model = entry.build(1, PROBE_SIZE)
    model.load_state_dict(checkpoints.pretrained_backbone(PROBE), strict=False)
    torch.manual_seed(seed)
    model.fc = torch.nn.Linear(model.fc.in_features, 1)
    return model.eval()


def direct_scores(model: torch.nn.Module, paths: list[str]) -> dict[str, float]:
    """Backbone + head on the central 64 px of each image, normalised with the entry's mean/std."""
    crop = T.Compose([T.CenterCrop(PROBE_SIZE), T.ToTensor(), T.Normalize(PROBE_MEAN, PROBE_STD)])
    x = torch.stack([crop(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return dict(zip(paths, torch.sigmoid(model(x)[:, 0]).tolist(), strict=True))


def test_head_only_checkpoint_keeps_only_the_head_and_records_its_facts(probe, tmp_path):
    model = probe_model(probe)
    path = str(tmp_path / "probe.pt")
    checkpoints.save_checkpoint(path, model, PROBE, head_only=True)
    raw = torch.load(path, weights_only=True)
    assert set(raw["state_dict"]) == {"fc.weight", "fc.bias"} and raw["weights"] == "head"
    assert (raw["mean"], raw["std"], raw["num_logits"], raw["preprocess"]) == (
        list(PROBE_MEAN),
        list(PROBE_STD),
        1,
        "center-crop",
    )
    assert raw["pretrained"] == {"library": "torchvision", "name": "test-random"}
    ckpt = parse_checkpoint(read_checkpoint_bytes(path))
    assert ckpt.head_only and ckpt.metadata()["head_only"]
    built = ckpt.build()
    for key, value in model.state_dict().items():
        assert torch.equal(built.state_dict()[key], value), key


@pytest.mark.parametrize("layout", ["bare", "fc", "net"])
def test_a_published_linear_probe_takes_its_backbone_from_the_hook(probe, layout):
    model = probe_model(probe, seed=3)
    head = {"weight": model.fc.weight.detach(), "bias": model.fc.bias.detach()}
    obj = {
        "bare": head,
        "fc": {f"fc.{k}": v for k, v in head.items()},
        "net": {"net": {f"module.fc.{k}": v for k, v in head.items()}},
    }[layout]
    ckpt = parse_checkpoint(to_bytes(obj), arch=PROBE)
    assert ckpt.head_only and (ckpt.mean, ckpt.std, ckpt.preprocess) == (PROBE_MEAN, PROBE_STD, "center-crop")
    x = torch.rand(2, 3, PROBE_SIZE, PROBE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(ckpt.build()(x), model(x))


def test_offline_pretrained_weights_are_a_clear_error(tmp_path):
    def offline():
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    registry.register(probe_entry(load=offline))
    try:
        head = {"fc.weight": torch.zeros(1, 512), "fc.bias": torch.zeros(1)}
        ckpt = parse_checkpoint(to_bytes(head), arch=PROBE)
        with pytest.raises(CheckpointError, match=r"torchvision.*test-random.*TORCH_HOME") as raised:
            ckpt.build()
        assert "hub/checkpoints" in str(raised.value) and "offline" in str(raised.value).lower()
    finally:
        registry.REGISTRY.pop(PROBE)


def test_a_head_only_checkpoint_needs_an_entry_with_a_pretrained_hook(tmp_path):
    with pytest.raises(CheckpointError, match="pretrained backbone"):
        checkpoints.save_checkpoint(str(tmp_path / "x.pt"), tiny_model(), "resnet_tiny", head_only=True)


def test_pretrained_hooks_of_the_libraries_name_their_source():
    assert (registry.torchvision_pretrained("resnet18").library, registry.torchvision_pretrained("resnet18").env) == (
        "torchvision",
        "TORCH_HOME",
    )
    timm = registry.timm_pretrained("resnet18.a1_in1k")
    assert (timm.library, timm.name, timm.env) == ("timm", "resnet18.a1_in1k", "HF_HUB_OFFLINE")
    clip = registry.open_clip_pretrained("ViT-B-32", "openai")
    assert (clip.library, clip.name) == ("open_clip", "ViT-B-32/openai") and "huggingface" in clip.cache


@pytest.mark.ray
def test_scan_with_a_registered_pretrained_arch_and_a_head_only_checkpoint(ray_cluster, probe, tmp_path):
    from aidetect_batch.scan.config import ScanConfig
    from aidetect_batch.scan.runner import run_scan

    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for i, (width, height) in enumerate([(96, 80), (120, 64), (64, 64), (200, 150)]):
        path = str(folder / f"img{i}.png")
        photo(width, height, seed=i).save(path)
        paths.append(path)
    model = probe_model(probe)
    checkpoint = str(tmp_path / "probe.pt")
    checkpoints.save_checkpoint(checkpoint, model, PROBE, head_only=True)
    out = str(tmp_path / "out")
    result = run_scan(ScanConfig(sources=(str(folder),), out=out, checkpoint=checkpoint))
    rows = {r[schema.PATH]: r for r in pq.read_table(os.path.join(out, schema.SCORES_DIR)).to_pylist()}
    assert set(rows) == set(paths)
    assert {r[schema.PREPROCESS] for r in rows.values()} == {"center-crop"}
    expected = direct_scores(model, paths)
    np.testing.assert_allclose([rows[p][schema.SCORE] for p in paths], [expected[p] for p in paths], atol=1e-4)
    assert result.run["model"]["head_only"] and result.run["model"]["arch"] == PROBE


# ---- one unwrapping for scan and --init, old checkpoints --------------------------------------------------


@pytest.mark.parametrize(
    "wrap,prefix",
    [("net", ""), ("net", "module."), ("model", "_orig_mod."), ("state_dict", ""), ("bare", "module._orig_mod.")],
)
def test_scan_and_init_unwrap_checkpoints_the_same_way(tmp_path, wrap, prefix):
    model = tiny_model()
    weights = {prefix + k: v for k, v in model.state_dict().items()}
    path = str(tmp_path / "w.pt")
    torch.save(weights if wrap == "bare" else {wrap: weights}, path)
    scanned = parse_checkpoint(read_checkpoint_bytes(path), arch="resnet_tiny").build().state_dict()
    net, record = checkpoints.initial_model("resnet_tiny", 1, path)
    assert record["fresh_count"] == 0
    for key, value in model.state_dict().items():
        assert torch.equal(scanned[key], value), key
        assert torch.equal(net.state_dict()[key], value), key


def old_payload(model, arch: str, **fields) -> dict:
    """A checkpoint exactly as save_checkpoint wrote it before the head-only change."""
    payload = {
        "format": "aidetect-batch",
        "version": 1,
        "arch": arch,
        "num_logits": 1,
        "class_names": ["real", "ai"],
        "ai_class_index": 0,
        "mean": list(registry.IMAGENET_MEAN),
        "std": list(registry.IMAGENET_STD),
        "input_size": 224,
        "preprocess": "resize",
        "threshold": 0.5,
        "pruning": None,
        "info": {},
        "state_dict": model.state_dict(),
    }
    return {**payload, **fields}


def test_checkpoints_written_before_still_load(tmp_path):
    from aidetect_batch.train.pruning import prune_structured

    model = tiny_model()
    ckpt = parse_checkpoint(to_bytes(old_payload(model, "resnet_tiny", threshold=0.7)))
    assert (ckpt.arch, ckpt.threshold, ckpt.head_only, ckpt.mean) == ("resnet_tiny", 0.7, False, registry.IMAGENET_MEAN)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ckpt.build()(x), model.eval()(x))
    pruned = prune_structured(model, "resnet_tiny", 0.5).eval()
    record = {"method": "structured", "amount": 0.5, "source": "x.pt"}
    old_pruned = old_payload(pruned, "resnet_tiny", pruning=record, preprocess="center-crop")
    ckpt = parse_checkpoint(to_bytes(old_pruned))
    assert ckpt.structured and ckpt.pruning == record
    with torch.no_grad():
        torch.testing.assert_close(ckpt.build()(x), pruned(x))


def test_checkpoints_record_the_architectures_normalisation_by_default(tmp_path):
    """A detector normalised like CLIP must not come back with ImageNet's statistics."""
    clip_like = registry.register(
        registry.Arch(
            "tiny_clip_norm",
            registry.get("resnet_tiny").build,
            head="fc",
            head_prefix="fc",
            signature=("tiny_clip_norm.only",),
            mean=(0.4815, 0.4578, 0.4082),
            std=(0.2686, 0.2613, 0.2758),
        )
    )
    try:
        path = str(tmp_path / "c.pt")
        checkpoints.save_checkpoint(path, tiny_model(), clip_like.name)
        ckpt = parse_checkpoint(read_checkpoint_bytes(path))
        assert (ckpt.mean, ckpt.std, ckpt.num_logits) == (clip_like.mean, clip_like.std, 1)
    finally:
        registry.REGISTRY.pop(clip_like.name)


def test_pruned_start_checkpoint_keeps_logits_normalisation_and_policy(tmp_path):
    from aidetect_batch.train import pruning

    source = str(tmp_path / "src.pt")
    mean, std = (0.1, 0.2, 0.3), (0.3, 0.2, 0.1)
    checkpoints.save_checkpoint(
        source, tiny_model(2), "resnet_tiny", num_logits=2, mean=mean, std=std, preprocess="tiles"
    )
    ckpt = parse_checkpoint(read_checkpoint_bytes(source))
    cfg = types.SimpleNamespace(method="structured", out=str(tmp_path / "out"), checkpoint=source, storage_options={})
    start, record = pruning._save_pruned(cfg, ckpt, ckpt.build(), 0.5)
    saved = parse_checkpoint(read_checkpoint_bytes(start))
    assert (saved.num_logits, saved.ai_class_index, saved.mean, saved.std) == (2, 1, mean, std)
    assert saved.preprocess == "tiles" and saved.pruning == record
    assert saved.build()(torch.rand(1, 3, 64, 64)).shape == (1, 2)


# ---- the registry owns the facts ---------------------------------------------------------------------------


def test_published_layouts_and_input_sizes_come_from_the_registry():
    owner = registry.layout_owner("model")
    assert owner is not None and registry.get(owner).layout == "model"
    weights = checkpoints.build_model(registry.DEFAULT_ARCH, 1).state_dict()
    ckpt = parse_checkpoint(to_bytes({"model": weights}))
    assert (ckpt.kind, ckpt.arch, ckpt.preprocess) == (owner, owner, registry.get(owner).preprocess)
    for entry in registry.REGISTRY.values():
        if entry.input_size_of is not None:
            for side in (entry.input_size, 2 * entry.input_size):
                state = checkpoints.build_model(entry.name, 1, side).state_dict()
                assert parse_checkpoint(to_bytes(state), arch=entry.name).input_size == side


@pytest.mark.parametrize("arch", registry.names(lambda a: a.structured_pruning))
def test_structured_pruning_is_described_by_the_entry(arch):
    from aidetect_batch.train.pruning import prune_structured

    net = checkpoints.build_model(arch, 1).eval()
    pruned = prune_structured(net, arch, 0.5).eval()
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in net.parameters())


# ---- policy records ----------------------------------------------------------------------------------------


def test_policy_names_come_from_the_records():
    assert policies.POLICIES == tuple(policies.get(name).name for name in policies.POLICIES)
    assert policies.DEFAULT_POLICY in policies.POLICIES and policies.DEFAULT_TRAIN_POLICY in policies.POLICIES
    assert policies.FIXED_POLICIES == tuple(n for n in policies.POLICIES if policies.get(n).fixed)
    with pytest.raises(ValueError, match="unknown preprocess policy 'blur'"):
        policies.get("blur")


@pytest.mark.parametrize("name", policies.POLICIES)
def test_each_policy_frames_views_of_its_declared_shape_and_batches_by_its_rule(name):
    record = policies.get(name)
    framing = policies.Framing(native_max_pixels=300 * 200, max_tiles=4)
    view = policies.view_of(photo(500, 300), name, 64, framing)
    expected_ndim = {policies.ViewShape.SQUARE: 3, policies.ViewShape.TILES: 4, policies.ViewShape.ANY: 3}
    assert view.pixels.ndim == expected_ndim[record.view] and view.pixels.dtype == np.uint8
    if record.view is not policies.ViewShape.ANY:
        assert view.pixels.shape[-3:-1] == (64, 64)
        assert record.batch_rows(64, framing) == 64
    else:
        assert view.pixels.shape[0] * view.pixels.shape[1] <= framing.native_max_pixels
        assert record.batch_rows(10_000, framing) == policies.ANY_SIZE_BATCH_BYTES // (300 * 200 * 3)
    assert (record.decode_short_side(224) is not None) == record.draft
    assert set(record.framing_fields) <= {f.name for f in dataclasses.fields(policies.Framing)}
    assert policies.get(record.train_view).fixed


def test_no_module_outside_detectors_compares_a_policy_string_or_names_an_architecture():
    root = os.path.join(os.path.dirname(__file__), "..", "aidetect_batch")
    names = "|".join(re.escape(n) for n in policies.POLICIES)
    arch = "|".join(re.escape(n) for n in registry.ARCHS)
    compare = re.compile(
        rf"""(==|!=|\bin)\s*\(?["']({names})["']|["']({names})["']\s*(==|!=)|FIXED_POLICIES|\b({arch})\b"""
    )
    found = []
    for folder, _, files in os.walk(root):
        if os.path.basename(folder) == "detectors":
            continue
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8") as handle:
                    found += [f"{name}:{i}" for i, line in enumerate(handle, 1) if compare.search(line)]
    assert not found
