"""Data parallelism through the HAL's `Communicator`: one replica per rank, gradients averaged.

Every rank builds the same model from the same seed and takes its slice of each global batch, so a
run on N ranks computes what one rank computes with the whole batch (up to the order of float
additions). Gradients are averaged in one flat all-reduce per step; the aux-loss-free expert loads
are summed across ranks by the model's own ``update_expert_bias(comm)``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..comm import Communicator


class DataParallel:
    """The rank's view of a data-parallel job; with ``comm=None`` a single process."""

    def __init__(self, comm: Communicator | None):
        self.comm = comm
        self.rank = comm.rank if comm is not None else 0
        self.world_size = comm.world_size if comm is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (`config.validate` checks that it splits evenly)."""
        per_rank = batch.shape[0] // self.world_size
        return batch[self.rank * per_rank:(self.rank + 1) * per_rank]

    def average_gradients(self, model: nn.Module) -> None:
        """Average every parameter's gradient over the ranks in one flat all-reduce."""
        if self.comm is None:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.comm.all_reduce(flat, op="avg")
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g)
            offset += n

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over the ranks (the global batch's loss)."""
        if self.comm is None:
            return value.item()
        t = value.detach().double().reshape(1).clone()
        self.comm.all_reduce(t, op="avg")
        return t.item()
