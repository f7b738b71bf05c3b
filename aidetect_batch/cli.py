"""Command line: ``aidetect-batch scan|train|evaluate|prune|report|serve|benchmark|demo``.

Arguments are parsed into a validated config before Ray starts.
Exit codes: 0 when the job completed (even with bad files), 2 for bad
arguments, missing sources or an unusable checkpoint, 1 for a failed job.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
from collections.abc import Callable
from typing import Any

from aidetect_batch import runtime
from aidetect_batch.bench.config import BenchmarkConfig, DemoConfig
from aidetect_batch.config import add_arguments, from_args
from aidetect_batch.errors import CheckpointError, ConfigError, SourceError
from aidetect_batch.report.config import ReportConfig, RepostsConfig
from aidetect_batch.scan.config import ScanConfig
from aidetect_batch.serve_config import ServeConfig
from aidetect_batch.storage import join
from aidetect_batch.train.config import EvalConfig, PruneConfig, TrainConfig

_logger = logging.getLogger("aidetect_batch")


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: its config, the job that runs it, and its one-line help."""

    config: type
    run: Callable[[Any], int]
    help: str


def build_parser() -> argparse.ArgumentParser:
    """The ``aidetect-batch`` argument parser: one subparser per :data:`COMMANDS` entry, derived from its config."""
    parser = argparse.ArgumentParser(prog="aidetect-batch", description="Batch real-vs-AI image scanner on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        subparser = add_arguments(sub.add_parser(name, help=command.help), command.config)
        subparser.set_defaults(handler=command.run, config=command.config)
    return parser


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


def _report(cfg: ReportConfig) -> int:
    from aidetect_batch.report import aggregate  # heavy: only for its command

    try:
        scan_out, summary = aggregate.rebuild(cfg.out, cfg.storage_options, cfg.thumbnails)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    print(aggregate.closing_line(summary))
    print(f"report: {join(scan_out, 'report', 'index.html')}")
    return 0


def _reposts(cfg: RepostsConfig) -> int:
    from aidetect_batch.report import reposts  # faiss and scipy load only for this command

    print(reposts.summary_line(reposts.run_reposts(cfg)), flush=True)
    return 0


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


def _benchmark(cfg: BenchmarkConfig) -> int:
    from aidetect_batch.bench.suites import run_benchmark  # heavy: only for its command

    run_benchmark(cfg)
    return 0


def _demo(cfg: DemoConfig) -> int:
    from aidetect_batch.bench.demo import run_demo  # heavy: only for its command

    return run_demo(cfg.dir, cfg.epochs)


# The subcommands in the order ``--help`` lists them.
COMMANDS: dict[str, Command] = {
    "scan": Command(ScanConfig, _scan, "score every image under the sources"),
    "train": Command(TrainConfig, _train, "fine-tune a detector on a labelled dataset with Ray Train"),
    "evaluate": Command(EvalConfig, _evaluate, "score a labelled set through the scan pipeline and measure it"),
    "prune": Command(PruneConfig, _prune, "prune a detector at several amounts, fine-tune each, report size and speed"),
    "benchmark": Command(BenchmarkConfig, _benchmark, "measure scan and training throughput and the demo's wall time"),
    "report": Command(ReportConfig, _report, "re-create OUT/report (aggregates and index.html) from existing scores"),
    "reposts": Command(
        RepostsConfig, _reposts, "group a finished --phash scan's near-duplicates (PDQ) into OUT/reposts"
    ),
    "serve": Command(ServeConfig, _serve, "the upload page: score single images over HTTP with Ray Serve"),
    "demo": Command(DemoConfig, _demo, "offline: build a labelled corpus, train, evaluate and scan on local Ray"),
}


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
        return args.handler(from_args(args.config, args))
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
        if args.command in RESUMABLE:
            print("aidetect-batch: rerun the same command with --resume to continue", file=sys.stderr)
        return 1


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
