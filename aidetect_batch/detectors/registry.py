"""The architecture registry: one entry per detector architecture, and nothing else knows their facts.

Config validation, checkpoint parsing, training, pruning and the tests read
from :data:`REGISTRY`. It imports no torch, so the config can be checked in a
second before anything heavy loads; each entry's builder imports torchvision
only when a model is built. Adding an architecture is one :class:`Arch` entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from aidetect_batch.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_HF_CACHE = "$HF_HOME/hub (default ~/.cache/huggingface/hub)"


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """Where an architecture's backbone weights come from when a checkpoint holds only its head.

    Attributes:
        library: The library that publishes the weights (``torchvision``, ``timm``, ``open_clip``).
        name: The weights' name in that library.
        load: ``load()`` returns the backbone's state dict, keyed as in the model ``Arch.build`` makes;
            head keys in it are ignored. It may download once; offline it raises ``OSError``.
        cache: Where the library caches the weights, named in the error when they cannot be loaded.
        env: The environment variable that moves that cache or keeps the library offline.
    """

    library: str
    name: str
    load: Callable[[], Mapping[str, Any]]
    cache: str = "$TORCH_HOME/hub/checkpoints (default ~/.cache/torch/hub/checkpoints)"
    env: str = "TORCH_HOME"


def torchvision_pretrained(model: str) -> Pretrained:
    """The default torchvision weights of ``model`` (``tvm.get_model_weights(model).DEFAULT``)."""

    def load() -> Mapping[str, Any]:
        import torchvision.models as tvm  # torch loads only when weights are loaded: the registry stays light

        return tvm.get_model_weights(model).DEFAULT.get_state_dict(progress=False)

    return Pretrained("torchvision", model, load)


def timm_pretrained(model: str) -> Pretrained:
    """timm's pretrained weights of ``model``, from the Hugging Face Hub cache."""

    def load() -> Mapping[str, Any]:
        import timm  # an optional dependency, needed only by entries that use it

        return timm.create_model(model, pretrained=True).state_dict()

    return Pretrained("timm", model, load, cache=_HF_CACHE, env="HF_HUB_OFFLINE")


def open_clip_pretrained(model: str, tag: str) -> Pretrained:
    """The image tower of open_clip's ``model`` with the ``tag`` weights, keyed ``visual.*``."""

    def load() -> Mapping[str, Any]:
        import open_clip  # an optional dependency, needed only by entries that use it

        clip = open_clip.create_model(model, pretrained=tag)
        return {f"visual.{k}": v for k, v in clip.visual.state_dict().items()}

    return Pretrained("open_clip", f"{model}/{tag}", load, cache=_HF_CACHE, env="HF_HUB_OFFLINE")


@dataclasses.dataclass(frozen=True)
class Prunable:
    """Which channels ``prune --method structured`` may remove.

    Attributes:
        kind: ``residual``: the inner channels of every torchvision ResNet block; ``chain``: every
            convolution of the ``convs`` sequence, and the matching inputs of the ``linear`` layer after it.
        convs: The ``nn.Sequential`` of convolutions and batch norms (``chain``).
        linear: The first linear layer after them (``chain``).
    """

    kind: str
    convs: str = ""
    linear: str = ""


@dataclasses.dataclass(frozen=True)
class Arch:
    """What the project knows about one architecture.

    Attributes:
        name: The ``--arch`` value.
        build: ``build(num_logits, input_size)`` returns a randomly initialised ``nn.Module``.
        head: The final linear layer's name in the state dict (``fc``): its rows are the logits.
        head_prefix: Parameters under this prefix form the head ``--freeze-backbone`` leaves trainable.
        signature: State-dict keys that together identify a plain state dict as this architecture.
        input_size: The square input side it is trained and scored at.
        mean: Normalisation mean of the input, per RGB channel on [0, 1].
        std: Normalisation standard deviation.
        preprocess: The default preprocess policy of a checkpoint of this architecture.
        imagenet: torchvision publishes ImageNet weights for it (``--init imagenet``).
        prunable: Which channels ``prune --method structured`` can remove; ``None``: it cannot.
        any_size: It pools globally before its head, so it scores any input size (``native``).
        native_tiles: ``(threshold, side)``: under ``native``, an image with a side above ``threshold``
            is scored as near-equal pieces of at most ``side`` px, their log-odds averaged.
        published: Where its published weights and protocol come from, and their licence.
        layout: The wrapper key its published checkpoints keep the weights under (CNNDetection's
            ``model``): weights under that key whose signature fits are taken as this entry.
        input_size_of: ``input_size_of(state_dict)`` reads the input side from the weights, for an
            architecture whose layers depend on it; ``None`` means ``input_size``.
        train_preprocess: The policy the benchmarks train it with.
        pretrained: Where its backbone comes from when a checkpoint holds only the head.
    """

    name: str
    build: Callable[[int, int], Any]
    head: str
    head_prefix: str
    signature: tuple[str, ...]
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    preprocess: str = "resize"
    imagenet: bool = False
    prunable: Prunable | None = None
    any_size: bool = True
    native_tiles: tuple[int, int] | None = None
    published: str | None = None
    layout: str | None = None
    input_size_of: Callable[[Mapping[str, Any]], int] | None = None
    train_preprocess: str = "resize"
    pretrained: Pretrained | None = None

    @property
    def structured_pruning(self) -> bool:
        """``prune --method structured`` can remove its channels."""
        return self.prunable is not None

    def head_keys(self, keys: Any) -> bool:
        """Whether every key of ``keys`` belongs to the head: a head-only checkpoint."""
        return bool(keys) and all(k.startswith(self.head_prefix + ".") for k in keys)


def _torchvision(name: str) -> Callable[[int, int], Any]:
    def build(num_logits: int, input_size: int) -> Any:
        import torchvision.models as tvm  # torch loads only when a model is built: the registry stays light

        return tvm.get_model(name, weights=None, num_classes=num_logits)

    return build


def _resnet50_nodown(num_logits: int, input_size: int) -> Any:
    """ResNet50 whose stem keeps full resolution: stride 1 in ``conv1`` and in the max-pool
    (Gragnaniello et al. 2021, Corvi et al. 2023). Its state dict has torchvision's keys."""
    import torchvision.models as tvm  # torch loads only when a model is built

    model = tvm.resnet50(weights=None, num_classes=num_logits)
    model.conv1.stride = (1, 1)
    model.maxpool.stride = 1
    return model


def _resnet_tiny(num_logits: int, input_size: int) -> Any:
    import torchvision.models.resnet as tvr  # torch loads only when a model is built

    return tvr.ResNet(tvr.BasicBlock, [1, 1, 1, 1], num_classes=num_logits)


def _small_cnn(num_logits: int, input_size: int) -> Any:
    from aidetect_batch.detectors.nets import SmallCNN  # torch loads only when a model is built: nets imports torch

    return SmallCNN(num_logits, input_size)


def _small_cnn_input_size(state_dict: Mapping[str, Any]) -> int:
    """The CIFAKE CNN's first linear layer takes ``128 × (side / 16)²`` inputs."""
    if "head.1.weight" not in state_dict:
        return 32
    cells = int(state_dict["head.1.weight"].shape[1]) // 128
    return 16 * max(int(round(cells**0.5)), 1)


_RESIDUAL = Prunable("residual")


# The torchvision ResNet50 that the published ResNet50 detectors share: same keys, same head.
_RESNET50 = Arch(
    "resnet50",
    _torchvision("resnet50"),
    head="fc",
    head_prefix="fc",
    signature=("layer4.0.conv3.weight",),
    imagenet=True,
    prunable=_RESIDUAL,
)

REGISTRY: dict[str, Arch] = {
    arch.name: arch
    for arch in (
        _RESNET50,
        dataclasses.replace(
            _RESNET50,
            name="cnndetection",
            preprocess="native",
            imagenet=False,
            published="Wang et al. 2020, PeterWang512/CNNDetection: {'model': state_dict}, CC BY-NC-SA 4.0",
            layout="model",
        ),
        dataclasses.replace(
            _RESNET50,
            name="resnet50_nodown",
            build=_resnet50_nodown,
            preprocess="native",
            imagenet=False,
            prunable=None,
            native_tiles=(1536, 1024),
            published="Corvi et al. 2023, grip-unina/DMimageDetection (Grag2021_*): GRIP licence, non-profit use only",
        ),
        Arch(
            "mobilenet_v2",
            _torchvision("mobilenet_v2"),
            head="classifier.1",
            head_prefix="classifier",
            signature=("features.18.0.weight",),
            imagenet=True,
        ),
        Arch(
            "efficientnet_b0",
            _torchvision("efficientnet_b0"),
            head="classifier.1",
            head_prefix="classifier",
            signature=("features.1.0.block.0.0.weight",),
            imagenet=True,
        ),
        Arch(
            "cifake_cnn",
            _small_cnn,
            head="head.4",
            head_prefix="head",
            signature=("head.4.weight", "features.0.weight"),
            input_size=32,
            prunable=Prunable("chain", convs="features", linear="head.1"),
            any_size=False,
            input_size_of=_small_cnn_input_size,
            train_preprocess="center-crop",
        ),
        Arch(
            "resnet_tiny",
            _resnet_tiny,
            head="fc",
            head_prefix="fc",
            signature=("fc.weight", "layer1.0.conv1.weight"),
            prunable=_RESIDUAL,
        ),
    )
}
ARCHS = tuple(REGISTRY)
DEFAULT_ARCH = "resnet50"
# The CIFAKE study's small CNN: it trains from scratch on a CPU in minutes, so the demo and the
# benchmarks that train or scan many small images use it.
SMALL_ARCH = "cifake_cnn"
# A ResNet with one block per stage: the benchmarks' and tests' stand-in for a ResNet.
TINY_ARCH = "resnet_tiny"


def get(name: str) -> Arch:
    """The registry entry of ``name``; raises ``KeyError`` naming the choices."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHS)}") from None


def check_arch(name: str) -> None:
    """Refuse an unknown ``--arch``; raises :class:`ConfigError` naming the choices."""
    if name not in REGISTRY:
        raise ConfigError(f"--arch must be one of {', '.join(ARCHS)}, not {name!r}")


def register(arch: Arch) -> Arch:
    """Add (or replace) an entry, for architectures defined outside this module (plugins, tests).

    The scan ships the entry of its checkpoint's architecture to its workers, so an entry registered
    in the driver also scores there."""
    REGISTRY[arch.name] = arch
    return arch


def guess(keys: set[str] | dict[str, Any], layout: str | None = None) -> str:
    """The architecture of a plain state dict from its keys: the first entry whose signature it holds.

    Entries published under ``layout`` (the wrapper key the weights came under) are tried first, then
    all in registry order, so the more specific signature wins; default: the layout's entry, else
    ``resnet50``."""
    ordered = [a for a in REGISTRY.values() if layout is not None and a.layout == layout]
    for arch in [*ordered, *REGISTRY.values()]:
        if all(key in keys for key in arch.signature):
            return arch.name
    return ordered[0].name if ordered else DEFAULT_ARCH


def layout_owner(layout: str) -> str | None:
    """The entry whose published checkpoints use the wrapper key ``layout``, if any."""
    return next((a.name for a in REGISTRY.values() if a.layout == layout), None)


def names(predicate: Callable[[Arch], bool]) -> tuple[str, ...]:
    """Names of the architectures for which ``predicate`` holds (``names(lambda a: a.imagenet)``)."""
    return tuple(a.name for a in REGISTRY.values() if predicate(a))
