"""The ``host`` adaptor: device -> host copy, the collective over gloo on the CPU, host -> device copy.

The portable fallback for a chip without its own collective library: it needs nothing from the
chip but copies to and from host memory. With ``async_op=True`` the gloo collective runs in the
background and ``wait()`` copies the result back to the device.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .adaptors import Adaptor
from .base import BaseCommunicator, StagedWork
from .rendezvous import gloo_group
from .torch_dist import TorchCommunicator, new_torch_group

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


class HostCommunicator(BaseCommunicator):
    adaptor = "host"

    def __init__(self, cpu: TorchCommunicator, device: torch.device, *, check: bool):
        super().__init__(rank=cpu.rank, world_size=cpu.world_size, group_name=cpu.group_name,
                         global_ranks=cpu.global_ranks, device=device, timeout=cpu.timeout,
                         check_group=cpu.pg if check else None)
        self._cpu = cpu  # the same ranks over gloo

    def _all_reduce(self, tensor, op, async_op):
        host = to_host(tensor)
        return finish(self._cpu._all_reduce(host, op, async_op), [(host, tensor)], async_op)

    def _all_gather(self, output, input, async_op):
        host = host_buffer(output)
        return finish(self._cpu._all_gather(host, to_host(input), async_op), [(host, output)], async_op)

    def _reduce_scatter(self, output, input, op, async_op):
        host = host_buffer(output)
        return finish(self._cpu._reduce_scatter(host, to_host(input), op, async_op), [(host, output)],
                      async_op)

    def _all_to_all_single(self, output, input, output_splits, input_splits, async_op):
        host = host_buffer(output)
        work = self._cpu._all_to_all_single(host, to_host(input), output_splits, input_splits, async_op)
        return finish(work, [(host, output)], async_op)

    def _broadcast(self, tensor, src, async_op):
        host = to_host(tensor)
        return finish(self._cpu._broadcast(host, src, async_op), [(host, tensor)], async_op)

    def _send(self, tensor, dst):
        self._cpu._send(to_host(tensor), dst)

    def _recv(self, tensor, src):
        host = host_buffer(tensor)
        self._cpu._recv(host, src)
        finish(None, [(host, tensor)], False)

    def _barrier(self):
        self._cpu._barrier()

    def _new_group(self, ranks):
        cpu = new_torch_group(self._cpu, ranks, backend=self._cpu.pg_backend, check=False)
        return None if cpu is None else HostCommunicator(cpu, self.device, check=self.check)


def host_view(pg: Any, *, name: str, timeout: float) -> TorchCommunicator:
    """A CPU `TorchCommunicator` over ``pg``'s ranks through gloo (``pg`` itself if it has gloo)."""
    cpu_pg = gloo_group(pg, str(dist.get_backend(pg)), dist.get_process_group_ranks(pg), timeout)
    return TorchCommunicator(cpu_pg, _CPU, name=name, timeout=timeout)


def create(backend: Any, pg: Any, *, name: str, timeout: float, check: bool,
           **options: Any) -> HostCommunicator:
    if options:
        raise TypeError(f"the host adaptor takes no options, got {sorted(options)}")
    return HostCommunicator(host_view(pg, name=name, timeout=timeout), backend.device.torch_device,
                            check=check)


class HostAdaptor(Adaptor):
    """``host``: stage through host memory; any chip."""

    name = "host"
    device_types = ()
    description = "device -> host, a host collective (shared memory or gloo), host -> device"

    @classmethod
    def create(cls, backend: Any, pg: Any, **kwargs: Any) -> HostCommunicator:
        return create(backend, pg, **kwargs)
