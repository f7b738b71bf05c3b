"""Detector architectures and checkpoint loading.

Three checkpoint formats are accepted, all read with
``torch.load(weights_only=True)`` so a checkpoint can never run code:

a. the project's own format (:func:`save_checkpoint`): a dict with
   ``format == "aidetect-batch"``, ``state_dict`` and metadata (arch, number
   of logits, AI class index, mean/std, preprocess policy, threshold, info);
b. a published layout: the weights under ``model`` (CNNDetection, GRIP), ``state_dict`` or ``net``;
c. a plain state dict with a 1- or 2-logit head.

Any of them may hold only the head (a linear probe) of an architecture whose
registry entry has a ``pretrained`` backbone: the backbone then comes from
that library's weights.

The score is P(AI-generated): sigmoid of a single logit, or the softmax
probability of the AI class for two logits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
from typing import Any

import torch
from torch import nn

from aidetect_batch.detectors import registry
from aidetect_batch.errors import CheckpointError
from aidetect_batch.storage import filesystem

FORMAT_NAME = "aidetect-batch"
FORMAT_VERSION = 1
IMAGENET_MEAN = registry.IMAGENET_MEAN
IMAGENET_STD = registry.IMAGENET_STD
CLASS_NAMES = ("real", "ai")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"

# Architectures with ImageNet weights in torchvision (``--init imagenet``).
IMAGENET_ARCHS = registry.names(lambda a: a.imagenet)
DEFAULT_INPUT_SIZE = 224


def default_input_size(arch: str) -> int:
    """Input side the architecture is trained at unless told otherwise."""
    return _arch(arch).input_size


def build_model(arch: str, num_logits: int, input_size: int | None = None) -> nn.Module:
    """A randomly initialised detector of a registered architecture (:mod:`aidetect_batch.detectors.registry`).

    Raises:
        CheckpointError: ``arch`` is not registered.
    """
    entry = _arch(arch)
    return entry.build(num_logits, input_size or entry.input_size)


def pretrained_backbone(arch: str) -> dict[str, torch.Tensor]:
    """The backbone weights of ``arch`` from its registry entry's pretrained hook, head keys left out.

    Raises:
        CheckpointError: ``arch`` has no pretrained hook, or its weights cannot be loaded (offline,
            library missing); the message names the cache and the environment variable.
    """
    entry = _arch(arch)
    source = entry.pretrained
    if source is None:
        raise CheckpointError(
            f"this checkpoint holds only the head of {arch}, whose registry entry has no pretrained backbone"
        )
    try:
        weights = source.load()
    except ImportError as exc:
        raise CheckpointError(
            f"the {arch} backbone comes from {source.library} ({source.name}), which is not installed: {exc}"
        ) from None
    except (OSError, RuntimeError, ValueError, TimeoutError) as exc:
        raise CheckpointError(
            f"the {arch} backbone needs {source.library}'s pretrained weights {source.name}, which could not be "
            f"loaded ({type(exc).__name__}: {str(exc)[:200]}). Offline, they must already be in {source.cache}; "
            f"fetch them on a machine with internet and copy that cache here (see {source.env})."
        ) from None
    prefix = entry.head_prefix + "."
    return {k: v for k, v in weights.items() if not k.startswith(prefix)}


def _arch(name: str) -> registry.Arch:
    try:
        return registry.get(name)
    except KeyError as exc:
        raise CheckpointError(exc.args[0]) from None


@dataclasses.dataclass
class Checkpoint:
    """A loaded detector checkpoint and the metadata the scan needs."""

    arch: str
    num_logits: int
    ai_class_index: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    preprocess: str | None
    threshold: float
    info: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    model_id: str
    kind: str
    input_size: int = DEFAULT_INPUT_SIZE
    pruning: dict[str, Any] | None = None
    head_only: bool = False

    @property
    def structured(self) -> bool:
        """True when channels were removed: layer widths come from the weights, not the architecture."""
        return bool(self.pruning) and self.pruning.get("method") == "structured"

    def build(self) -> nn.Module:
        """Instantiate the architecture and load the weights; raises :class:`CheckpointError` on mismatch."""
        model = build_model(self.arch, self.num_logits, self.input_size)
        weights = {**pretrained_backbone(self.arch), **self.state_dict} if self.head_only else self.state_dict
        if self.structured:
            conform(model, weights)
        try:
            result = model.load_state_dict(weights, strict=False)
        except RuntimeError as exc:
            raise CheckpointError(
                f"checkpoint weights do not fit {self.arch} with {self.num_logits} logit(s): "
                f"{str(exc).splitlines()[-1].strip()} (pass --arch if it is another architecture)"
            ) from None
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(
                f"checkpoint does not match {self.arch}: "
                f"missing keys {_few(result.missing_keys)}, unexpected keys {_few(result.unexpected_keys)} "
                "(pass --arch if it is another architecture)"
            )
        return model.eval()

    def metadata(self) -> dict[str, Any]:
        """Metadata without weights, for ``_run.json``."""
        return {
            "kind": self.kind,
            "arch": self.arch,
            "num_logits": self.num_logits,
            "ai_class_index": self.ai_class_index,
            "mean": list(self.mean),
            "std": list(self.std),
            "preprocess": self.preprocess,
            "input_size": self.input_size,
            "threshold": self.threshold,
            "pruning": self.pruning,
            "head_only": self.head_only,
            "info": self.info,
            "model_id": self.model_id,
        }


def _few(keys: list[str], n: int = 5) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# Prefixes that wrappers add to every key: DistributedDataParallel/DataParallel, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Keys the weights of a published checkpoint sit under, tried in this order.
_WRAPPERS = ("model", "state_dict", "net")


@dataclasses.dataclass(frozen=True)
class Unwrapped:
    """The weights of a checkpoint and the wrapper key they were under (``None``: a bare state dict)."""

    state_dict: dict[str, torch.Tensor]
    wrapper: str | None


def unwrap(obj: Any) -> Unwrapped | None:
    """The state dict inside a loaded checkpoint: under ``model``, ``state_dict`` (also the project's own
    format) or ``net``, or bare; ``module.`` and ``_orig_mod.`` prefixes stripped. ``None`` when
    ``obj`` holds no weights. ``scan`` and ``--init`` both read weights through it. Under a wrapper key the
    dict is taken as the authors saved it; a bare dict must hold only tensors, or it is no state dict."""
    if not isinstance(obj, dict):
        return None
    wrapper = next((k for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
    weights = obj[wrapper] if wrapper is not None else obj
    usable = wrapper is not None or all(isinstance(v, torch.Tensor) for v in weights.values())
    if not weights or not usable:
        return None
    return Unwrapped(_strip_prefix(weights), wrapper)


def _strip_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    stripped = True
    while stripped and state_dict:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
                stripped = True
    return state_dict


def _as_head(state_dict: dict[str, Any], arch: str) -> dict[str, Any]:
    """A bare linear layer's ``weight``/``bias`` named as ``arch``'s head; other state dicts as they are."""
    if state_dict and set(state_dict) <= {"weight", "bias"}:
        return {f"{_arch(arch).head}.{k}": v for k, v in state_dict.items()}
    return state_dict


def _is_head_only(state_dict: dict[str, Any], arch: str) -> bool:
    entry = _arch(arch)
    return entry.pretrained is not None and entry.head_keys(state_dict)


def _head_logits(state_dict: dict[str, Any], arch: str) -> int:
    key = _arch(arch).head + ".weight"
    if key not in state_dict:
        raise CheckpointError(
            f"checkpoint has no {key!r} for a {arch} head; found keys like {_few(sorted(state_dict), 3)} "
            "(pass --arch if it is another architecture)"
        )
    n = int(state_dict[key].shape[0])
    if n not in (1, 2):
        raise CheckpointError(
            f"the {arch} head has {n} outputs; a detector needs 1 (P(AI) by sigmoid) or 2 (real/ai) "
            "- is this an ImageNet classifier rather than a real-vs-AI detector?"
        )
    return n


def read_checkpoint_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """Read a checkpoint file (local or remote); raises :class:`CheckpointError` when unreadable."""
    try:
        fs, path = filesystem(uri, storage_options)
        with fs.open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {uri!r} does not exist") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {uri!r} cannot be read: {exc}") from None


def parse_checkpoint(
    data: bytes,
    arch: str | None = None,
    ai_class_index: int | None = None,
) -> Checkpoint:
    """Parse checkpoint bytes in any accepted format.

    Args:
        data: The checkpoint file's bytes.
        arch: Architecture for plain state dicts; guessed from the keys when ``None``.
        ai_class_index: Which of two logits is "AI" for plain state dicts (default 1).
    """
    model_id = hashlib.sha256(data).hexdigest()[:16]
    if not data.startswith((_ZIP_MAGIC, _PICKLE_MAGIC)):
        raise CheckpointError("not a PyTorch checkpoint: the file is neither a torch.save zip nor a pickle")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = str(exc).splitlines()
        detail = next((ln.strip() for ln in lines if "GLOBAL" in ln), lines[0] if lines else "")
        raise CheckpointError(
            "checkpoint refused: it contains Python objects beyond tensors and plain containers, and "
            f"loading it would run code ({detail[:200]}). Re-save it as a state dict."
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CheckpointError(f"not a PyTorch checkpoint: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, expected a dict of tensors")

    if obj.get("format") == FORMAT_NAME:
        try:
            own_arch = obj["arch"]
            return Checkpoint(
                arch=obj["arch"],
                num_logits=int(obj["num_logits"]),
                ai_class_index=int(obj.get("ai_class_index", 1 if int(obj["num_logits"]) == 2 else 0)),
                mean=tuple(obj.get("mean", IMAGENET_MEAN)),
                std=tuple(obj.get("std", IMAGENET_STD)),
                preprocess=obj.get("preprocess"),
                threshold=float(obj.get("threshold", 0.5)),
                info=dict(obj.get("info", {})),
                state_dict=_strip_prefix(obj["state_dict"]),
                model_id=model_id,
                kind="aidetect-batch",
                input_size=int(obj.get("input_size", default_input_size(own_arch))),
                pruning=obj.get("pruning"),
                head_only=obj.get("weights") == "head" or _is_head_only(obj["state_dict"], own_arch),
            )
        except KeyError as exc:
            raise CheckpointError(f"aidetect-batch checkpoint lacks the field {exc}") from None

    state_dict, kind, arch = _published_layout(obj, arch)
    state_dict = _as_head(state_dict, arch)
    num_logits = _head_logits(state_dict, arch)
    return Checkpoint(
        arch=arch,
        num_logits=num_logits,
        ai_class_index=(1 if ai_class_index is None else ai_class_index) if num_logits == 2 else 0,
        mean=_arch(arch).mean,
        std=_arch(arch).std,
        preprocess=_arch(arch).preprocess,
        threshold=0.5,
        info={},
        state_dict=state_dict,
        model_id=model_id,
        kind=kind,
        input_size=_input_size_of(state_dict, arch),
        head_only=_is_head_only(state_dict, arch),
    )


def _published_layout(obj: dict[str, Any], arch: str | None) -> tuple[dict[str, Any], str, str]:
    """The state dict, layout kind and architecture of a checkpoint as its authors ship it.

    The weights are found by :func:`unwrap`. Weights under a wrapper key that a registry entry publishes
    with (its ``layout``: CNNDetection's ``model``) default to that entry, and the layout takes its name.
    Strides are not in a state dict, so an entry like ``resnet50_nodown``, whose weights look exactly
    like another's, is never guessed and must be named with ``--arch``.
    """
    found = unwrap(obj)
    if found is not None:
        if found.wrapper is None:
            return found.state_dict, "state_dict", arch or registry.guess(found.state_dict)
        kind = registry.layout_owner(found.wrapper) or found.wrapper
        return found.state_dict, kind, arch or registry.guess(found.state_dict, layout=found.wrapper)
    raise CheckpointError(
        "unrecognised checkpoint layout: expected an aidetect-batch checkpoint, a state dict under "
        "'model' (CNNDetection, GRIP), 'state_dict' or 'net', or a plain state dict"
    )


def _input_size_of(state_dict: dict[str, Any], arch: str) -> int:
    entry = _arch(arch)
    return entry.input_size if entry.input_size_of is None else entry.input_size_of(state_dict)


def save_checkpoint(
    path: str,
    model: nn.Module,
    arch: str,
    *,
    num_logits: int = 1,
    ai_class_index: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    preprocess: str | None = None,
    threshold: float = 0.5,
    input_size: int | None = None,
    info: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    pruning: dict[str, Any] | None = None,
    head_only: bool = False,
) -> None:
    """Write ``model`` in the project's own checkpoint format (local or remote): every writer of a
    checkpoint goes through here, so each one records its normalisation, logits and policy.

    ``mean``, ``std`` and ``preprocess`` default to the architecture's registry entry. ``pruning``
    records how the model was pruned; ``{"method": "structured"}`` tells loaders to take layer widths
    from the saved weights. ``head_only`` keeps only the head's weights, for an architecture whose
    backbone comes from its pretrained hook.
    """
    entry = _arch(arch)
    weights = model.state_dict()
    if head_only:
        if entry.pretrained is None:
            raise CheckpointError(f"a head-only checkpoint needs a pretrained backbone; {arch} has none")
        weights = {k: v for k, v in weights.items() if k.startswith(entry.head_prefix + ".")}
    payload = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "arch": arch,
        "num_logits": num_logits,
        "class_names": list(CLASS_NAMES),
        "ai_class_index": (1 if num_logits == 2 else 0) if ai_class_index is None else ai_class_index,
        "mean": list(entry.mean if mean is None else mean),
        "std": list(entry.std if std is None else std),
        "input_size": input_size or entry.input_size,
        "preprocess": preprocess or entry.preprocess,
        "threshold": threshold,
        "pruning": pruning,
        "info": info or {},
        "weights": "head" if head_only else "all",
        "state_dict": weights,
    }
    if head_only:
        payload["pretrained"] = {"library": entry.pretrained.library, "name": entry.pretrained.name}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    fs, inner = filesystem(path, storage_options)
    parent = inner.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(inner, "wb") as handle:
        handle.write(buffer.getvalue())


def conform(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Resize convolutions, batch norms and linear layers in place to the shapes in ``state_dict``.

    A structurally pruned model keeps its architecture's code but has fewer
    channels; its checkpoint's weights say how many. Layers whose shapes
    already match are untouched, so this is a no-op for an unpruned model.
    """
    for name, module in model.named_modules():
        weight = state_dict.get(f"{name}.weight")
        if weight is None or not isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
            continue
        if tuple(weight.shape) == tuple(module.weight.shape):
            continue
        module.weight = nn.Parameter(torch.empty_like(weight))
        bias = state_dict.get(f"{name}.bias")
        if bias is not None and module.bias is not None:
            module.bias = nn.Parameter(torch.empty_like(bias))
        if isinstance(module, nn.Conv2d):
            module.out_channels, module.in_channels = weight.shape[0], weight.shape[1] * module.groups
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = weight.shape
        else:
            module.num_features = weight.shape[0]
            module.register_buffer("running_mean", torch.zeros(weight.shape[0]))
            module.register_buffer("running_var", torch.ones(weight.shape[0]))
    return model


def _offline_hint(arch: str, url: str) -> str:
    name = url.rsplit("/", 1)[-1]
    return (
        f"--init imagenet could not download torchvision's ImageNet weights for {arch} ({url}). "
        f"This machine looks offline. Download {name} on a machine with internet, put it in "
        f"$TORCH_HOME/hub/checkpoints/ (default ~/.cache/torch/hub/checkpoints/), or pass --init {name}; "
        "--init none trains from random weights."
    )


def imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """torchvision's default ImageNet weights for ``arch`` (downloaded once, then cached by torch.hub).

    Raises:
        CheckpointError: ``arch`` has no ImageNet weights, or the download failed (offline).
    """
    import urllib.error

    import torchvision.models as tvm

    if arch not in IMAGENET_ARCHS:
        raise CheckpointError(
            f"--init imagenet: {arch} has no ImageNet weights; use --init none or --init PATH "
            f"(ImageNet weights exist for {', '.join(IMAGENET_ARCHS)})"
        )
    weights = tvm.get_model_weights(arch).DEFAULT
    try:
        return weights.get_state_dict(progress=False)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise CheckpointError(f"{_offline_hint(arch, weights.url)} ({type(exc).__name__}: {exc})") from None


def _load_state_dict_lenient(data: bytes, arch: str) -> dict[str, torch.Tensor]:
    """The weights of any checkpoint layout, unwrapped as ``scan`` does; a head-only one gets its backbone."""
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CheckpointError(f"--init: not a loadable weights file ({str(exc).splitlines()[0][:200]})") from None
    found = unwrap(obj)
    if found is None:
        raise CheckpointError("--init: the file holds no state dict of tensors")
    weights = _as_head(found.state_dict, arch)
    if _is_head_only(weights, arch):
        return {**pretrained_backbone(arch), **weights}
    return weights


def initial_model(
    arch: str,
    num_logits: int,
    init: str,
    *,
    input_size: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build a detector to fine-tune, initialised from ImageNet, a weights file, or at random.

    Weights whose name and shape fit are copied; the rest (typically a
    1000-class ImageNet head) keep their fresh initialisation. Returns the
    model and a record of what was loaded, for the checkpoint's metadata.

    Raises:
        CheckpointError: offline ``imagenet``, an unreadable file, or a file sharing no weights with ``arch``.
    """
    model = build_model(arch, num_logits, input_size)
    if init == "none":
        return model, {"init": "none"}
    if init == "imagenet":
        source = imagenet_state_dict(arch)
    else:
        data = read_checkpoint_bytes(init, storage_options)
        pruned = _pruned_checkpoint(data)
        if pruned is not None:
            if pruned.arch != arch or pruned.num_logits != num_logits:
                raise CheckpointError(
                    f"--init {init}: a pruned {pruned.arch} with {pruned.num_logits} logit(s) cannot start a {arch}"
                )
            return pruned.build(), {"init": init, "loaded": len(pruned.state_dict), "pruning": pruned.pruning}
        source = _load_state_dict_lenient(data, arch)
    own = model.state_dict()
    fitting = {k: v for k, v in source.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not fitting:
        raise CheckpointError(f"--init {init}: no weight fits {arch} (is it another architecture?)")
    model.load_state_dict(fitting, strict=False)
    fresh = sorted(set(own) - set(fitting))
    return model, {"init": init, "loaded": len(fitting), "fresh": fresh[:20], "fresh_count": len(fresh)}


def _pruned_checkpoint(data: bytes) -> Checkpoint | None:
    """The checkpoint when it records a pruning (its weights are taken whole, masks and widths included)."""
    try:
        ckpt = parse_checkpoint(data)
    except CheckpointError:
        return None
    return ckpt if ckpt.pruning else None


def head_parameters(model: nn.Module, arch: str) -> list[nn.Parameter]:
    """Parameters of the classification head: what ``--freeze-backbone`` leaves trainable."""
    prefix = _arch(arch).head_prefix
    return [p for name, p in model.named_parameters() if name.startswith(prefix + ".")]


def scores_from_logits(logits: torch.Tensor, ai_class_index: int) -> torch.Tensor:
    """P(AI) from a ``(N, 1)`` or ``(N, 2)`` logit tensor, as float32."""
    logits = logits.float()
    if logits.shape[1] == 1:
        return torch.sigmoid(logits[:, 0])
    return torch.softmax(logits, dim=1)[:, ai_class_index]


def log_odds_from_logits(logits: torch.Tensor, ai_class_index: int) -> torch.Tensor:
    """log(P(AI) / P(real)) from a ``(N, 1)`` or ``(N, 2)`` logit tensor: the value tiles are averaged in."""
    logits = logits.float()
    if logits.shape[1] == 1:
        return logits[:, 0]
    return logits[:, ai_class_index] - logits[:, 1 - ai_class_index]
