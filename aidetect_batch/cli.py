"""Command line: ``aidetect-batch scan|train|evaluate|prune|report|serve|benchmark|demo``.

Arguments are parsed into a validated config before Ray starts.
Exit codes: 0 when the job completed (even with bad files), 2 for bad
arguments, missing sources or an unusable checkpoint, 1 for a failed job.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from typing import Any

from aidetect_batch import runtime
from aidetect_batch.config import (
    ARCHS,
    AUGMENTATIONS,
    DEFAULT_AUGMENT,
    DEFAULT_EXTENSIONS,
    DEFAULT_MAX_FILE_MB,
    DEFAULT_MAX_PIXELS,
    DEFAULT_TRAIN_POLICY,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
    ConfigError,
    EvalConfig,
    PruneConfig,
    RepostsConfig,
    ScanConfig,
    ServeConfig,
    TrainConfig,
    parse_actors,
    parse_storage_options,
)
from aidetect_batch.detectors.policies import DEFAULT_MAX_TILES, DEFAULT_NATIVE_MAX_PIXELS, POLICIES
from aidetect_batch.errors import CheckpointError, SourceError
from aidetect_batch.storage import join

_logger = logging.getLogger("aidetect_batch")
TOKEN_ENV = "AIDETECT_TOKEN"

NO_CHECKPOINT = (
    "--checkpoint is required: a detector checkpoint (local path or s3:// URI). Get one by training "
    "(`aidetect-batch train DATASET --out DIR` writes DIR/model.pt), by passing CNNDetection's published weights "
    "(e.g. blur_jpg_prob0.5.pth, {'model': state_dict}), or a torchvision state dict with a 1- or 2-logit "
    "head (with --arch). `aidetect-batch demo` trains a small one offline."
)


def _add_provenance_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-c2pa", dest="c2pa", action="store_false", help="do not read C2PA manifests (read only where marked)"
    )
    parser.add_argument(
        "--watermark",
        action="store_true",
        help="also decode the Stable Diffusion invisible watermark (costly; pip install 'aidetect-batch[watermark]')",
    )


def _add_scan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="*", help="folders, files, globs or s3://bucket/prefix")
    parser.add_argument(
        "--manifest", help="Parquet, CSV/TSV (a path column) or text file of paths; other columns are kept"
    )
    parser.add_argument("--limit", type=int, help="scan only the first N inputs (after --sample)")
    parser.add_argument("--sample", type=float, help="scan a seeded random fraction of the inputs, e.g. 0.01")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample")
    parser.add_argument("--resume", action="store_true", help="continue a stopped scan in --out, skipping its work")
    parser.add_argument("--dedup", action="store_true", help="score identical bytes once; copies get duplicate_of")
    parser.add_argument(
        "--phash", action="store_true", help="add each image's PDQ perceptual hash, for 'aidetect-batch reposts'"
    )
    parser.add_argument(
        "--commit-every", type=float, default=60.0, help="seconds between commits of finished shards (resume grain)"
    )
    parser.add_argument(
        "--gpu-decode", action="store_true", help="decode JPEGs on the GPU (nvJPEG) in the Classifier; CPU fallback"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the model in each Classifier")
    _add_provenance_arguments(parser)
    parser.add_argument("--checkpoint", help="detector checkpoint, local or s3://")
    parser.add_argument("--out", required=True, help="output directory, local or s3://")
    parser.add_argument(
        "--arch", choices=ARCHS, help="architecture of a plain state dict (default: guessed, else resnet50)"
    )
    parser.add_argument("--ai-class-index", type=int, help="which of two logits means AI, for plain state dicts")
    parser.add_argument("--preprocess", choices=POLICIES, help="default: the checkpoint's policy, else resize")
    parser.add_argument(
        "--threshold", type=float, help="P(AI) at or above which a file is labelled ai (default: the checkpoint's)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per model forward pass")
    parser.add_argument("--decode-batch-size", type=int, default=16, help="files per CPU decode batch")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="autocast precision on GPU")
    parser.add_argument("--actors", help="Classifier actors: N or MIN,MAX (default: from cluster resources)")
    parser.add_argument("--cpus-per-actor", type=int, help="CPUs per Classifier actor when running on CPU")
    parser.add_argument(
        "--decode-tasks",
        type=int,
        help="concurrent CPU decode tasks (default: the CPUs the Classifier actors leave; set on autoscaling clusters)",
    )
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="decompression-bomb guard")
    parser.add_argument(
        "--max-file-mb",
        type=float,
        default=DEFAULT_MAX_FILE_MB,
        help="files larger than this are too_large rows and are never read (default: %(default)s)",
    )
    parser.add_argument("--all-files", action="store_true", help="decode every file, not only image extensions")
    _add_storage_option(parser)
    parser.add_argument(
        "--group-depth", type=int, default=1, help="path components below the source root in the report"
    )
    parser.add_argument("--rows-per-file", type=int, default=250_000, help="rows per scores Parquet file")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous scan in --out")
    _add_framing(parser)


def _add_framing(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--native-max-pixels",
        type=int,
        default=DEFAULT_NATIVE_MAX_PIXELS,
        help="native: larger images are center-cropped to this many pixels, never resized (default: %(default)s)",
    )
    parser.add_argument(
        "--max-tiles", type=int, default=DEFAULT_MAX_TILES, help="tiles: most tiles per image (default: %(default)s)"
    )


def _add_storage_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec/s3fs option, repeatable (e.g. endpoint_url=http://minio:9000, anon=true)",
    )


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="labelled folder tree (real/ + ai/ or fake/, ...) or manifest, local or s3://")
    parser.add_argument("--out", required=True, help="output directory for model.pt, splits, history")
    parser.add_argument("--arch", choices=ARCHS, default="resnet50")
    parser.add_argument(
        "--init", help="imagenet (torchvision weights), none, or a weights file (default: imagenet where available)"
    )
    parser.add_argument("--freeze-backbone", action="store_true", help="train only the classification head")
    parser.add_argument("--input-size", type=int, help="model input side (default: 224, 32 for cifake_cnn)")
    parser.add_argument(
        "--preprocess",
        choices=POLICIES,
        default=DEFAULT_TRAIN_POLICY,
        help="stored in the checkpoint; center-crop, tiles and native train on random crops of native pixels "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--augment",
        default=",".join(DEFAULT_AUGMENT),
        help=f"comma list from {','.join(AUGMENTATIONS)}, or none (default: %(default)s; rotate and translate "
        "resample pixels, blur and jpeg act on the full-resolution image before the crop)",
    )
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    parser.add_argument("--lr", type=float, help="default: 1e-3 from scratch (--init none), 1e-4 when fine-tuning")
    parser.add_argument("--weight-decay", type=float, default=1e-5)
    parser.add_argument("--schedule", choices=SCHEDULES, default="cosine")
    parser.add_argument("--epochs", type=int, help="default: 30 from scratch, 5 when fine-tuning")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step per worker")
    parser.add_argument(
        "--patience", type=int, help="early stopping: epochs without lower val loss (default: 5 from scratch, else 3)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--split", default="0.7225,0.1275,0.15", help="train,val,test fractions when the dataset has no split folders"
    )
    parser.add_argument("--class-weights", action="store_true", help="weight the loss by inverse class frequency")
    parser.add_argument(
        "--threshold-rule", default="f1", help="checkpoint threshold on validation: f1, fpr:RATE, or a number"
    )
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (data parallel)")
    parser.add_argument("--cpus-per-worker", type=int, default=1)
    gpu = parser.add_mutually_exclusive_group()
    gpu.add_argument("--gpu", dest="use_gpu", action="store_true", default=None, help="one GPU per worker")
    gpu.add_argument("--cpu", dest="use_gpu", action="store_false", help="train on CPU even if GPUs exist")
    parser.add_argument("--max-failures", type=int, default=0, help="worker-group restarts from the last epoch")
    parser.add_argument("--resume", action="store_true", help="continue the stopped run in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    parser.add_argument("--all-files", action="store_true", help="use every file, not only image extensions")
    parser.add_argument(
        "--no-near-duplicates",
        dest="near_duplicates",
        action="store_false",
        help="split by identical bytes only, not also by PDQ near-duplicate groups",
    )
    _add_storage_option(parser)


def _add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="labelled folder tree or manifest (e.g. a training run's splits.parquet)")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--split", choices=("train", "val", "test", "all"), help="default: test if any, else all")
    parser.add_argument("--target-fpr", type=float, default=0.01, help="FPR on real images for the targeted threshold")
    parser.add_argument(
        "--perturb", nargs="*", default=[], help="robustness sweep, e.g. jpeg:95,75,50,30 blur:1,2 downscale:0.5"
    )
    parser.add_argument("--preprocess", choices=POLICIES, help="override the checkpoint's policy")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--actors", help="Classifier actors: N or MIN,MAX")
    parser.add_argument("--all-files", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    _add_framing(parser)
    _add_provenance_arguments(parser)
    _add_storage_option(parser)


def _add_serve_arguments(srv: argparse.ArgumentParser) -> None:
    srv.add_argument("--checkpoint", help="detector checkpoint (local path or s3:// URI)")
    srv.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 opens it to the network)")
    srv.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"bearer token the scoring endpoint requires (default: ${TOKEN_ENV}); needed off loopback",
    )
    srv.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback --host without a token (your own auth in front)"
    )
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--threshold", type=float, help="decision threshold on P(AI) (default: the checkpoint's)")
    srv.add_argument("--preprocess", choices=POLICIES, help="preprocess policy (default: the checkpoint's)")
    srv.add_argument("--arch", choices=ARCHS, help="architecture of a plain state dict without metadata")
    srv.add_argument("--ai-class-index", type=int, help="which of two logits is AI, for plain state dicts")
    srv.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="decompression-bomb guard")
    srv.add_argument("--max-upload-mb", type=float, default=50.0, help="largest accepted upload")
    srv.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas of the detector")
    srv.add_argument("--gpus-per-replica", type=float, help="default: 1 when the cluster has GPUs, else 0")
    srv.add_argument("--max-batch-size", type=int, default=16, help="concurrent uploads scored in one forward pass")
    _add_framing(srv)
    _add_storage_option(srv)


def build_parser() -> argparse.ArgumentParser:
    """The ``aidetect-batch`` argument parser."""
    parser = argparse.ArgumentParser(prog="aidetect-batch", description="Batch real-vs-AI image scanner on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    scan = sub.add_parser("scan", help="score every image under the sources")
    _add_scan_arguments(scan)
    train = sub.add_parser("train", help="fine-tune a detector on a labelled dataset with Ray Train")
    _add_train_arguments(train)
    evaluate = sub.add_parser("evaluate", help="score a labelled set through the scan pipeline and measure it")
    _add_evaluate_arguments(evaluate)
    prune = sub.add_parser("prune", help="prune a detector at several amounts, fine-tune each, report size and speed")
    prune.add_argument("--checkpoint", required=True, help="the detector to prune")
    prune.add_argument("--dataset", required=True, help="labelled dataset for fine-tuning and validation")
    prune.add_argument("--out", required=True)
    prune.add_argument("--amount", default="0.1,0.2,0.3,0.4", help="fractions to prune (the unpruned 0 is added)")
    method = prune.add_mutually_exclusive_group()
    method.add_argument("--structured", dest="method", action="store_const", const="structured", default="structured")
    method.add_argument("--unstructured", dest="method", action="store_const", const="unstructured")
    prune.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs per amount")
    prune.add_argument("--lr", type=float, default=1e-4)
    prune.add_argument("--batch-size", type=int, default=32)
    prune.add_argument("--bench-batch-size", type=int, default=64, help="batch of the throughput measurement")
    prune.add_argument("--bench-batches", type=int, default=5, help="timed batches per model")
    prune.add_argument("--tune", action="store_true", help="Ray Tune search (ASHA) of lr, weight decay, batch, epochs")
    prune.add_argument("--tune-trials", type=int, default=4)
    prune.add_argument("--workers", type=int, default=1)
    prune.add_argument("--overwrite", action="store_true")
    _add_storage_option(prune)
    bench = sub.add_parser("benchmark", help="measure scan and training throughput and the demo's wall time")
    bench.add_argument(
        "--suite",
        choices=("scan", "training", "demo", "all", "listing", "report", "gpu", "policies", "provenance", "reposts"),
        default="scan",
    )
    bench.add_argument(
        "--report-rows", type=int, default=10_000_000, help="report suite: synthetic score rows to aggregate"
    )
    bench.add_argument(
        "--reposts-rows", type=int, default=1_000_000, help="reposts suite: synthetic PDQ hashes to group"
    )
    bench.add_argument("--listing-prefix", help="listing suite: the s3:// prefix to list (not part of 'all')")
    bench.add_argument("--scan-arch", default="resnet50", help="scan suite: the model (random weights)")
    bench.add_argument("--precision", choices=PRECISIONS, default="bf16", help="scan suite: precision on CUDA")
    bench.add_argument("--photos", type=int, default=48, help="scan suite: distinct 1080-2048 px JPEGs")
    bench.add_argument("--repeats", type=int, default=5, help="scan suite: times each photo is scanned end to end")
    bench.add_argument(
        "--policy-photos",
        type=int,
        default=8,
        help="scan, policies and provenance suites: photographs per policy or check",
    )
    bench.add_argument("--memory-sizes", default="2000,20000", help="scan suite: small-image corpus sizes for RSS")
    bench.add_argument("--archs", default="cifake_cnn,resnet_tiny,resnet50", help="architectures to train")
    bench.add_argument("--per-class", type=int, default=60, help="generated images per class")
    bench.add_argument("--epochs", type=int, default=3)
    bench.add_argument("--workers", type=int, default=1)
    bench.add_argument("--batch-size", type=int, default=32, help="training batch; the scan suite uses 64")
    bench.add_argument("--json", help="write the results here (the gpu suite: benchmark-gpu.json by default)")
    _add_storage_option(bench)
    rep = sub.add_parser("report", help="re-create OUT/report (aggregates and index.html) from existing scores")
    rep.add_argument("out", help="a scan's --out, or an evaluation's (its plots are included)")
    rep.add_argument("--thumbnails", type=int, default=24, help="images per thumbnail grid")
    _add_storage_option(rep)
    rp = sub.add_parser("reposts", help="group a finished --phash scan's near-duplicates (PDQ) into OUT/reposts")
    rp.add_argument("out", help="a scan's --out, scanned with --phash")
    rp.add_argument("--distance", type=int, default=31, help="largest PDQ Hamming distance within a group")
    rp.add_argument("--min-quality", type=int, default=50, help="hashes of lower PDQ quality join no group")
    rp.add_argument("--group-depth", type=int, default=1, help="path components kept as each group's prefixes")
    rp.add_argument("--time-column", help="a manifest column with when each file was posted (first/last seen)")
    _add_storage_option(rp)
    srv = sub.add_parser("serve", help="the upload page: score single images over HTTP with Ray Serve")
    _add_serve_arguments(srv)
    demo = sub.add_parser("demo", help="offline: build a labelled corpus, train, evaluate and scan on local Ray")
    demo.add_argument("--dir", default="aidetect-demo", help="where to write the corpus and results")
    demo.add_argument("--epochs", type=int, default=20, help="training epochs of the demo detector")
    return parser


def config_from_args(args: argparse.Namespace) -> ScanConfig:
    """Turn parsed ``scan`` arguments into a validated config; raises :class:`ConfigError`."""
    if not args.checkpoint:
        raise ConfigError(NO_CHECKPOINT)
    return ScanConfig(
        sources=tuple(args.sources),
        out=args.out,
        checkpoint=args.checkpoint,
        arch=args.arch,
        ai_class_index=args.ai_class_index,
        preprocess=args.preprocess,
        threshold=args.threshold,
        batch_size=args.batch_size,
        decode_batch_size=args.decode_batch_size,
        precision=args.precision,
        actors=parse_actors(args.actors) if args.actors else None,
        cpus_per_actor=args.cpus_per_actor,
        decode_tasks=args.decode_tasks,
        max_pixels=args.max_pixels,
        max_file_mb=args.max_file_mb,
        all_files=args.all_files,
        extensions=DEFAULT_EXTENSIONS,
        storage_options=parse_storage_options(args.storage_option),
        group_depth=args.group_depth,
        rows_per_file=args.rows_per_file,
        overwrite=args.overwrite,
        manifest=args.manifest,
        limit=args.limit,
        sample=args.sample,
        seed=args.seed,
        resume=args.resume,
        dedup=args.dedup,
        commit_every_s=args.commit_every,
        gpu_decode=args.gpu_decode,
        compile=args.compile,
        native_max_pixels=args.native_max_pixels,
        max_tiles=args.max_tiles,
        c2pa=args.c2pa,
        watermark=args.watermark,
        phash=args.phash,
    )


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise ConfigError(f"--split takes three fractions like 0.7225,0.1275,0.15, not {text!r}") from None
    if len(parts) != 3:
        raise ConfigError(f"--split takes three fractions like 0.7225,0.1275,0.15, not {text!r}")
    return parts  # type: ignore[return-value]


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Turn parsed ``train`` arguments into a validated config; raises :class:`ConfigError`."""
    augment = () if args.augment.strip().lower() == "none" else tuple(a.strip() for a in args.augment.split(",") if a)
    return TrainConfig(
        dataset=args.dataset,
        out=args.out,
        arch=args.arch,
        init=args.init,
        freeze_backbone=args.freeze_backbone,
        input_size=args.input_size,
        preprocess=args.preprocess,
        augment=augment,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        epochs=args.epochs,
        batch_size=args.batch_size,
        patience=args.patience,
        seed=args.seed,
        fractions=_fractions(args.split),
        class_weights=args.class_weights,
        threshold_rule=args.threshold_rule,
        workers=args.workers,
        use_gpu=args.use_gpu,
        cpus_per_worker=args.cpus_per_worker,
        max_failures=args.max_failures,
        all_files=args.all_files,
        storage_options=parse_storage_options(args.storage_option),
        resume=args.resume,
        overwrite=args.overwrite,
        near_duplicates=args.near_duplicates,
    )


def eval_config_from_args(args: argparse.Namespace) -> EvalConfig:
    """Turn parsed ``evaluate`` arguments into a validated config; raises :class:`ConfigError`."""
    scan_options: dict = {
        "batch_size": args.batch_size,
        "native_max_pixels": args.native_max_pixels,
        "max_tiles": args.max_tiles,
        "c2pa": args.c2pa,
        "watermark": args.watermark,
    }
    if args.actors:
        scan_options["actors"] = parse_actors(args.actors)
    return EvalConfig(
        dataset=args.dataset,
        checkpoint=args.checkpoint,
        out=args.out,
        split=args.split,
        target_fpr=args.target_fpr,
        perturb=tuple(args.perturb),
        preprocess=args.preprocess,
        all_files=args.all_files,
        storage_options=parse_storage_options(args.storage_option),
        overwrite=args.overwrite,
        scan_options=scan_options,
    )


def prune_config_from_args(args: argparse.Namespace) -> PruneConfig:
    """Turn parsed ``prune`` arguments into a validated config; raises :class:`ConfigError`."""
    try:
        amounts = tuple(float(a) for a in args.amount.split(",") if a)
    except ValueError:
        raise ConfigError(f"--amount takes fractions like 0.1,0.2,0.3,0.4, not {args.amount!r}") from None
    return PruneConfig(
        checkpoint=args.checkpoint,
        dataset=args.dataset,
        out=args.out,
        amounts=amounts,
        method=args.method,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        bench_batch_size=args.bench_batch_size,
        bench_batches=args.bench_batches,
        tune=args.tune,
        tune_trials=args.tune_trials,
        storage_options=parse_storage_options(args.storage_option),
        overwrite=args.overwrite,
        train_options={"workers": args.workers},
    )


def _prune(cfg: PruneConfig) -> int:
    from aidetect_batch.train.pruning import run_prune  # heavy: only for its command

    result = run_prune(cfg)
    print(result.markdown, flush=True)
    print(f"report: {cfg.out}/prune.md, prune.parquet, prune.png; checkpoints: {cfg.out}/amount_*/model.pt", flush=True)
    return 0


def _train(cfg: TrainConfig) -> int:
    from aidetect_batch.train.trainer import run_train  # heavy: only for its command

    result = run_train(cfg)
    at = result.val_metrics["at_threshold"]
    print(
        f"trained {cfg.arch} for {len(result.history)} epoch(s), kept epoch {result.val_metrics['epoch']}: "
        f"val ROC-AUC {result.val_metrics['roc_auc']:.3f}, accuracy {at['accuracy']:.3f} at threshold "
        f"{result.threshold:.3f} ({cfg.threshold_rule}); checkpoint {result.checkpoint}",
        flush=True,
    )
    return 0


def _evaluate(cfg: EvalConfig) -> int:
    from aidetect_batch.train.evaluation import format_table, run_evaluate  # heavy: only for its command

    result = run_evaluate(cfg)
    print(format_table(result.metrics), flush=True)
    print(f"metrics: {cfg.out}/metrics.json, plots: {cfg.out}/plots/, per-image scores: {cfg.out}/scan/", flush=True)
    return 0


def _scan(cfg: ScanConfig) -> int:
    from aidetect_batch.report.aggregate import closing_line  # heavy: only for its command
    from aidetect_batch.scan.runner import run_scan  # heavy: only for its command

    result = run_scan(cfg)
    print(closing_line(result.summary), flush=True)
    return 0


def _report(out: str, storage_options: dict[str, Any], thumbnails: int) -> int:
    from aidetect_batch.report import aggregate  # heavy: only for its command

    if thumbnails < 0:
        raise ConfigError("--thumbnails must be 0 or more")
    try:
        scan_out, summary = aggregate.rebuild(out, storage_options, thumbnails)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    print(aggregate.closing_line(summary))
    print(f"report: {join(scan_out, 'report', 'index.html')}")
    return 0


def serve_config_from_args(args: argparse.Namespace) -> ServeConfig:
    """Turn parsed ``serve`` arguments into a validated config; raises :class:`ConfigError`."""
    if not args.checkpoint:
        raise ConfigError(NO_CHECKPOINT)
    return ServeConfig(
        checkpoint=args.checkpoint,
        host=args.host,
        port=args.port,
        threshold=args.threshold,
        preprocess=args.preprocess,
        arch=args.arch,
        ai_class_index=args.ai_class_index,
        max_pixels=args.max_pixels,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        replicas=args.replicas,
        token=args.token or None,
        insecure=args.insecure,
        gpus_per_replica=args.gpus_per_replica,
        max_batch_size=args.max_batch_size,
        storage_options=parse_storage_options(args.storage_option),
        native_max_pixels=args.native_max_pixels,
        max_tiles=args.max_tiles,
    )


def _serve(cfg: ServeConfig) -> int:
    import signal
    import threading

    from ray import serve

    from aidetect_batch.serve import start  # heavy: only for its command

    url = start(cfg)
    print(f"upload page: {url}  (Ctrl-C stops it)", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    serve.shutdown()
    print("upload page stopped", flush=True)
    return 0


def _demo(directory: str, epochs: int) -> int:
    from aidetect_batch.bench.demo import run_demo  # heavy: only for its command

    return run_demo(directory, epochs)


def _job_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import RayError
    from ray.train import TrainingFailedError

    return (RayError, TrainingFailedError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``aidetect-batch`` console script and ``jobs/*.py``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    runtime.handle_signals()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "demo":
            return _demo(args.dir, args.epochs)
        if args.command == "benchmark":
            from aidetect_batch.bench.suites import run_benchmark  # heavy: only for its command

            archs = tuple(a for a in args.archs.split(",") if a)
            scan_options = {
                "arch": args.scan_arch,
                "batch_size": 64,
                "precision": args.precision,
                "photos": args.photos,
                "repeats": args.repeats,
                "small": tuple(int(n) for n in args.memory_sizes.split(",")),
            }
            if args.suite == "listing" and not (args.listing_prefix or "").startswith("s3://"):
                print("error: --suite listing needs --listing-prefix s3://bucket/prefix", file=sys.stderr)
                return 2
            listing_options = {
                "prefix": args.listing_prefix,
                "storage_options": parse_storage_options(args.storage_option),
            }
            run_benchmark(
                args.suite,
                archs,
                args.per_class,
                epochs=args.epochs,
                workers=args.workers,
                batch_size=args.batch_size,
                out=args.json or ("benchmark-gpu.json" if args.suite == "gpu" else None),
                scan_options=scan_options,
                listing_options=listing_options,
                report_rows=args.report_rows,
                policy_photos=args.policy_photos,
                reposts_rows=args.reposts_rows,
            )
            return 0
        if args.command == "report":
            return _report(args.out, parse_storage_options(args.storage_option), args.thumbnails)
        if args.command == "reposts":
            return _reposts(args)
        if args.command == "serve":
            return _serve(serve_config_from_args(args))
        if args.command == "prune":
            return _prune(prune_config_from_args(args))
        if args.command == "train":
            return _train(train_config_from_args(args))
        if args.command == "evaluate":
            return _evaluate(eval_config_from_args(args))
        return _scan(config_from_args(args))
    except (KeyboardInterrupt, runtime.Stopped) as exc:
        stopped = runtime.as_stopped(exc)
        print(stop_line(args.command, stopped, argv), file=sys.stderr, flush=True)
        runtime.stop_ray()
        return stopped.exit_code

    except (ConfigError, SourceError, CheckpointError) as exc:
        print(f"aidetect-batch: error: {exc}", file=sys.stderr)
        return 2
    except _job_errors() as exc:
        print(f"aidetect-batch: {args.command} failed: {exc}", file=sys.stderr)
        if args.command in ("train", "scan"):
            print("aidetect-batch: rerun the same command with --resume to continue", file=sys.stderr)
        return 1


def _reposts(args: argparse.Namespace) -> int:
    cfg = RepostsConfig(
        out=args.out,
        distance=args.distance,
        min_quality=args.min_quality,
        group_depth=args.group_depth,
        time_column=args.time_column,
        storage_options=parse_storage_options(args.storage_option),
    )
    from aidetect_batch.report import reposts  # faiss and scipy load only for this command

    print(reposts.summary_line(reposts.run_reposts(cfg)), flush=True)
    return 0


RESUMABLE = ("scan", "train")


def stop_line(command: str, stopped: runtime.Stopped, argv: list[str]) -> str:
    """The one line a stopped job prints: the signal, what was kept, and the exact command that goes on."""
    kept = stopped.kept or "nothing was committed"
    if command in RESUMABLE:
        rest = [a for a in argv if a != "--overwrite"]
        again = shlex.join(["aidetect-batch", *rest, *([] if "--resume" in rest else ["--resume"])])
        return f"aidetect-batch: {command} stopped by {stopped}; {kept}. Continue with: {again}"
    rest = [*argv, *([] if "--overwrite" in argv else ["--overwrite"])]
    again = shlex.join(["aidetect-batch", *rest])
    return f"aidetect-batch: {command} stopped by {stopped}; {kept}; it cannot resume. Start again with: {again}"


if __name__ == "__main__":
    sys.exit(main())
