"""The architecture registry: one entry per detector architecture, and nothing else knows their facts.

Config validation, checkpoint parsing, training, pruning and the tests read
from :data:`REGISTRY`. It imports no torch, so the config can be checked in a
second before anything heavy loads; each entry's builder imports torchvision
only when a model is built. Adding an architecture is one :class:`Arch` entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from aidetect_batch.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
        structured_pruning: ``prune --method structured`` can remove its channels.
        any_size: It pools globally before its head, so it scores any input size (``native``).
        native_tiles: ``(threshold, side)``: under ``native``, an image with a side above ``threshold``
            is scored as near-equal pieces of at most ``side`` px, their log-odds averaged.
        published: Where its published weights and protocol come from, and their licence.
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
    structured_pruning: bool = False
    any_size: bool = True
    native_tiles: tuple[int, int] | None = None
    published: str | None = None


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


# The torchvision ResNet50 that the published ResNet50 detectors share: same keys, same head.
_RESNET50 = Arch(
    "resnet50",
    _torchvision("resnet50"),
    head="fc",
    head_prefix="fc",
    signature=("layer4.0.conv3.weight",),
    imagenet=True,
    structured_pruning=True,
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
        ),
        dataclasses.replace(
            _RESNET50,
            name="resnet50_nodown",
            build=_resnet50_nodown,
            preprocess="native",
            imagenet=False,
            structured_pruning=False,
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
            structured_pruning=True,
            any_size=False,
        ),
        Arch(
            "resnet_tiny",
            _resnet_tiny,
            head="fc",
            head_prefix="fc",
            signature=("fc.weight", "layer1.0.conv1.weight"),
            structured_pruning=True,
        ),
    )
}
ARCHS = tuple(REGISTRY)
DEFAULT_ARCH = "resnet50"


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


def guess(keys: set[str] | dict[str, Any]) -> str:
    """The architecture of a plain state dict from its keys: the first entry whose signature it holds.
    Entries are tried in registry order, so the more specific signature wins; default ``resnet50``."""
    for arch in REGISTRY.values():
        if all(key in keys for key in arch.signature):
            return arch.name
    return DEFAULT_ARCH


def names(predicate: Callable[[Arch], bool]) -> tuple[str, ...]:
    """Names of the architectures for which ``predicate`` holds (``names(lambda a: a.imagenet)``)."""
    return tuple(a.name for a in REGISTRY.values() if predicate(a))
