"""The ``acme`` communicator adaptor: openseek-hal's collectives on an ``acme`` process group.

Registered through the ``openseek_hal.comm_adaptors`` entry point (see pyproject.toml). On a job
whose default group already runs ``acme`` (the ``acme`` backend) it uses that group; on any other
CPU job (``--backend cpu --set comm_adaptor=acme``) it makes an ``acme`` group over the same ranks.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from openseek_hal.comm.adaptors import Adaptor
from openseek_hal.comm.base import BaseCommunicator, StagedWork

_OPS = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class AcmeCommunicator(BaseCommunicator):
    adaptor = "acme"

    def __init__(self, pg: Any, device: torch.device, *, name: str, timeout: float, check_group: Any | None):
        super().__init__(rank=dist.get_rank(pg), world_size=dist.get_world_size(pg), group_name=name,
                         global_ranks=dist.get_process_group_ranks(pg), device=device, timeout=timeout,
                         check_group=check_group)
        self.pg = pg

    def _average(self, work: Any, tensor: torch.Tensor, op: str, async_op: bool) -> Any:
        if op != "avg":
            return work
        if async_op:
            return StagedWork(work, lambda: tensor.div_(self.world_size))
        tensor.div_(self.world_size)
        return None

    def _all_reduce(self, tensor, op, async_op):
        work = dist.all_reduce(tensor, op=_OPS[op], group=self.pg, async_op=async_op)
        return self._average(work, tensor, op, async_op)

    def _all_gather(self, output, input, async_op):
        return dist.all_gather_single(output.view(-1), input.view(-1), group=self.pg, async_op=async_op)

    def _reduce_scatter(self, output, input, op, async_op):
        work = dist.reduce_scatter_single(output.view(-1), input.view(-1), op=_OPS[op], group=self.pg,
                                          async_op=async_op)
        return self._average(work, output, op, async_op)

    def _all_to_all_single(self, output, input, output_splits, input_splits, async_op):
        return dist.all_to_all_single(output, input, output_splits, input_splits, group=self.pg, async_op=async_op)

    def _broadcast(self, tensor, src, async_op):
        return dist.broadcast(tensor, src=self.global_ranks[src], group=self.pg, async_op=async_op)

    def _send(self, tensor, dst):
        dist.send(tensor, dst=self.global_ranks[dst], group=self.pg)

    def _recv(self, tensor, src):
        dist.recv(tensor, src=self.global_ranks[src], group=self.pg)

    def _barrier(self):
        dist.barrier(group=self.pg)

    def _new_group(self, ranks):
        return _communicator([self.global_ranks[r] for r in ranks], self.device, self.timeout, self.check,
                             name=f"{self.group_name}[{','.join(map(str, ranks))}]", member=self.rank in ranks)


def _communicator(global_ranks: list[int], device: torch.device, timeout: float, check: bool, *, name: str,
                  member: bool, pg: Any | None = None) -> AcmeCommunicator | None:
    # every process of the job creates the same groups in the same order (torch.distributed's rule)
    td = timedelta(seconds=timeout)
    if pg is None or "acme" not in str(dist.get_backend(pg)):
        pg = dist.new_group(global_ranks, timeout=td, backend="cpu:acme")
    check_group = dist.new_group(global_ranks, timeout=td, backend="gloo") if check else None
    if not member:
        return None
    return AcmeCommunicator(pg, device, name=name, timeout=timeout, check_group=check_group)


class AcmeAdaptor(Adaptor):
    """The entry point's class: what openseek-hal asks of an adaptor."""

    name = "acme"
    device_types = ("cpu",)
    description = "Acme CCL (example plugin: a Python ProcessGroup over gloo)"

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        # TODO(vendor): probe the library (cheaply, importing it here, never at module import).
        if not dist.is_available():
            return False, "this PyTorch was built without torch.distributed"
        return True, ""

    @classmethod
    def create(cls, backend: Any, pg: Any, *, name: str, timeout: float, check: bool,
               **options: Any) -> AcmeCommunicator:
        if options:
            raise TypeError(f"the acme adaptor takes no options, got {sorted(options)}")
        from . import process_group

        process_group.register()
        comm = _communicator(dist.get_process_group_ranks(pg), backend.device.torch_device, timeout, check,
                             name=name, member=True, pg=pg)
        assert comm is not None
        return comm
