"""Joining a job: initialize torch.distributed with a rendezvous that names the ranks that never came.

Every adaptor rides on a torch.distributed default group (it carries the store, and gloo for the
host-staged paths). `init_distributed` starts it from ``env://`` (torchrun) or from a given
store (`launch`). Before ``init_process_group`` every rank checks in under its own key in the store
and waits for the others; a rank that never joins then gives, on every rank that did, a
`CollectiveTimeoutError` that lists the missing ranks, within the timeout.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from .base import describe_group
from .errors import CollectiveError, CollectiveTimeoutError

DEFAULT_TIMEOUT = 600.0
_JOIN_PREFIX = "openseek_hal/joined/"
_timeout_of_world: float | None = None


def process_group_backend(device_type: str, dist_backend: str) -> str:
    """The torch.distributed backend string: the chip's own, plus gloo for host (CPU) tensors."""
    if dist_backend == "gloo":
        return "gloo"
    return f"cpu:gloo,{device_type}:{dist_backend}"


def world_timeout() -> float:
    """The timeout the default group was started with (`DEFAULT_TIMEOUT` if it was not started here)."""
    return _timeout_of_world if _timeout_of_world is not None else DEFAULT_TIMEOUT


def init_distributed(device_type: str, dist_backend: str, *, rank: int | None = None,
                     world_size: int | None = None, store: Any | None = None,
                     timeout: float = DEFAULT_TIMEOUT) -> None:
    """Start the default group unless it is running. Without ``store``, rendezvous through ``env://``."""
    global _timeout_of_world
    if dist.is_initialized():
        return
    td = timedelta(seconds=timeout)
    if store is None:
        for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
            if var not in os.environ:
                raise CollectiveError(f"torch.distributed is not initialized and ${var} is not set: start "
                                      "the job with torchrun, or use openseek_hal.comm.launch",
                                      op="init", rank=rank, group="world")
        store, rank, world_size = next(dist.rendezvous("env://", timeout=td))
    assert rank is not None and world_size is not None
    _wait_for_everyone(store, rank, world_size, timeout)
    dist.init_process_group(process_group_backend(device_type, dist_backend), store=store, rank=rank,
                            world_size=world_size, timeout=td)
    _timeout_of_world = timeout


def _wait_for_everyone(store: Any, rank: int, world_size: int, timeout: float) -> None:
    store.set(f"{_JOIN_PREFIX}{rank}", "1")
    keys = [f"{_JOIN_PREFIX}{r}" for r in range(world_size)]
    try:
        store.wait(keys, timedelta(seconds=timeout))
    except RuntimeError as e:  # DistStoreError on timeout
        missing = [r for r, key in enumerate(keys) if not store.check([key])]
        group = describe_group("world", range(world_size))
        raise CollectiveTimeoutError(
            f"rendezvous on rank {rank} of group {group} timed out after {timeout:g} s: "
            f"rank(s) {missing or '?'} never joined", op="rendezvous", rank=rank, group="world") from e


def gloo_group(pg: Any, pg_backend: str, global_ranks: list[int], timeout: float) -> Any:
    """``pg`` itself when it carries CPU tensors over gloo, else a new gloo group over the same ranks.

    Like every group creation, all processes of the job call this in the same order, members of
    ``global_ranks`` or not (non-members pass the non-member ``pg`` and get a non-member back).
    """
    if "gloo" in pg_backend:
        return pg
    return dist.new_group(global_ranks, timeout=timedelta(seconds=timeout), backend="gloo")


def shutdown() -> None:
    """End the job's collectives: wait for every rank, then destroy torch.distributed's groups.

    The barrier matters: a rank that tears its gloo connections down while a peer still finishes a
    collective on them makes that peer's process abort.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
