"""Rank functions for the comm tests: module level, so that spawned ranks can import them."""

from __future__ import annotations

import os
import time

import torch

from openseek_hal.comm import CollectiveError


def rank_and_sum(comm):
    t = torch.tensor([float(comm.rank + 1)], device=comm.device)
    comm.all_reduce(t)
    return comm.rank, comm.world_size, float(t)


def die_on_rank_one(comm):
    comm.barrier()  # both ranks are set up
    if comm.rank == 1:
        os._exit(3)
    time.sleep(0.5)  # let rank 1 be gone
    comm.all_reduce(torch.ones(4))


def rank_one_never_joins(comm, pid_dir):
    with open(os.path.join(pid_dir, str(comm.rank)), "w") as f:
        f.write(str(os.getpid()))
    if comm.rank == 1:
        time.sleep(120)
    comm.all_reduce(torch.ones(4))


def hang_on_rank_one(comm, stamp_dir):
    """Rank 1 hangs (says when it started to); rank 0 waits for it in an all_reduce that times out."""
    if comm.rank == 1:
        with open(os.path.join(stamp_dir, "hang"), "w") as f:
            f.write(repr(time.time()))
        time.sleep(120)
    comm.all_reduce(torch.ones(4))


def raise_on_rank_one(comm):
    if comm.rank == 1:
        raise ValueError("bad value on purpose")
    return comm.rank


def mismatches(comm):
    """Each scenario makes the ranks disagree; every rank gets the same clear error and goes on."""
    me = comm.rank
    scenarios = {
        "shape": lambda: comm.all_reduce(torch.ones(3 + me)),
        "dtype": lambda: comm.all_reduce(torch.ones(3, dtype=torch.float32 if me == 0 else torch.bfloat16)),
        "reduce op": lambda: comm.all_reduce(torch.ones(3), op="sum" if me == 0 else "max"),
        "collective": lambda: comm.all_reduce(torch.ones(3)) if me == 0 else comm.broadcast(torch.ones(3), 0),
        "root": lambda: comm.broadcast(torch.ones(3), src=me),
        "splits": lambda: comm.all_to_all_single(torch.empty(4), torch.ones(4), [2, 2],
                                                 [2, 2] if me else [1, 3]),
        "recv size": lambda: comm.send(torch.ones(5), 1) if me == 0 else comm.recv(torch.empty(6), 0),
    }
    messages = {}
    for name, call in scenarios.items():
        try:
            call()
            messages[name] = None
        except CollectiveError as e:
            messages[name] = str(e)
    t = torch.ones(2)
    comm.all_reduce(t)  # the group is still usable afterwards
    messages["after"] = t.tolist()
    return messages


def local_errors(comm):
    """Bad arguments fail on the calling rank before any traffic."""
    calls = {
        "all_gather size": lambda: comm.all_gather(torch.empty(3), torch.ones(2)),
        "reduce_scatter size": lambda: comm.reduce_scatter(torch.empty(2), torch.ones(3)),
        "splits sum": lambda: comm.all_to_all_single(torch.empty(4), torch.ones(4), [2, 2], [1, 1]),
        "avg of ints": lambda: comm.all_reduce(torch.ones(2, dtype=torch.int64), op="avg"),
        "unknown op": lambda: comm.all_reduce(torch.ones(2), op="mean"),
        "non-contiguous": lambda: comm.all_reduce(torch.ones(4, 4).t()),
        "bad src": lambda: comm.broadcast(torch.ones(2), src=comm.world_size),
        "dtype pair": lambda: comm.all_gather(torch.empty(4, dtype=torch.int64), torch.ones(2)),
    }
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = None
        except CollectiveError as e:
            out[name] = str(e)
    return out


def hier_layout(comm):
    t = torch.full((3,), float(comm.rank))
    comm.all_reduce(t, op="max")
    return comm.kinds, t.tolist()


def unpicklable_result(comm):
    return lambda: None


def policy_source(comm):
    return comm.policy.source
