"""``aidetect-batch prune``: smaller detectors, with the size and speed they really have.

Two methods, because they do different things:

- ``unstructured``: L1 magnitude pruning of every convolution and linear
  weight (``torch.nn.utils.prune.l1_unstructured``, made permanent). The
  zeros are stored densely: the file, the shapes and dense inference speed
  stay the same. The report measures that rather than asserting it.
- ``structured``: removes whole channels. In each residual block the inner
  channels (``conv1``/``conv2`` outputs of a Bottleneck, ``conv1`` of a
  BasicBlock) with the smallest L1 filter norms are cut, and the batch norm
  and the next convolution shrink to match; in the CIFAKE CNN every
  convolution is cut and the first linear layer loses the matching inputs.
  Residual-stream channels are kept, since the skip connections tie them
  across blocks, so the parameter reduction is below the amount: the report
  gives the real count. Which of the two an architecture supports is its
  registry entry's ``prunable`` (:class:`aidetect_batch.detectors.registry.Prunable`).

After pruning, each model is fine-tuned with the training job
(:func:`aidetect_batch.train.trainer.run_train`, ``--init`` the pruned
checkpoint, validation measured before the first epoch) and written in the
project's checkpoint format with ``pruning`` metadata, so ``scan`` loads it
as is.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from typing import Any

import torch
from torch import nn

from aidetect_batch import schema
from aidetect_batch.detectors import checkpoints, policies, registry
from aidetect_batch.errors import ConfigError
from aidetect_batch.storage import claim_output, filesystem, join, write_json, write_parquet
from aidetect_batch.train import plots
from aidetect_batch.train.config import PruneConfig, TrainConfig
from aidetect_batch.train.trainer import TrainResult, run_train
from aidetect_batch.train.tuning import TuneSummary, tune_and_train

_logger = logging.getLogger(__name__)

_OWN_ENTRIES = ("pruned", "prune.parquet", "prune.md", "prune.png", "prune.json")


def count_parameters(net: nn.Module) -> tuple[int, int]:
    """(all parameters, non-zero parameters)."""
    total = sum(p.numel() for p in net.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in net.parameters())
    return total, nonzero


def prune_unstructured(net: nn.Module, amount: float) -> nn.Module:
    """A copy with ``amount`` of each conv/linear weight zeroed by L1 magnitude, made permanent."""
    from torch.nn.utils import prune

    pruned = copy.deepcopy(net)
    if amount <= 0:
        return pruned
    for module in pruned.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            prune.l1_unstructured(module, "weight", amount=amount)
            prune.remove(module, "weight")
    return pruned


def _keep(conv: nn.Conv2d, amount: float) -> torch.Tensor:
    """Indices of the output channels with the largest L1 filter norms, in order."""
    norms = conv.weight.detach().abs().sum(dim=(1, 2, 3))
    keep = max(1, int(round(conv.out_channels * (1.0 - amount))))
    return torch.sort(torch.topk(norms, keep).indices).values


def _cut_out(conv: nn.Conv2d, bn: nn.BatchNorm2d, keep: torch.Tensor) -> None:
    conv.weight = nn.Parameter(conv.weight.detach()[keep].clone())
    if conv.bias is not None:
        conv.bias = nn.Parameter(conv.bias.detach()[keep].clone())
    conv.out_channels = len(keep)
    bn.weight = nn.Parameter(bn.weight.detach()[keep].clone())
    bn.bias = nn.Parameter(bn.bias.detach()[keep].clone())
    bn.register_buffer("running_mean", bn.running_mean[keep].clone())
    bn.register_buffer("running_var", bn.running_var[keep].clone())
    bn.num_features = len(keep)


def _cut_in(conv: nn.Conv2d, keep: torch.Tensor) -> None:
    conv.weight = nn.Parameter(conv.weight.detach()[:, keep].clone())
    conv.in_channels = len(keep)


def prune_structured(net: nn.Module, arch: str, amount: float) -> nn.Module:
    """A copy with ``amount`` of the prunable channels physically removed (see the module docstring).

    Raises:
        ConfigError: the architecture is not supported.
    """
    prunable = registry.get(arch).prunable if arch in registry.REGISTRY else None
    if prunable is None:
        supported = registry.names(lambda a: a.structured_pruning)
        raise ConfigError(f"structured pruning supports {', '.join(supported)}, not {arch}; use --method unstructured")
    pruned = copy.deepcopy(net)
    if amount <= 0:
        return pruned
    if prunable.kind == "chain":
        _prune_chain(pruned.get_submodule(prunable.convs), pruned.get_submodule(prunable.linear), amount)
    else:
        _prune_residual(pruned, amount)
    return pruned


def _prune_chain(features: nn.Module, linear: nn.Linear, amount: float) -> None:
    """Cut every convolution of a plain chain, and the inputs of the linear layer that reads its output."""
    convs = [m for m in features if isinstance(m, nn.Conv2d)]
    bns = [m for m in features if isinstance(m, nn.BatchNorm2d)]
    keep: torch.Tensor | None = None
    for conv, bn in zip(convs, bns, strict=True):
        if keep is not None:
            _cut_in(conv, keep)
        channels = conv.out_channels
        keep = _keep(conv, amount)
        _cut_out(conv, bn, keep)
    cells = linear.in_features // channels
    columns = (keep[:, None] * cells + torch.arange(cells)[None, :]).reshape(-1)
    linear.weight = nn.Parameter(linear.weight.detach()[:, columns].clone())
    linear.in_features = len(columns)


def _prune_residual(pruned: nn.Module, amount: float) -> None:
    """Cut the inner channels of every torchvision ResNet block."""
    import torchvision.models.resnet as tvr  # torchvision's block classes, needed only for this method

    for block in pruned.modules():
        if isinstance(block, tvr.Bottleneck):
            pairs = [(block.conv1, block.bn1, block.conv2), (block.conv2, block.bn2, block.conv3)]
        elif isinstance(block, tvr.BasicBlock):
            pairs = [(block.conv1, block.bn1, block.conv2)]
        else:
            continue
        for conv, bn, following in pairs:
            keep = _keep(conv, amount)
            _cut_out(conv, bn, keep)
            _cut_in(following, keep)


def throughput(net: nn.Module, size: int, batch_size: int, *, batches: int, rounds: int = 2) -> float:
    """Bare-model inference images/s on CPU (fp32, eval mode); the best of ``rounds`` timed loops."""
    net = net.eval()
    x = torch.randn(batch_size, 3, size, size)
    best = 0.0
    with torch.inference_mode():
        net(x)
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(batches):
                net(x)
            best = max(best, batch_size * batches / (time.perf_counter() - start))
    return best


def _file_size(uri: str, storage_options: dict[str, Any]) -> int:
    fs, path = filesystem(uri, storage_options)
    return int(fs.size(path))


@dataclasses.dataclass
class PruneResult:
    """What a pruning study produced: one row per amount (the baseline first)."""

    out: str
    rows: list[dict[str, Any]]
    markdown: str


def _describe(row: dict[str, Any], base: dict[str, Any]) -> str:
    size_mb, base_mb = row["file_bytes"] / 1e6, base["file_bytes"] / 1e6
    if row["amount"] == 0:
        return f"unpruned baseline: {row['params']:,} parameters, {size_mb:.1f} MB"
    if row["method"] == "unstructured":
        return (
            f"{row['amount']:.0%} unstructured: {row['nonzero'] / row['params']:.0%} of weights non-zero but the "
            f"same {row['params']:,} dense parameters and a {size_mb:.1f} MB file (baseline {base_mb:.1f} MB); "
            f"measured dense speed {row['speedup']:.2f}x the unpruned model"
        )
    return (
        f"{row['amount']:.0%} structured: {row['params'] / base['params']:.0%} of the parameters, "
        f"{size_mb:.1f} MB (baseline {base_mb:.1f} MB), measured speed {row['speedup']:.2f}x the unpruned model"
    )


def markdown_table(rows: list[dict[str, Any]], device: str) -> str:
    """The report as a Markdown table plus one measured sentence per amount."""
    base = rows[0]
    lines = [
        f"| amount | method | parameters | non-zero | file MB | val acc before → after | val AP before → after "
        f"| val AUC before → after | images/s ({device}) | speed vs unpruned |",
        "|---:|---|---:|---:|---:|---|---|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['amount']:.0%} | {r['method']} | {r['params']:,} | {r['nonzero']:,} | {r['file_bytes'] / 1e6:.1f} "
            f"| {r['val_accuracy_before']:.3f} → {r['val_accuracy_after']:.3f} "
            f"| {r['val_ap_before']:.3f} → {r['val_ap_after']:.3f} "
            f"| {r['val_auc_before']:.3f} → {r['val_auc_after']:.3f} "
            f"| {r['images_per_s']:.1f} | {r['speedup']:.2f}x |"
        )
    lines.append("")
    lines += [f"- {_describe(r, base)}" for r in rows]
    return "\n".join(lines) + "\n"


def run_prune(cfg: PruneConfig) -> PruneResult:
    """Prune at every amount, fine-tune each with the training job, measure, and report.

    Raises:
        ConfigError: bad arguments, an unsupported architecture, or a non-empty OUT.
        CheckpointError: an unusable checkpoint.
    """
    claim_output(
        cfg.out,
        _OWN_ENTRIES + tuple(_amount_dir(a) for a in cfg.all_amounts),
        cfg.overwrite,
        storage_options=cfg.storage_options,
    )
    ckpt = checkpoints.parse_checkpoint(checkpoints.read_checkpoint_bytes(cfg.checkpoint, cfg.storage_options))
    if ckpt.num_logits != 1:
        raise ConfigError("pruning fine-tunes one-logit detectors (the training job's format)")
    base = ckpt.build()
    rows: list[dict[str, Any]] = []
    finals: list[nn.Module] = []
    for amount in cfg.all_amounts:
        start_uri, record = _save_pruned(cfg, ckpt, base, amount)
        result, tuned = _fine_tune(cfg, ckpt, amount, start_uri=start_uri)
        final = checkpoints.parse_checkpoint(
            checkpoints.read_checkpoint_bytes(result.checkpoint, cfg.storage_options)
        ).build()
        finals.append(final)
        rows.append(_row(cfg, result, final=final, record=record, tuned=tuned))
    device = _measure_throughput(cfg, rows, finals=finals, input_size=ckpt.input_size)
    text = markdown_table(rows, device)
    _write_report(cfg, rows, text=text, device=device, arch=ckpt.arch)
    return PruneResult(cfg.out, rows, text)


def _save_pruned(
    cfg: PruneConfig, ckpt: checkpoints.Checkpoint, base: nn.Module, amount: float
) -> tuple[str, dict[str, Any]]:
    """Prune ``base`` by ``amount`` and save it as the starting point of its fine-tuning."""
    if cfg.method == "structured":
        pruned = prune_structured(base, ckpt.arch, amount)
    else:
        pruned = prune_unstructured(base, amount)
    params, nonzero = count_parameters(pruned)
    record = {"method": cfg.method if amount else "none", "amount": amount, "source": cfg.checkpoint}
    start_uri = join(cfg.out, "pruned", f"{_amount_dir(amount)}.pt")
    checkpoints.save_checkpoint(
        start_uri,
        pruned,
        ckpt.arch,
        num_logits=ckpt.num_logits,
        ai_class_index=ckpt.ai_class_index,
        mean=ckpt.mean,
        std=ckpt.std,
        preprocess=ckpt.preprocess or policies.DEFAULT_POLICY,
        threshold=ckpt.threshold,
        input_size=ckpt.input_size,
        pruning=record,
        info={"pruned_from": cfg.checkpoint, "params": params, "nonzero": nonzero},
        storage_options=cfg.storage_options,
    )
    _logger.info(
        "amount %.0f%% (%s): %d parameters, %d non-zero; fine-tuning", 100 * amount, cfg.method, params, nonzero
    )
    return start_uri, record


def _fine_tune(
    cfg: PruneConfig, ckpt: checkpoints.Checkpoint, amount: float, *, start_uri: str
) -> tuple[TrainResult, TuneSummary | None]:
    """Fine-tune the pruned model with the training job (or a Ray Tune search over it)."""
    train_cfg = TrainConfig(
        dataset=cfg.dataset,
        out=join(cfg.out, _amount_dir(amount)),
        arch=ckpt.arch,
        init=start_uri,
        input_size=ckpt.input_size,
        preprocess=ckpt.preprocess or policies.DEFAULT_POLICY,
        epochs=cfg.epochs,
        patience=cfg.epochs,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        storage_options=cfg.storage_options,
        validate_first=True,
        keep_zeros=cfg.method == "unstructured" and amount > 0,
        **cfg.train_options.as_kwargs(),
    )
    if not cfg.tune:
        return run_train(train_cfg), None
    result, tuned = tune_and_train(train_cfg, cfg.tune_trials)
    kept = join(train_cfg.out, schema.MODEL_FILE)
    fs, target = filesystem(kept, cfg.storage_options)
    fs.copy(filesystem(result.checkpoint, cfg.storage_options)[1], target)
    return dataclasses.replace(result, checkpoint=kept), tuned


def _row(
    cfg: PruneConfig, result: TrainResult, *, final: nn.Module, record: dict[str, Any], tuned: TuneSummary | None
) -> dict[str, Any]:
    """One amount's report row: size, validation before and after fine-tuning, the kept checkpoint."""
    before = result.history[0]
    kept = next(h for h in result.history if h["epoch"] == result.val_metrics["epoch"])
    params, nonzero = count_parameters(final)
    return {
        "amount": record["amount"],
        "method": record["method"],
        "params": params,
        "nonzero": nonzero,
        "file_bytes": _file_size(result.checkpoint, cfg.storage_options),
        "val_accuracy_before": before["val_accuracy"],
        "val_ap_before": before["val_ap"],
        "val_auc_before": before["val_auc"],
        "val_accuracy_after": kept["val_accuracy"],
        "val_ap_after": kept["val_ap"],
        "val_auc_after": kept["val_auc"],
        "kept_epoch": result.val_metrics["epoch"],
        "threshold": result.threshold,
        "checkpoint": result.checkpoint,
        "tuned": dataclasses.asdict(tuned) if tuned else None,
    }


def _measure_throughput(
    cfg: PruneConfig, rows: list[dict[str, Any]], *, finals: list[nn.Module], input_size: int
) -> str:
    """Every fine-tuned model's bare forward rate in one run, and ratios to the unpruned one; the device."""
    threads = torch.get_num_threads()
    _logger.info("measuring inference throughput at batch %d on CPU (%d threads)", cfg.bench_batch_size, threads)
    for row, final in zip(rows, finals, strict=True):
        row["images_per_s"] = throughput(final, input_size, cfg.bench_batch_size, batches=cfg.bench_batches)
    for row in rows:
        row["speedup"] = row["images_per_s"] / rows[0]["images_per_s"]
        row["params_fraction"] = row["params"] / rows[0]["params"]
    return f"CPU, {threads} threads, batch {cfg.bench_batch_size}"


def _write_report(cfg: PruneConfig, rows: list[dict[str, Any]], *, text: str, device: str, arch: str) -> None:
    write_parquet(
        join(cfg.out, "prune.parquet"),
        [{k: v for k, v in r.items() if k != "tuned"} for r in rows],
        cfg.storage_options,
    )
    write_json(
        join(cfg.out, "prune.json"), {"config": cfg.to_json(), "device": device, "rows": rows}, cfg.storage_options
    )
    fs, path = filesystem(join(cfg.out, "prune.md"), cfg.storage_options)
    with fs.open(path, "w") as handle:
        handle.write(f"# Pruning {arch} ({cfg.method})\n\nThroughput: bare model, {device}.\n\n{text}")
    plots.pruning(join(cfg.out, "prune.png"), rows, cfg.storage_options)


def _amount_dir(amount: float) -> str:
    return f"amount_{int(round(amount * 100)):02d}"
