"""Executors: run a per-batch function over a stream of batches, in order, with bounded memory.

``local`` (the default) is a process pool; ``workers=1`` runs in-process. ``ray`` sends the same batches
to Ray actors and is imported only when asked for. Each worker builds its state once (``setup``), then
handles batches. At most ``2 * workers`` batches are in flight and results come back in submission order,
so output does not depend on the number of workers or on timing. Local workers die with the process that
started them (``die_with_parent``), even when it is killed with SIGKILL.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Protocol

from ..errors import UserError

EXECUTORS = ("local", "ray")


class BatchWorker(Protocol):
    """A picklable object whose ``setup`` runs once per worker process and ``__call__`` once per batch."""

    def setup(self) -> None: ...

    def __call__(self, batch: Any) -> Any: ...


_WORKER: BatchWorker | None = None
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Terminated(UserError):
    """SIGTERM: the job stops as after Ctrl-C (partial output removed, workers stopped); exit 143."""

    exit_code = 128 + signal.SIGTERM


def stop_on_sigterm() -> None:
    """Make SIGTERM raise ``Terminated`` in the main thread, so a job unwinds and cleans up when stopped."""

    def handler(signum: int, frame: Any) -> None:
        raise Terminated("terminated by SIGTERM before the run finished; its output was not committed")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def die_with_parent(parent: int) -> None:
    """In a worker process: end when ``parent`` ends, however it ends (even SIGKILL).

    The kernel's parent-death signal (Linux ``prctl``) does it at once; a watchdog thread that polls the
    parent pid is the fallback elsewhere and covers a parent that died before the ``prctl``. SIGINT and
    SIGTERM are ignored: the parent receives them and shuts its workers down.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass

    def watchdog() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watchdog, name="parent-watchdog", daemon=True).start()


def _init_worker(worker: BatchWorker, parent: int) -> None:
    global _WORKER
    die_with_parent(parent)
    worker.setup()
    _WORKER = worker


def _call_worker(batch: Any) -> Any:
    assert _WORKER is not None
    return _WORKER(batch)


def ordered_map(
    worker: BatchWorker, batches: Iterable[Any], workers: int = 1, executor: str = "local"
) -> Iterator[Any]:
    """Yield ``worker(batch)`` for every batch, in input order."""
    if workers < 1:
        raise UserError("--workers must be at least 1")
    if executor not in EXECUTORS:
        raise UserError(f"unknown executor '{executor}' (choose from: {', '.join(EXECUTORS)})")
    if executor == "ray":
        yield from _ray_map(worker, batches, workers)
        return
    if workers == 1:
        worker.setup()
        for batch in batches:
            yield worker(batch)
        return
    # Worker processes replace library threads (tokenizers would otherwise warn in every forked worker).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(worker, os.getpid()))
    try:
        yield from windowed(
            lambda b: pool.submit(_call_worker, b), lambda f: f.result(), batches, 2 * workers
        )
    finally:
        # On an error or an interrupt, batches not started are dropped; running ones (bounded) finish.
        pool.shutdown(wait=True, cancel_futures=True)


def windowed(
    submit: Callable[[Any], Any], result: Callable[[Any], Any], items: Iterable[Any], window: int
) -> Iterator[Any]:
    """Submit items with at most ``window`` pending; yield ``result(handle)`` in submission order."""
    pending: deque[Any] = deque()
    for item in items:
        pending.append(submit(item))
        if len(pending) >= window:
            yield result(pending.popleft())
    while pending:
        yield result(pending.popleft())


def _ray_map(worker: BatchWorker, batches: Iterable[Any], workers: int) -> Iterator[Any]:
    """The same windowed, ordered map over Ray actors: actor ``i`` gets batches ``i, i + N, ...``.

    Uses the Ray runtime already started in this process (``ray.init``), else connects to ``RAY_ADDRESS``
    or starts a local one. The actors are killed when the map ends, finished or not, so an error or an
    interrupt drops the queued batches as the local pool does.
    """
    try:
        import ray
    except ImportError as e:
        raise UserError(
            "--executor ray needs Ray: pip install 'openseek-hal[ray]' (or use --executor local)"
        ) from e
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True, log_to_driver=False)

    @ray.remote
    class _Actor:
        def __init__(self, w: BatchWorker):
            w.setup()
            self.w = w

        def run(self, batch: Any) -> Any:
            return self.w(batch)

    actors = [_Actor.remote(worker) for _ in range(workers)]
    counter = iter(range(1 << 62))
    try:
        yield from windowed(
            lambda b: actors[next(counter) % workers].run.remote(b), ray.get, batches, 2 * workers
        )
    finally:
        for actor in actors:
            ray.kill(actor)
