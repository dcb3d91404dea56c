"""The ``host`` adaptor: device -> host, the collective in host memory, host -> device; any chip.

The portable path for a chip without its own collective library: it needs nothing from the chip
but copies to and from host memory. The bytes move through `openseek_hal.comm.staging`: chunked,
through pinned reusable buffers, with the copies of neighbouring chunks overlapping the host
collective, over a shared-memory segment when every rank is on this host (else gloo). Options:
``chunk_bytes`` (default ``$OPENSEEK_HAL_HOST_CHUNK_BYTES`` or 1 MiB) and ``transport``
(``auto``/``shm``/``gloo``, default ``$OPENSEEK_HAL_HOST_TRANSPORT`` or ``auto``).

With ``async_op=True`` a collective runs on the communicator's one worker thread and ``wait()``
returns once the result is on the device; calls of one communicator run in the order issued
(a synchronous call first waits for the asynchronous ones before it).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist

from .adaptors import Adaptor
from .base import BaseCommunicator, StagedWork
from .rendezvous import gloo_group
from .staging import make_transport, transport_options
from .torch_dist import TorchCommunicator, new_torch_group
from .tune import shared_policy, topology

_CPU = torch.device("cpu")


def to_host(t: torch.Tensor) -> torch.Tensor:
    return t if t.device.type == "cpu" else t.to(_CPU)


def host_buffer(t: torch.Tensor) -> torch.Tensor:
    return t if t.device.type == "cpu" else torch.empty(t.shape, dtype=t.dtype, device=_CPU)


def finish(work: Any, pairs: list[tuple[torch.Tensor, torch.Tensor]], async_op: bool) -> Any:
    """Copy each host result back into its device tensor once ``work`` completes."""
    def copy_back() -> None:
        for host, device in pairs:
            if host is not device:
                device.copy_(host)

    if async_op:
        return StagedWork(work, copy_back)
    if work is not None:
        work.wait()
    copy_back()
    return None


class _FutureWork:
    """The handle of a collective running on the worker thread; ``wait()`` raises what it raised."""

    __slots__ = ("_future",)

    def __init__(self, future: Future):
        self._future = future

    def wait(self) -> None:
        self._future.result()

    def is_completed(self) -> bool:
        return self._future.done()


class Ordered:
    """Runs a communicator's collectives in issue order: synchronous ones inline when nothing is
    pending, asynchronous ones (and anything issued behind them) on one worker thread."""

    def __init__(self, name: str):
        self._name = name
        self._pool: ThreadPoolExecutor | None = None
        self._last: Future | None = None

    def run(self, call: Any, async_op: bool) -> Any:
        # A collective is never part of an autograd graph: its copies into the output (possibly the
        # output of an autograd Function, on another thread) must not be recorded.
        def untracked() -> None:
            with torch.no_grad():
                call()

        pending = self._last is not None and not self._last.done()
        if not async_op and not pending:
            untracked()
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"openseek-hal-{self._name}")
        self._last = self._pool.submit(untracked)
        work = _FutureWork(self._last)
        if async_op:
            return work
        work.wait()
        return None


class HostCommunicator(BaseCommunicator):
    adaptor = "host"

    def __init__(self, cpu: TorchCommunicator, device: torch.device, *, check: bool, chunk_bytes: int | None = None,
                 transport: str | None = None):
        super().__init__(rank=cpu.rank, world_size=cpu.world_size, group_name=cpu.group_name,
                         global_ranks=cpu.global_ranks, device=device, timeout=cpu.timeout,
                         check_group=cpu.pg if check else None)
        self._cpu = cpu  # the same ranks over gloo (send/recv, barrier; the transport's setup)
        self._options = {"chunk_bytes": chunk_bytes, "transport": transport}
        try:  # rank 0's tuning table (chunk sizes per collective and size), on every rank
            self.policy = shared_policy(cpu, topology("host", [device.type] * cpu.world_size),
                                        fixed_chunk=chunk_bytes is not None)
            self.transport = make_transport(cpu, device, **transport_options(self._options, self.policy))
        except ValueError as e:
            raise self._bad("create", str(e)) from None
        self._order = Ordered("host")

    def _staged(self, call: Any, async_op: bool, op: str = "", nbytes: int = 0) -> Any:
        copier = self.transport.copier
        ready = copier.caller_ready()  # on this thread: the caller's stream has written the inputs
        chunk = self.policy.chunk_bytes(op, nbytes) if op else None

        def run() -> None:
            copier.set_ready(ready)
            self.transport.use_chunk(chunk)
            call()

        return self._order.run(run, async_op)

    def _all_reduce(self, tensor, op, async_op):
        return self._staged(lambda: self.transport.all_reduce(tensor, op), async_op, "all_reduce", _nbytes(tensor))

    def _all_gather(self, output, input, async_op):
        return self._staged(lambda: self.transport.all_gather(output, input), async_op, "all_gather", _nbytes(output))

    def _reduce_scatter(self, output, input, op, async_op):
        return self._staged(lambda: self.transport.reduce_scatter(output, input, op), async_op, "reduce_scatter",
                            _nbytes(input))

    def _all_to_all_single(self, output, input, output_splits, input_splits, async_op):
        return self._staged(lambda: self.transport.all_to_all(output, input, output_splits, input_splits),
                            async_op, "all_to_all_single", max(_nbytes(input), _nbytes(output)))

    def _broadcast(self, tensor, src, async_op):
        return self._staged(lambda: self.transport.broadcast(tensor, src), async_op)

    def _send(self, tensor, dst):
        self._order.run(lambda: self._cpu._send(to_host(tensor), dst), False)

    def _recv(self, tensor, src):
        def recv() -> None:
            host = host_buffer(tensor)
            self._cpu._recv(host, src)
            finish(None, [(host, tensor)], False)

        self._order.run(recv, False)

    def _barrier(self):
        self._order.run(self._cpu._barrier, False)

    def _new_group(self, ranks):
        cpu = new_torch_group(self._cpu, ranks, backend=self._cpu.pg_backend, check=False)
        return None if cpu is None else HostCommunicator(cpu, self.device, check=self.check, **self._options)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def host_view(pg: Any, *, name: str, timeout: float) -> TorchCommunicator:
    """A CPU `TorchCommunicator` over ``pg``'s ranks through gloo (``pg`` itself if it has gloo)."""
    cpu_pg = gloo_group(pg, str(dist.get_backend(pg)), dist.get_process_group_ranks(pg), timeout)
    return TorchCommunicator(cpu_pg, _CPU, name=name, timeout=timeout)


def create(backend: Any, pg: Any, *, name: str, timeout: float, check: bool, chunk_bytes: int | None = None,
           transport: str | None = None, **options: Any) -> HostCommunicator:
    if options:
        raise TypeError(f"the host adaptor takes only 'chunk_bytes' and 'transport', got {sorted(options)}")
    return HostCommunicator(host_view(pg, name=name, timeout=timeout), backend.device.torch_device,
                            check=check, chunk_bytes=chunk_bytes, transport=transport)


class HostAdaptor(Adaptor):
    """``host``: stage through host memory; any chip."""

    name = "host"
    device_types = ()
    description = "device -> host, a host collective (shared memory or gloo), host -> device"

    @classmethod
    def create(cls, backend: Any, pg: Any, **kwargs: Any) -> HostCommunicator:
        return create(backend, pg, **kwargs)
