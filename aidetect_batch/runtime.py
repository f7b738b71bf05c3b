"""How a job lives in its process: starting Ray, stopping on SIGINT/SIGTERM, and its ``_run.json``.

One helper starts Ray (:func:`start_ray`) for every job. A signal becomes a
:class:`Stopped` exception in the main thread, so a job unwinds through its
own ``finally`` blocks: the scan commits the shards it finished and the CLI
prints what was kept and how to continue. ``ray.init`` installs its own SIGTERM
handler (``sys.exit``), so :func:`start_ray` puts ours back afterwards.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import logging
import platform
import signal
import sys
import threading
from types import FrameType
from typing import Any

from aidetect_batch import schema
from aidetect_batch.storage import filesystem, join, read_json, write_json

_logger = logging.getLogger(__name__)

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_handling = False


class Stopped(BaseException):
    """A job was asked to stop by a signal. A ``BaseException``, like ``KeyboardInterrupt``, so that
    per-file ``except Exception`` handlers never swallow it.

    Attributes:
        signum: The signal received.
        kept: One sentence on what the job kept, filled in by the job as it unwinds.
    """

    def __init__(self, signum: int, kept: str = "") -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.kept = kept

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signum)


def handle_signals() -> None:
    """Turn SIGINT and SIGTERM into :class:`Stopped` in this process (main thread only; else a no-op)."""
    global _handling
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in _SIGNALS:
        signal.signal(signum, _raise_stopped)
    _handling = True


def as_stopped(exc: BaseException) -> Stopped:
    """A ``KeyboardInterrupt`` (SIGINT before our handler was installed) as :class:`Stopped`."""
    return exc if isinstance(exc, Stopped) else Stopped(signal.SIGINT)


def start_ray(**kwargs: Any) -> dict[str, float]:
    """Start or join Ray unless this process already did, and return the cluster's resources.

    Keyword arguments go to ``ray.init`` (``address``, ``num_cpus``, ...). When the process handles
    signals (:func:`handle_signals`), the handler ``ray.init`` installs for SIGTERM is replaced again.
    """
    import ray  # half a second to import: the CLI handles signals and parses arguments without it

    if not ray.is_initialized():
        ray.init(**{"logging_level": logging.WARNING, **kwargs})
        if _handling:
            handle_signals()
    return dict(ray.cluster_resources())


def stop_ray() -> None:
    """Shut down this process's Ray: a local instance it started ends with it; a cluster it joined stays."""
    import ray  # see start_ray

    ray.shutdown()


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the libraries a result depends on, for ``_run.json``."""
    names = ("aidetect-batch", "ray", "torch", "torchvision", "pyarrow", "pillow", "numpy", "fsspec", "s3fs")
    found = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in names:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = "missing"
    return found


@dataclasses.dataclass
class RunRecord:
    """A job's ``OUT/_run.json``: written when the job starts and again as its status changes. Scans and
    training runs write it only through this class."""

    out: str
    data: dict[str, Any]
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @staticmethod
    def previous(out: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The record a stopped job left in ``out``, or ``None`` when there is none."""
        try:
            return read_json(join(out, schema.RUN_FILE), storage_options)
        except FileNotFoundError:
            return None

    def save(self, **changes: Any) -> None:
        """Apply ``changes`` and write the whole record (creating ``out`` if needed)."""
        self.data.update(changes)
        fs, root = filesystem(self.out, self.storage_options)
        fs.makedirs(root, exist_ok=True)
        write_json(join(self.out, schema.RUN_FILE), self.data, self.storage_options)
