"""Command line: ``aidetect-batch scan|demo``.

Arguments are parsed into a validated :class:`ScanConfig` before Ray starts.
Exit codes: 0 when the job completed (even with bad files), 2 for bad
arguments, missing sources or an unusable checkpoint, 1 for a failed job.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from aidetect_batch.config import (
    ARCHS,
    DEFAULT_EXTENSIONS,
    DEFAULT_MAX_PIXELS,
    PRECISIONS,
    ConfigError,
    ScanConfig,
    parse_actors,
    parse_storage_options,
)
from aidetect_batch.preprocess import POLICIES

_logger = logging.getLogger("aidetect_batch")

NO_CHECKPOINT = (
    "--checkpoint is required: a detector checkpoint (local path or s3:// URI). Get one by training "
    "(`aidetect-batch train`, once available), by passing CNNDetection's published weights "
    "(e.g. blur_jpg_prob0.5.pth, {'model': state_dict}), or a torchvision state dict with a 1- or 2-logit "
    "head (with --arch). `aidetect-batch demo` shows the pipeline with an untrained model."
)


def _add_scan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="+", help="folders, files, globs or s3://bucket/prefix")
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
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="decompression-bomb guard")
    parser.add_argument("--all-files", action="store_true", help="decode every file, not only image extensions")
    parser.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec/s3fs option, repeatable (e.g. endpoint_url=http://minio:9000, anon=true)",
    )
    parser.add_argument(
        "--group-depth", type=int, default=1, help="path components below the source root in the report"
    )
    parser.add_argument("--rows-per-file", type=int, default=250_000, help="rows per scores Parquet file")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous scan in --out")


def build_parser() -> argparse.ArgumentParser:
    """The ``aidetect-batch`` argument parser."""
    parser = argparse.ArgumentParser(prog="aidetect-batch", description="Batch real-vs-AI image scanner on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    scan = sub.add_parser("scan", help="score every image under the sources")
    _add_scan_arguments(scan)
    demo = sub.add_parser("demo", help="write a small demo corpus and scan it on a local Ray instance")
    demo.add_argument("--dir", default="aidetect-demo", help="where to write the corpus and results")
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
        max_pixels=args.max_pixels,
        all_files=args.all_files,
        extensions=DEFAULT_EXTENSIONS,
        storage_options=parse_storage_options(args.storage_option),
        group_depth=args.group_depth,
        rows_per_file=args.rows_per_file,
        overwrite=args.overwrite,
    )


def _scan(cfg: ScanConfig) -> int:
    from aidetect_batch.pipeline import run_scan
    from aidetect_batch.report import closing_line

    result = run_scan(cfg)
    print(closing_line(result.summary), flush=True)
    return 0


def _demo(directory: str) -> int:
    from aidetect_batch.demo import UNTRAINED_BANNER, write_demo_corpus, write_untrained_checkpoint

    corpus = os.path.join(directory, "corpus")
    checkpoint = os.path.join(directory, "untrained-resnet50.pt")
    out = os.path.join(directory, "results")
    files = write_demo_corpus(corpus)
    write_untrained_checkpoint(checkpoint)
    print(UNTRAINED_BANNER, file=sys.stderr, flush=True)
    print(f"demo corpus: {len(files)} files in {corpus}", flush=True)
    cfg = ScanConfig(sources=(corpus,), out=out, checkpoint=checkpoint, all_files=True, overwrite=True)
    code = _scan(cfg)
    print(UNTRAINED_BANNER, file=sys.stderr, flush=True)
    print(f"results: {os.path.join(out, 'scores')} (Parquet), report: {os.path.join(out, 'report')}", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``aidetect-batch`` console script and ``jobs/*.py``."""
    from aidetect_batch.model import CheckpointError
    from aidetect_batch.sources import SourceError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "demo":
            return _demo(args.dir)
        return _scan(config_from_args(args))
    except (ConfigError, SourceError, CheckpointError) as exc:
        print(f"aidetect-batch: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
