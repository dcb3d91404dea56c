"""The parallel layout of a job: data-parallel ranks x expert-parallel groups, and their communicators.

Every rank holds the dense weights and the shared experts, sees its own slice of every global
batch, and reduces the dense gradients over the whole world. With ``expert_parallel = E`` the
ranks form groups of E consecutive ranks (on one node when E <= GPUs per node, so the token
all-to-all stays on the fast links): rank ``g * E + i`` holds expert shard ``i`` of every MoE layer,
its tokens travel within group ``g``, and the shard's gradients are reduced over the ranks with
the same ``i`` (its replicas). The model never sees ranks: `expert_parallel.apply_expert_parallel`
changes it from outside.
"""

from __future__ import annotations

import torch

from ..comm import Communicator


class ParallelLayout:
    """The rank's view of the job; ``world=None`` is a single process."""

    def __init__(self, world: Communicator | None, expert_parallel: int = 1):
        self.world = world
        self.rank = world.rank if world is not None else 0
        self.world_size = world.world_size if world is not None else 1
        if self.world_size % expert_parallel:
            raise ValueError(f"expert_parallel={expert_parallel} does not divide the world of {self.world_size}")
        self.expert_parallel = expert_parallel
        self.expert_replica = self.rank // expert_parallel  # which copy of its expert shard this rank holds
        # this rank's EP group (None: experts not sharded) and the replicas of its expert shard (None: no replicas)
        self.ep_comm: Communicator | None = None
        self.expert_dp_comm: Communicator | None = world
        if world is not None and expert_parallel > 1:
            from .expert_parallel import expert_parallel_groups

            groups = expert_parallel_groups(world, expert_parallel)
            self.ep_comm, self.expert_dp_comm = groups.ep, groups.expert_dp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world is not None:
            self.world.barrier()

    def mean_tensor(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar over the ranks, reduced in float64, left on the device (no host sync)."""
        t = value.detach().double().reshape(1).clone()
        if self.world is not None:
            self.world.all_reduce(t, op="avg")
        return t[0]

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over the ranks, reduced in float64 (the global batch's loss)."""
        return float(self.mean_tensor(value))

    def max(self, value: float) -> float:
        if self.world is None:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.world.device)
        self.world.all_reduce(t, op="max")
        return t.item()
