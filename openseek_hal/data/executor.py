"""Executors: run a per-batch function over a stream of batches, in order, with bounded memory.

``local`` (the default) is a process pool; ``workers=1`` runs in-process. ``ray`` sends the same batches
to Ray actors and is imported only when asked for. Each worker builds its state once (``setup``), then
handles batches. At most ``2 * workers`` batches are in flight and results come back in submission order,
so output does not depend on the number of workers or on timing.
"""

from __future__ import annotations

import os
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


def _init_worker(worker: BatchWorker) -> None:
    global _WORKER
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
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(worker,)) as pool:
        yield from windowed(
            lambda b: pool.submit(_call_worker, b), lambda f: f.result(), batches, 2 * workers
        )


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
    try:
        import ray
    except ImportError as e:
        raise UserError(
            "--executor ray needs Ray: pip install 'ray[default]' (or use --executor local)"
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
    yield from windowed(
        lambda b: actors[next(counter) % workers].run.remote(b), ray.get, batches, 2 * workers
    )
