"""The collective level of the conformance suite: every `Communicator` collective against exact values.

Each rank's input is a deterministic function of (rank, index, case), so every rank computes the
expected result of every collective on its own, in float64 or int64, with no reference run.
Inputs are multiples of 1/4 in [-2, 2] for floats (exact in bf16, so sums, max and min must match
bitwise; only averages get the dtype's tolerance) and values near 2**40 for int64 (so a transport
that goes through floats is caught). Sizes include 0, 1 and counts not divisible by the world
size; all-to-all splits are uneven and include empty ones, and the patterns of an expert-parallel
dispatch (`A2A_PATTERNS`): a rank that sends nothing, one that receives nothing, all rows to one
rank, nothing at all. One `launch` per (adaptor, world size)
runs every check, because starting processes is the slow part on a small CI machine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int64": torch.int64}
# (rtol, atol) for results that are not exact (averages); exact results are compared bitwise.
TOLERANCE = {torch.float32: (1.3e-6, 1e-6), torch.bfloat16: (1.6e-2, 1e-2)}
_LARGE = 2 ** 40


@dataclass(frozen=True)
class Case:
    name: str
    op: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    run: Callable  # (comm) -> (actual, expected) on this rank
    exact: bool = True


def values(rank: int, shape: tuple[int, ...], dtype: torch.dtype, salt: int = 0) -> torch.Tensor:
    """The input of ``rank`` for a case (float64 or int64, before the cast to ``dtype``)."""
    n = 1
    for d in shape:
        n *= d
    base = (torch.arange(n, dtype=torch.int64) * 7 + rank * 13 + salt * 5) % 17 - 8
    if dtype.is_floating_point:
        return (base.to(torch.float64) / 4).view(shape)
    return (base + _LARGE * (rank + 1)).view(shape)


def _on(comm, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).to(comm.device).contiguous()


def _reduce(stack: torch.Tensor, op: str, world_size: int) -> torch.Tensor:
    if op == "sum":
        return stack.sum(0)
    if op == "avg":
        return stack.sum(0) / world_size
    return stack.amax(0) if op == "max" else stack.amin(0)


def _all_reduce(op: str, shape: tuple[int, ...], dtype: torch.dtype, salt: int, async_op: bool = False):
    def run(comm):
        t = _on(comm, values(comm.rank, shape, dtype, salt), dtype)
        work = comm.all_reduce(t, op=op, async_op=async_op)
        if work is not None:
            work.wait()
        everyone = torch.stack([values(r, shape, dtype, salt) for r in range(comm.world_size)])
        return t, _reduce(everyone, op, comm.world_size)
    return run


def _all_gather(shape: tuple[int, ...], dtype: torch.dtype, salt: int):
    def run(comm):
        out = torch.full((comm.world_size * shape[0], *shape[1:]), -1, dtype=dtype, device=comm.device)
        comm.all_gather(out, _on(comm, values(comm.rank, shape, dtype, salt), dtype))
        return out, torch.cat([values(r, shape, dtype, salt) for r in range(comm.world_size)])
    return run


def _reduce_scatter(op: str, shape: tuple[int, ...], dtype: torch.dtype, salt: int):
    def run(comm):
        n = comm.world_size
        full = (n * shape[0], *shape[1:])
        out = torch.full(shape, -1, dtype=dtype, device=comm.device)
        comm.reduce_scatter(out, _on(comm, values(comm.rank, full, dtype, salt), dtype), op=op)
        reduced = _reduce(torch.stack([values(r, full, dtype, salt) for r in range(n)]), op, n)
        return out, reduced.view(n, -1)[comm.rank].view(shape)
    return run


def splits_of(src: int, world_size: int, salt: int) -> list[int]:
    """Rows that rank ``src`` sends to each rank: uneven, some empty."""
    return [(src + 2 * dst + salt) % 4 for dst in range(world_size)]


# Split patterns of the expert-parallel token dispatch (rows rank src sends to each rank), where
# empty splits are the rule: a rank whose tokens all go elsewhere, an expert shard nobody picked.
A2A_PATTERNS: dict[str, Callable[[int, int, int], list[int]]] = {
    # rank 0 sends nothing at all; every other rank sends to everyone
    "sender_empty": lambda src, n, salt: [0] * n if src == 0 else [(src + dst + salt) % 3 + 1 for dst in range(n)],
    # the last rank receives nothing (it sends to the others)
    "receiver_empty": lambda src, n, salt: [0 if dst == n - 1 else (src + dst + salt) % 3 + 1 for dst in range(n)],
    # every rank sends everything to rank 0 (one hot expert); rank 0 receives from itself too
    "one_hot": lambda src, n, salt: [src + 2 + salt if dst == 0 else 0 for dst in range(n)],
    # nothing moves: zero rows in and out on every rank
    "all_empty": lambda src, n, salt: [0] * n,
}


def _all_to_all(width: int, dtype: torch.dtype, salt: int, even: bool, async_op: bool = False,
                pattern: str | None = None):
    def run(comm):
        n, me = comm.world_size, comm.rank
        if pattern is not None:
            split = lambda src: A2A_PATTERNS[pattern](src, n, salt)
        else:
            split = (lambda src: [2] * n) if even else (lambda src: splits_of(src, n, salt))
        sends = split(me)
        inputs = [values(src, (sum(split(src)), width), dtype, salt) for src in range(n)]
        recv_sizes = [split(src)[me] for src in range(n)]
        expected = torch.cat([inputs[src].split(split(src))[me] for src in range(n)])
        out = torch.full((sum(recv_sizes), width), -1, dtype=dtype, device=comm.device)
        work = comm.all_to_all_single(out, _on(comm, inputs[me], dtype), None if even else recv_sizes,
                                      None if even else sends, async_op=async_op)
        if work is not None:
            work.wait()
        return out, expected
    return run


def _broadcast(src_of: Callable[[int], int], shape: tuple[int, ...], dtype: torch.dtype, salt: int):
    def run(comm):
        src = src_of(comm.world_size)
        t = _on(comm, values(comm.rank, shape, dtype, salt), dtype)
        comm.broadcast(t, src)
        return t, values(src, shape, dtype, salt)
    return run


def _send_recv(shape: tuple[int, ...], dtype: torch.dtype, salt: int):
    def run(comm):
        n, me = comm.world_size, comm.rank
        nxt, prev = (me + 1) % n, (me - 1) % n
        out = torch.full(shape, -1, dtype=dtype, device=comm.device)
        mine = _on(comm, values(me, shape, dtype, salt), dtype)
        if me % 2 == 0:  # even ranks send first so that a ring of blocking calls cannot deadlock
            comm.send(mine, nxt)
            comm.recv(out, prev)
        else:
            comm.recv(out, prev)
            comm.send(mine, nxt)
        return out, values(prev, shape, dtype, salt)
    return run


def _barrier(comm):
    comm.barrier()
    return torch.zeros(1), torch.zeros(1)


def _sub_group(dtype: torch.dtype):
    """all_reduce inside the even ranks' sub-group; odd ranks check they were left out."""
    def run(comm):
        members = list(range(0, comm.world_size, 2))
        sub = comm.new_group(members)
        if comm.rank not in members:
            return torch.tensor([float(sub is None)]), torch.tensor([1.0])
        t = _on(comm, values(comm.rank, (5,), dtype, 3), dtype)
        sub.all_reduce(t)
        return t, torch.stack([values(r, (5,), dtype, 3) for r in members]).sum(0)
    return run


def cases(world_size: int, quick: bool = False) -> list[Case]:
    """Every check, in the order all ranks run them."""
    sizes = (0, 1, 7, 1000) if quick else (0, 1, 7, 1000, 65537)
    out: list[Case] = []
    for dname, dtype in DTYPES.items():
        floating = dtype.is_floating_point
        ops = ("sum", "avg", "max", "min") if floating else ("sum", "max", "min")
        for salt, n in enumerate(sizes):
            for op in ops:
                out.append(Case(f"all_reduce/{op}/{dname}/{n}", "all_reduce", dtype, (n,),
                                _all_reduce(op, (n,), dtype, salt), exact=op != "avg"))
            out.append(Case(f"all_gather/{dname}/{n}", "all_gather", dtype, (n,),
                            _all_gather((n,), dtype, salt)))
            for op in ("sum", "avg") if floating else ("sum", "max"):
                out.append(Case(f"reduce_scatter/{op}/{dname}/{n}", "reduce_scatter", dtype, (n,),
                                _reduce_scatter(op, (n,), dtype, salt), exact=op != "avg"))
            out.append(Case(f"broadcast/{dname}/{n}", "broadcast", dtype, (n,),
                            _broadcast(lambda ws: ws - 1, (n,), dtype, salt)))
        out.append(Case(f"all_gather/{dname}/2d", "all_gather", dtype, (3, 5), _all_gather((3, 5), dtype, 9)))
        out.append(Case(f"reduce_scatter/{dname}/2d", "reduce_scatter", dtype, (2, 3),
                        _reduce_scatter("sum", (2, 3), dtype, 9)))
        for salt in range(2 if quick else 4):
            out.append(Case(f"all_to_all_single/uneven{salt}/{dname}", "all_to_all_single", dtype,
                            (-1, 3), _all_to_all(3, dtype, salt, even=False)))
        out.append(Case(f"all_to_all_single/even/{dname}", "all_to_all_single", dtype, (2 * world_size, 4),
                        _all_to_all(4, dtype, 0, even=True)))
        for pattern in A2A_PATTERNS:
            out.append(Case(f"all_to_all_single/{pattern}/{dname}", "all_to_all_single", dtype, (-1, 3),
                            _all_to_all(3, dtype, 2, even=False, pattern=pattern)))
        out.append(Case(f"broadcast/src0/{dname}", "broadcast", dtype, (9,),
                        _broadcast(lambda ws: 0, (9,), dtype, 4)))
        out.append(Case(f"send_recv/{dname}", "send_recv", dtype, (11,), _send_recv((11,), dtype, 5)))
    out.append(Case("all_reduce/async/float32", "all_reduce", torch.float32, (33,),
                    _all_reduce("sum", (33,), torch.float32, 6, async_op=True)))
    out.append(Case("all_to_all_single/async/bfloat16", "all_to_all_single", torch.bfloat16, (-1, 2),
                    _all_to_all(2, torch.bfloat16, 1, even=False, async_op=True)))
    out.append(Case("all_to_all_single/async/one_hot/float32", "all_to_all_single", torch.float32, (-1, 2),
                    _all_to_all(2, torch.float32, 1, even=False, async_op=True, pattern="one_hot")))
    out.append(Case("barrier", "barrier", torch.float32, (), _barrier))
    out.append(Case("new_group/all_reduce/float32", "new_group", torch.float32, (5,),
                    _sub_group(torch.float32)))
    return out


def _compare(case: Case, actual: torch.Tensor, expected: torch.Tensor) -> tuple[str, float | None, str]:
    actual = actual.detach().cpu()
    if tuple(actual.shape) != tuple(expected.shape):
        return "fail", None, f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if actual.numel() == 0:
        return "pass", 0.0, ""
    if not case.dtype.is_floating_point:
        err = float((actual.to(torch.int64) - expected).abs().max())
        return ("pass", err, "") if err == 0 else ("fail", err, "integer result differs")
    got = actual.to(torch.float64)
    diff = (got - expected).abs()
    err = float(diff.max())
    if case.exact:
        return ("pass", err, "") if err == 0 else ("fail", err, "exactly representable result differs")
    rtol, atol = TOLERANCE[case.dtype]
    bad = diff > atol + rtol * expected.abs()
    return ("fail", err, f"{int(bad.sum())} elements beyond rtol={rtol:g}, atol={atol:g}") if bad.any() \
        else ("pass", err, "")


def check_rank(comm, quick: bool) -> list[tuple[str, str, float | None, str]]:
    """Run every case on this rank: [(name, status, max_abs_err, message)]. Stops at the first error."""
    results = []
    broken = ""
    for case in cases(comm.world_size, quick):
        if broken:
            results.append((case.name, "error", None, f"not run: {broken}"))
            continue
        try:
            actual, expected = case.run(comm)
        except Exception as e:  # the group's state is unknown after a failed collective
            broken = f"an earlier check ({case.name}) raised"
            results.append((case.name, "error", None, f"{type(e).__name__}: {e}"))
            continue
        results.append((case.name, *_compare(case, actual, expected)))
    return results


def _rows(adaptor: str, world_size: int, quick: bool, per_rank: list[list[tuple]]) -> list[dict]:
    rows = []
    for i, case in enumerate(cases(world_size, quick)):
        statuses = [ranks[i] for ranks in per_rank]
        status = "error" if any(s[1] == "error" for s in statuses) else \
            "fail" if any(s[1] == "fail" for s in statuses) else "pass"
        errs = [s[2] for s in statuses if s[2] is not None]
        message = "; ".join(f"rank {r}: {s[3]}" for r, s in enumerate(statuses) if s[3])
        rows.append(_row(case.name, case.op, adaptor, world_size, case.dtype, case.shape, status,
                         max(errs) if errs else None, message))
    return rows


def _row(name: str, op: str, adaptor: str, world_size: int, dtype: torch.dtype | str, shape, status: str,
         max_abs_err: float | None, message: str) -> dict:
    return {"level": "comm", "name": f"{adaptor}/ws{world_size}/{name}", "op": op, "adaptor": adaptor,
            "world_size": world_size, "dtype": str(dtype).replace("torch.", ""), "shape": str(tuple(shape)),
            "status": status, "max_abs_err": max_abs_err, "message": message}


def simulated_kinds(world_size: int) -> list[str]:
    """Two chip kinds, interleaved, so that the hierarchical path reorders ranks across kinds."""
    return ["kind-a" if r % 2 == 0 else "kind-b" for r in range(world_size)]


def run_collective_checks(backend: str, adaptors: list[str], world_sizes: list[int], *,
                          quick: bool = False, timeout: float = 60.0) -> list[dict]:
    """Check every collective of each adaptor at each world size; one dict per check (see module doc).

    World sizes the backend cannot host (more ranks than devices) are left out. The ``hier``
    adaptor runs with two simulated chip kinds so that its between-kinds path is exercised.
    A launch that fails as a whole gives one "error" row naming the adaptor and world size.
    """
    from ..backend import get_backend
    from ..comm import adaptor_available
    from ..comm.launcher import launch

    be = get_backend(backend)
    rows: list[dict] = []
    for adaptor in adaptors:
        ok, reason = adaptor_available(adaptor)
        for world_size in world_sizes:
            if be.device_type != "cpu" and world_size > be.device.count():
                continue
            if not ok:
                rows.append(_row("launch", "launch", adaptor, world_size, "-", (), "error", None,
                                 f"adaptor unavailable: {reason}"))
                continue
            kinds = simulated_kinds(world_size) if adaptor == "hier" else None
            try:
                per_rank = launch(check_rank, world_size, backend=backend, adaptor=adaptor, timeout=timeout,
                                  args=(quick,), kinds=kinds)
            except Exception as e:
                rows.append(_row("launch", "launch", adaptor, world_size, "-", (), "error", None,
                                 f"{type(e).__name__}: {e}"))
                continue
            rows.extend(_rows(adaptor, world_size, quick, per_rank))
    return rows
