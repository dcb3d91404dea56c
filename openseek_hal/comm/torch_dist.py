"""The ``torch`` adaptor: a torch.distributed process group (nccl on NVIDIA GPUs, gloo on the CPU, ...).

The thinnest adaptor: each collective is one torch.distributed call on the group, so that its cost
over raw torch.distributed is the Python of `BaseCommunicator` (argument checks, error
translation). Where a backend lacks a reduce op (gloo has no native average) the adaptor sums and
divides.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .adaptors import Adaptor
from .base import BaseCommunicator, StagedWork, all_gather_flat
from .rendezvous import gloo_group

# torch 2.13 renamed the flat-tensor collectives; 2.11 (the GPU image) has only the old names.
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class TorchCommunicator(BaseCommunicator):
    adaptor = "torch"

    def __init__(self, pg: Any, device: torch.device, *, name: str, timeout: float,
                 check_group: Any | None = None):
        super().__init__(rank=dist.get_rank(pg), world_size=dist.get_world_size(pg), group_name=name,
                         global_ranks=dist.get_process_group_ranks(pg), device=device, timeout=timeout,
                         check_group=check_group)
        self.pg, self.pg_backend = pg, str(dist.get_backend(pg))
        backend = self.pg_backend
        # torch maps AVG onto NCCL's ncclAvg; other backends get sum-then-divide.
        self._native_avg = device.type == "cuda" and "nccl" in backend
        self._ops = dict(_OPS, avg=dist.ReduceOp.AVG if self._native_avg else dist.ReduceOp.SUM)
        self._barrier_devices = [device.index] if device.type == "cuda" and device.index is not None else None

    def _averaged(self, work: Any, tensor: torch.Tensor, op: str, async_op: bool) -> Any:
        if op != "avg" or self._native_avg:
            return work
        after = lambda: tensor.div_(self.world_size)
        if async_op:
            return StagedWork(work, after)
        after()
        return None

    def _all_reduce(self, tensor, op, async_op):
        work = dist.all_reduce(tensor, op=self._ops[op], group=self.pg, async_op=async_op)
        return self._averaged(work, tensor, op, async_op)

    def _all_gather(self, output, input, async_op):
        return all_gather_flat(output.view(-1), input.view(-1), group=self.pg, async_op=async_op)

    def _reduce_scatter(self, output, input, op, async_op):
        work = _reduce_scatter_flat(output.view(-1), input.view(-1), op=self._ops[op], group=self.pg,
                                    async_op=async_op)
        return self._averaged(work, output, op, async_op)

    def _all_to_all_single(self, output, input, output_splits, input_splits, async_op):
        return dist.all_to_all_single(output, input, output_splits, input_splits, group=self.pg,
                                      async_op=async_op)

    def _broadcast(self, tensor, src, async_op):
        return dist.broadcast(tensor, src=self.global_ranks[src], group=self.pg, async_op=async_op)

    def _send(self, tensor, dst):
        dist.send(tensor, dst=self.global_ranks[dst], group=self.pg)

    def _recv(self, tensor, src):
        dist.recv(tensor, src=self.global_ranks[src], group=self.pg)

    def _barrier(self):
        dist.barrier(group=self.pg, device_ids=self._barrier_devices)

    def _new_group(self, ranks):
        return new_torch_group(self, ranks, backend=self.pg_backend, check=self.check)


def new_torch_group(parent: BaseCommunicator, ranks: list[int], *, backend: str, check: bool,
                    device: torch.device | None = None, name: str | None = None) -> TorchCommunicator | None:
    """A `TorchCommunicator` over ``ranks`` of ``parent``; None on the ranks outside.

    Every process of the job calls this, in the same order (torch.distributed's rule for groups).
    """
    global_ranks = [parent.global_ranks[r] for r in ranks]
    pg = dist.new_group(global_ranks, timeout=timedelta(seconds=parent.timeout), backend=backend)
    check_group = gloo_group(pg, backend, global_ranks, parent.timeout) if check else None
    if parent.rank not in ranks:
        return None
    return TorchCommunicator(pg, device or parent.device, timeout=parent.timeout, check_group=check_group,
                             name=name or f"{parent.group_name}[{','.join(map(str, ranks))}]")


def create(backend: Any, pg: Any, *, name: str, timeout: float, check: bool,
           **options: Any) -> TorchCommunicator:
    if options:
        raise TypeError(f"the torch adaptor takes no options, got {sorted(options)}")
    check_group = None
    if check:
        check_group = gloo_group(pg, str(dist.get_backend(pg)), dist.get_process_group_ranks(pg), timeout)
    return TorchCommunicator(pg, backend.device.torch_device, name=name, timeout=timeout,
                             check_group=check_group)


class TorchAdaptor(Adaptor):
    """``torch``: one torch.distributed call per collective on the backend's own process group."""

    name = "torch"
    device_types = ()
    description = "one torch.distributed call per collective (the backend's dist_backend)"

    @classmethod
    def create(cls, backend: Any, pg: Any, **kwargs: Any) -> TorchCommunicator:
        return create(backend, pg, **kwargs)
