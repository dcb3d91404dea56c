"""Rank functions for test_comm_staging.py (module level: `launch` pickles them into fresh processes).

Every rank builds every rank's inputs from a seed, so each result is checked on the rank against a
reference computed independently (float64, or exact copies), with no second collective involved.
"""

from __future__ import annotations

import os
import time
import zlib

import torch

# sizes around the 4 KiB chunks the tests use (1024 float32 / 2048 bfloat16 / 512 float64 elements)
SIZES = (0, 1, 7, 511, 512, 513, 1023, 1024, 1025, 2047, 2049, 4097, 3 * 2048 + 5)
DTYPES = (torch.float32, torch.bfloat16, torch.float64, torch.int64)


def values(rank: int, n: int, dtype: torch.dtype, salt: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * salt + rank)
    if dtype == torch.int64:
        return torch.randint(-(2 ** 40), 2 ** 40, (n,), generator=g, dtype=torch.int64)
    return torch.randn(n, generator=g, dtype=torch.float64).to(dtype)


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def sum_bound(parts: torch.Tensor, dtype: torch.dtype, divisor: int = 1) -> torch.Tensor:
    """Elementwise bound on |computed - exact| for a sum of W values in ``dtype`` (recursive summation:
    (W-1)·u·Σ|x| for the additions, plus u·|result| for the final rounding), divided by ``divisor``
    for an average (and u·|result| more for the division's rounding)."""
    if not dtype.is_floating_point:
        return torch.zeros(parts.shape[1:], dtype=torch.float64)
    u = unit_roundoff(dtype)
    w = parts.shape[0]
    absolute = parts.abs().sum(0)
    exact = parts.sum(0).abs()
    bound = ((w - 1) * u * absolute + u * exact) / divisor
    if divisor > 1:
        bound = bound + u * exact / divisor
    return bound + torch.finfo(dtype).tiny  # subnormal floor


def _check(name: str, got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor | None = None) -> list[str]:
    got64 = got.to(torch.float64) if got.dtype.is_floating_point else got
    if bound is None:
        ok = torch.equal(got, want.to(got.dtype)) if got.numel() else got.shape == want.shape
        return [] if ok else [f"{name}: not bitwise equal to the reference"]
    err = (got64 - want).abs()
    worst = (err - bound).max().item() if err.numel() else -1.0
    return [] if worst <= 0 else [f"{name}: error {err.max().item():.3g} above the bound (by {worst:.3g})"]


def every_collective(comm) -> dict:
    """All five collectives at sizes across chunk boundaries, every dtype; returns failures and the bits of
    each all-reduce result (the test compares them across ranks)."""
    n, me = comm.world_size, comm.rank
    dev = comm.device  # the CPU in the tests; a GPU in benchmarks/comm/check_staging_cuda.py
    problems: list[str] = []
    digests: list[int] = []
    for dtype in DTYPES:
        for size in SIZES:
            tag = f"{str(dtype)[6:]}[{size}]"
            for op in ("sum", "avg", "max", "min"):
                if op == "avg" and dtype == torch.int64:
                    continue
                salt = 7 * size + ("sum", "avg", "max", "min").index(op)  # the same on every rank
                parts = torch.stack([values(r, size, dtype, salt).to(torch.float64) if dtype.is_floating_point
                                     else values(r, size, dtype, salt) for r in range(n)])
                t = values(me, size, dtype, salt).to(dev)
                comm.all_reduce(t, op=op)
                t = t.cpu()
                if op in ("sum", "avg"):
                    want = parts.sum(0) / n if op == "avg" else parts.sum(0)
                    bound = sum_bound(parts, dtype, n if op == "avg" else 1) if dtype.is_floating_point else None
                    problems += _check(f"all_reduce {op} {tag}", t, want, bound)
                else:
                    want = parts.max(0).values if op == "max" else parts.min(0).values
                    problems += _check(f"all_reduce {op} {tag}", t, want.to(dtype) if size else want)
                digests.append(zlib.crc32(t.view(torch.uint8).numpy().tobytes()) if size else 0)
            # all_gather: rank order, exact
            out = torch.full((n * size,), 7, dtype=dtype, device=dev)
            comm.all_gather(out, values(me, size, dtype, 1).to(dev))
            out = out.cpu()
            problems += _check(f"all_gather {tag}", out, torch.cat([values(r, size, dtype, 1) for r in range(n)]))
            # reduce_scatter: this rank's chunk of the sum / average
            for op in ("sum", "avg") if dtype != torch.int64 else ("sum",):
                full = [values(r, n * size, dtype, 2) for r in range(n)]
                mine = torch.full((size,), 7, dtype=dtype, device=dev)
                comm.reduce_scatter(mine, full[me].to(dev), op=op)
                mine = mine.cpu()
                parts = torch.stack([f.view(n, size)[me] for f in full])
                parts = parts.to(torch.float64) if dtype.is_floating_point else parts
                want = parts.sum(0) / n if op == "avg" else parts.sum(0)
                bound = sum_bound(parts, dtype, n if op == "avg" else 1) if dtype.is_floating_point else None
                problems += _check(f"reduce_scatter {op} {tag}", mine, want, bound)
            # broadcast from every root
            for src in range(n):
                t = values(me, size, dtype, 3).to(dev)
                comm.broadcast(t, src)
                t = t.cpu()
                problems += _check(f"broadcast src={src} {tag}", t, values(src, size, dtype, 3))
    # uneven all-to-all with empty splits, rows of 3, totals that cross chunk boundaries
    for case in range(6):
        g = torch.Generator().manual_seed(case)
        sends = torch.randint(0, 900, (n, n), generator=g)
        sends[torch.rand(n, n, generator=g) < 0.3] = 0  # empty splits
        if case == 0:
            sends.zero_()  # nothing at all moves
        if case == 1:
            sends[:, n - 1] = 0  # the last rank receives nothing
        for dtype in (torch.float32, torch.int64):
            row = 3
            inp = [values(r, int(sends[r].sum()) * row, dtype, 10 + case).view(-1, row) for r in range(n)]
            out = torch.full((int(sends[:, me].sum()), row), 7, dtype=dtype, device=dev)
            comm.all_to_all_single(out, inp[me].to(dev), sends[:, me].tolist(), sends[me].tolist())
            out = out.cpu()
            want = torch.cat([inp[q][int(sends[q, :me].sum()):int(sends[q, :me + 1].sum())] for q in range(n)])
            problems += _check(f"all_to_all_single case {case} {str(dtype)[6:]}", out, want)
    transport = getattr(getattr(comm, "transport", None), "name", None)
    return {"problems": problems, "digests": digests, "transport": transport}


def async_in_order(comm) -> list[float]:
    """An async all-reduce, then a sync one on another tensor, then the wait: both correct, in order."""
    a = torch.full((5000,), float(comm.rank + 1))
    b = torch.full((3,), 10.0 * (comm.rank + 1))
    work = comm.all_reduce(a, async_op=True)
    comm.all_reduce(b)
    work.wait()
    return [a[0].item(), a[-1].item(), b[0].item()]


def die_in_shared_memory(comm) -> None:
    t = torch.ones(10_000)
    comm.all_reduce(t)  # the segment works
    if comm.rank == 1:
        os._exit(3)
    comm.all_reduce(t)


def hang_in_shared_memory(comm) -> None:
    t = torch.ones(10_000)
    comm.all_reduce(t)
    if comm.rank == 1:
        time.sleep(30)
    comm.all_reduce(t)


def train_rank(comm, cfg) -> list[float]:
    """The trainer on this rank's communicator (ZeRO-1: async bucket reduce-scatters during backward)."""
    from rich.console import Console

    from openseek_hal.train.trainer import train

    return train(cfg, comm=comm, console=Console(file=open(os.devnull, "w"))).losses  # noqa: SIM115
