"""The per-file watchdog: native decoders run in a child process that the CPU stage can kill.

libheif, libavif, libjpeg and libpng (through Pillow) and c2pa are native code that a hostile or
unlucky file can send into an endless loop or a crash (an abort, a segfault, the kernel's OOM kill). In
the Ray worker itself a hang would stall the decode task forever, and a crash would kill the worker: Ray
would retry the task and meet the same file again. So the CPU stage hands each file to a persistent child
process and waits for its result under a deadline (``--decode-timeout``). A file that overruns it has the
child killed and gets a ``timeout`` row; a child that dies takes only the file it was working on, which
gets a ``crashed`` row. Either way a new child takes the rest of the batch. Nothing crashes in the Ray
task itself, so Ray never retries the batch: that is how a file that kills its decoder is skipped
instead of met again.

Children come from multiprocessing's ``forkserver``, never from a fork of the Ray worker (whose gRPC
threads may hold locks that a fork would copy, held, into the child). The server imports the decode modules
once (``preload``), so starting a child costs a fork, not the imports; the server is shared by the whole
process, so the first watchdog to start a child decides what it preloads. Each Ray worker keeps its child
for every batch it runs. A child exits when its pipe closes (the worker is gone). While it works on an
item it also carries its own alarm, a little past the deadline, whose default action the kernel carries
out even in native code that never returns to Python: a child stuck in a loop cannot outlive a worker
that died before it could kill it.

:meth:`Watchdog.stream` does the same for work that yields rows (reading an archive's members, a Parquet
file's row groups): each row must arrive within the deadline, and a stall or a crash ends the stream with
:class:`TimedOut` or :class:`Crashed` after the rows already given.
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import pickle
import resource
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from ray import cloudpickle

from aidetect_batch import schema

_READY = "ready"
# Longest a child may take to start (a fork of the forkserver, which imports the decoders once) or load a job.
START_TIMEOUT_S = 120.0
# The child's own alarm fires this long after its item's deadline: the parent, when alive, kills it first.
_GRACE_S = 1.0


@dataclasses.dataclass(frozen=True)
class Failure:
    """Why an item has no result: it ran past its deadline (``timeout``) or its process died (``crashed``).

    Attributes:
        status: :attr:`schema.Status.TIMEOUT` or :attr:`schema.Status.CRASHED`.
        error: What happened, for the row's ``error``.
        elapsed_ms: Time from handing the item over until the watchdog gave up on it.
    """

    status: schema.Status
    error: str
    elapsed_ms: float


class Stopped(Exception):
    """A :meth:`Watchdog.stream` the watchdog ended: the next row did not come in time, or its process died."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.error)
        self.failure = failure

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.failure,)


class TimedOut(Stopped):
    """The next row took longer than the deadline; the child was killed."""


class Crashed(Stopped):
    """The child died (or could not start) before the next row."""


@dataclasses.dataclass(frozen=True)
class _Job:
    """The work function and its settings, pickled once per call of :meth:`Watchdog.map` or
    :meth:`Watchdog.stream`, the deadline, and whether the work yields rows (a stream) or returns one result."""

    blob: bytes
    timeout: float
    stream: bool = False


@dataclasses.dataclass(frozen=True)
class _End:
    """A stream's work has yielded its last row."""


@dataclasses.dataclass(frozen=True)
class _Raised:
    """A stream's work raised ``error`` (after the rows already sent)."""

    error: BaseException


@dataclasses.dataclass
class _Child:
    process: BaseProcess
    conn: Connection
    job: _Job | None = None


class Watchdog:
    """One child process that runs a function on each item in turn, under a deadline per item.

    Args:
        preload: Modules the forkserver imports once, so that a (re)started child finds them imported.
    """

    def __init__(self, preload: Sequence[str] = ()) -> None:
        self.preload = tuple(preload)
        self._child: _Child | None = None
        self._lock = threading.Lock()

    def map(self, work: Callable[[Any, Any], Any], settings: Any, items: Sequence[Any], *, timeout: float) -> list[Any]:
        """``work(item, settings)`` for each item, in a child process: its result, or a :class:`Failure`.

        ``work`` and ``settings`` travel to the child once per call (by Ray's cloudpickle, so a function made
        at run time works too); each item then travels alone, and has ``timeout`` seconds from being handed
        over until its result arrives. An exception ``work`` raises loses only its item (``crashed``).
        """
        job = _Job(cloudpickle.dumps((work, settings)), timeout)
        with self._lock:
            return [self._one(job, it, timeout) for it in items]

    def stream(
        self, work: Callable[[Any, Any], Iterator[Any]], settings: Any, it: Any, *, timeout: float
    ) -> Iterator[Any]:
        """The rows ``work(it, settings)`` yields, produced in a child process: each has ``timeout`` seconds.

        For work that reads a whole container (zlib inflating an archive's members, Arrow decoding a
        Parquet row group): a row that does not come in time raises :class:`TimedOut`, a child that dies
        :class:`Crashed`, after the rows already yielded. An exception ``work`` raises is raised here, as it
        would be in process. A row's bytes (a top-level ``bytes`` in a tuple) travel out of band. The child
        waits for each row to be taken, so only one row is in flight however fast it reads.
        """
        job = _Job(cloudpickle.dumps((work, settings)), timeout, stream=True)
        with self._lock:
            finished = False
            try:
                child = self._started(job, it, "container reader")
                while not isinstance(message := self._await(child, timeout, "container reader"), _End):
                    if isinstance(message, _Raised):
                        finished = True
                        raise message.error
                    yield message
                finished = True
            finally:
                if not finished:
                    self._stop()

    def close(self) -> None:
        """Stop the child (a later :meth:`map` starts another)."""
        with self._lock:
            self._stop()

    @property
    def pid(self) -> int | None:
        """The child's process id, while one runs."""
        return None if self._child is None else self._child.process.pid

    def _one(self, job: _Job, it: Any, timeout: float) -> Any:
        try:
            return self._await(self._started(job, it, "decoder"), timeout, "decoder")
        except Stopped as stopped:
            return stopped.failure

    def _started(self, job: _Job, it: Any, who: str) -> _Child:
        """The child, holding ``job`` and handed ``it``; one that cannot start raises :class:`Crashed`."""
        try:
            return self._hand_over(job, it)
        except (RuntimeError, OSError) as exc:
            self._stop()
            raise Crashed(Failure(schema.Status.CRASHED, f"the {who}'s process could not start: {exc}", 0.0)) from exc

    def _await(self, child: _Child, timeout: float, who: str) -> Any:
        """The child's next message within ``timeout`` seconds; else it is killed and :class:`Stopped` raised."""
        start = time.monotonic()
        ready = child.conn.poll(timeout)
        elapsed_ms = (time.monotonic() - start) * 1000.0
        if ready:
            try:
                return _recv(child.conn)
            except (EOFError, OSError):
                code = self._stop()
        else:
            code = self._stop()
        if not ready or code == -signal.SIGALRM:  # SIGALRM: the child's own alarm beat a late parent
            error = f"the {who} took longer than {timeout:g} s on one item (--decode-timeout); its process was killed"
            raise TimedOut(Failure(schema.Status.TIMEOUT, error, elapsed_ms))
        raise Crashed(Failure(schema.Status.CRASHED, f"the {who}'s process died ({_exit_text(code)})", elapsed_ms))

    def _hand_over(self, job: _Job, it: Any) -> _Child:
        """Send the item to a live child that holds the job. A child found dead before it took the item is
        replaced once: the item is not what killed it."""
        for attempt in (1, 2):
            try:
                child = self._running(job)
                _send(child.conn, _out_of_band(it))
                return child
            except (BrokenPipeError, ConnectionResetError):
                self._stop()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _running(self, job: _Job) -> _Child:
        """The child, started if need be, with ``job`` loaded: neither counts against an item's deadline."""
        if self._child is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(list(self.preload))
            ours, theirs = context.Pipe()
            process = context.Process(target=_serve, args=(theirs,), name="aidetect-decode", daemon=True)
            process.start()
            theirs.close()
            self._child = _Child(process, ours)
            self._await_ready("start")
        if self._child.job is not job:
            _send(self._child.conn, job)
            self._await_ready("load its work")
            self._child.job = job
        return self._child

    def _await_ready(self, what: str) -> None:
        try:
            answered = self._child.conn.poll(START_TIMEOUT_S)  # type: ignore[union-attr]
            ready = _recv(self._child.conn) if answered else None  # type: ignore[union-attr]
        except (EOFError, OSError):
            ready = None
        if ready != _READY:
            code = self._stop()
            raise RuntimeError(f"the decode watchdog's process did not {what} ({_exit_text(code)})")

    def _stop(self) -> int | None:
        """Kill the child, if any, and reap it; its exit code (negative: the signal that ended it)."""
        child, self._child = self._child, None
        if child is None:
            return None
        child.process.kill()
        child.process.join()
        child.conn.close()
        return child.process.exitcode


def _send(conn: Connection, obj: Any) -> None:
    """Send ``obj`` with its large buffers (arrays, file bytes) out of band: each is written once, never
    copied into a pickle and out again."""
    buffers: list[pickle.PickleBuffer] = []
    head = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    conn.send_bytes(struct.pack("<I", len(buffers)) + head)
    for buffer in buffers:
        conn.send_bytes(buffer.raw())


def _recv(conn: Connection) -> Any:
    message = conn.recv_bytes()
    (count,) = struct.unpack_from("<I", message)
    return pickle.loads(memoryview(message)[4:], buffers=[conn.recv_bytes() for _ in range(count)])


def _out_of_band(it: Any) -> Any:
    """An item's bytes (or list or tuple of them, or of other values) marked to travel out of band."""
    if isinstance(it, bytes):
        return pickle.PickleBuffer(it)
    if isinstance(it, list | tuple):
        return type(it)(pickle.PickleBuffer(x) if isinstance(x, bytes) else x for x in it)
    return it


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _serve(conn: Connection) -> None:
    """The child's loop: take a job, then items, answering each with its result; stop when the pipe closes."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a dump of crashing files must not leave a core per crash
    _send(conn, _READY)
    job: _Job | None = None
    work: Callable[[Any, Any], Any] | None = None
    settings: Any = None
    while True:
        try:
            message = _recv(conn)
        except EOFError:
            return
        if isinstance(message, _Job):
            job, (work, settings) = message, cloudpickle.loads(message.blob)
            _send(conn, _READY)
            continue
        if job.stream:  # type: ignore[union-attr]
            _stream_rows(conn, functools.partial(work, message, settings), job.timeout)  # type: ignore[arg-type, union-attr]
            continue
        signal.setitimer(signal.ITIMER_REAL, job.timeout + _GRACE_S)  # type: ignore[union-attr]
        result = _run(work, message, settings)  # type: ignore[arg-type]
        signal.setitimer(signal.ITIMER_REAL, 0)
        _send(conn, result)


def _stream_rows(conn: Connection, produce: Callable[[], Iterator[Any]], timeout: float) -> None:
    """Send each row as it comes, then :class:`_End`, or :class:`_Raised` with what the work raised. The alarm
    covers producing a row, not sending it: the parent may take its time to ask for the next one."""
    try:
        rows = iter(produce())
        while True:
            signal.setitimer(signal.ITIMER_REAL, timeout + _GRACE_S)
            try:
                row = next(rows)
            except StopIteration:
                break
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            _send(conn, _out_of_band(row))
    except Exception as exc:  # noqa: BLE001 - the work's own error is raised in the parent, as in process
        _send(conn, _Raised(portable(exc)))
        return
    _send(conn, _End())


def portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives a pickle round trip (to cross the pipe), else a ``RuntimeError`` saying what it was:
    an exception whose ``__init__`` takes other arguments than its ``args`` cannot be rebuilt."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - any failure to rebuild means it cannot travel
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


def _run(work: Callable[[Any, Any], Any], it: Any, settings: Any) -> Any:
    start = time.monotonic()
    try:
        return work(it, settings)
    except Exception as exc:  # noqa: BLE001 - a Python error in one file's decode loses that file only
        elapsed_ms = (time.monotonic() - start) * 1000.0
        return Failure(schema.Status.CRASHED, f"{type(exc).__name__}: {exc}"[:300], elapsed_ms)


@dataclasses.dataclass(frozen=True)
class Cost:
    """What the watchdog adds per item, measured on the same items in this process and through a child.

    Attributes:
        in_process_ms: Mean time per item calling ``work`` here.
        watched_ms: Mean time per item through :meth:`Watchdog.map` (child already started).
        start_ms: Time to start a child and run the first item through it.
    """

    in_process_ms: float
    watched_ms: float
    start_ms: float

    @property
    def overhead_ms(self) -> float:
        """The watchdog's cost per item: the difference of the two means."""
        return self.watched_ms - self.in_process_ms


def measure_cost(
    work: Callable[[Any, Any], Any],
    settings: Any,
    items: Sequence[Any],
    *,
    preload: Sequence[str] = (),
    repeats: int = 3,
) -> Cost:
    """Time ``work`` over ``items`` in this process and through a fresh :class:`Watchdog` (best of
    ``repeats`` each), for the benchmark of the watchdog's cost per file."""
    watchdog = Watchdog(preload)
    try:
        start = time.perf_counter()
        watchdog.map(work, settings, items[:1], timeout=3600.0)
        start_ms = (time.perf_counter() - start) * 1000.0
        watched = _best(lambda: watchdog.map(work, settings, items, timeout=3600.0), repeats)
    finally:
        watchdog.close()
    here = _best(lambda: [work(it, settings) for it in items], repeats)
    return Cost(here * 1000.0 / len(items), watched * 1000.0 / len(items), start_ms)


def _best(run: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)
