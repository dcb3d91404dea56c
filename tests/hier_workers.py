"""Rank functions for test_comm_hier.py (module level: `launch` pickles them into fresh processes).

Every rank builds every rank's inputs from a seed, so each result is checked on the rank against a
reference computed here, independently of any collective: exact sums in kind order (kind 0's partial
+ kind 1's + ..., each partial over the kind's ranks), exact gathers and all-to-alls.
"""

from __future__ import annotations

import os
import warnings
import zlib

import torch

SIZES = (0, 1, 5, 7, 13, 1000, 2 * 1024 + 3)  # 4 KiB chunks in the tests: the last sizes span several
ALGOS = {"all_reduce": ("parallel", "leader"), "all_gather": ("parallel", "leader"),
         "reduce_scatter": ("parallel", "leader"), "all_to_all_single": ("parallel", "staged")}


def values(rank: int, n: int, dtype: torch.dtype, salt: int) -> torch.Tensor:
    """Integers (exact in float32/bfloat16 sums of a few ranks: |x| <= 64), or int64 near 2^40."""
    g = torch.Generator().manual_seed(7919 * salt + rank)
    if dtype == torch.int64:
        return torch.randint(-(2 ** 40), 2 ** 40, (n,), generator=g, dtype=torch.int64)
    return torch.randint(-64, 65, (n,), generator=g).to(dtype)


def kind_order_sum(parts: list[torch.Tensor], kinds: list[str]) -> torch.Tensor:
    """The sum the hier adaptor documents: per kind (in order of first rank) the kind's partial, then
    the partials added in kind order. With these integer values every order gives the same bits."""
    order = list(dict.fromkeys(kinds))
    partials = [sum(p for p, k in zip(parts, kinds) if k == kind) for kind in order]
    acc = partials[0].clone()
    for p in partials[1:]:
        acc = acc + p
    return acc


def _digest(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().view(torch.uint8).numpy().tobytes()) if t.numel() else 0


def _eq(name: str, got: torch.Tensor, want: torch.Tensor) -> list[str]:
    want = want.to(got.dtype).view(got.shape)
    return [] if torch.equal(got, want) else [f"{name}: not equal to the reference"]


def every_collective(comm) -> dict:
    """Each collective with each algorithm, sizes 0..2051, int64/float32/bfloat16, against exact references;
    returns the problems, the digests of the all-reduce and all-gather results (compared across ranks) and
    what ran."""
    n, me, kinds = comm.world_size, comm.rank, comm.kinds
    dev = comm.device  # the CPU in the tests; a GPU in benchmarks/comm/check_hier_cuda.py
    problems: list[str] = []
    digests: list[int] = []
    ran: dict[str, set] = {op: set() for op in ALGOS}
    for op, algos in ALGOS.items():
        for algo in algos:
            comm.policy.forced = {op: algo}
            for dtype in (torch.int64, torch.float32, torch.bfloat16) if op != "all_to_all_single" else ():
                for size in SIZES:
                    tag = f"{op}/{algo}/{str(dtype)[6:]}[{size}]"
                    salt = size + 31 * ("int64", "float32", "bfloat16").index(str(dtype)[6:])
                    if op == "all_reduce":
                        for red in ("sum", "max", "min", "avg"):
                            if red == "avg" and dtype == torch.int64:
                                continue
                            parts = [values(r, size, dtype, salt) for r in range(n)]
                            t = parts[me].clone().to(dev)
                            comm.all_reduce(t, op=red)
                            t = t.cpu()
                            if red in ("sum", "avg"):
                                want = kind_order_sum(parts, kinds)
                                if red == "avg":
                                    want = want / n  # the same rounding as the adaptor: exact sum, one division
                            else:
                                stacked = torch.stack(parts) if size else torch.empty(n, 0, dtype=dtype)
                                want = stacked.max(0).values if red == "max" else stacked.min(0).values
                            problems += _eq(f"{tag}/{red}", t, want)
                            digests.append(_digest(t))
                    elif op == "all_gather":
                        out = torch.full((n * size,), 99, dtype=dtype, device=dev)
                        comm.all_gather(out, values(me, size, dtype, salt).to(dev))
                        out = out.cpu()
                        want = torch.cat([values(r, size, dtype, salt) for r in range(n)])
                        problems += _eq(tag, out, want)
                        digests.append(_digest(out))
                    elif op == "reduce_scatter":
                        for red in ("sum", "avg") if dtype != torch.int64 else ("sum", "max"):
                            full = [values(r, n * size, dtype, salt) for r in range(n)]
                            out = torch.full((size,), 99, dtype=dtype, device=dev)
                            comm.reduce_scatter(out, full[me].to(dev), op=red)
                            out = out.cpu()
                            chunks = [f.view(n, size)[me] for f in full]
                            if red == "max":
                                want = torch.stack(chunks).max(0).values
                            else:
                                want = kind_order_sum(chunks, kinds)
                                want = want / n if red == "avg" else want
                            problems += _eq(f"{tag}/{red}", out, want)  # each rank its own chunk
                    ran[op].add(comm.last_algorithm.get(op))
            if op == "all_to_all_single":
                problems += _all_to_all_cases(comm, f"all_to_all_single/{algo}")
                ran[op].add(comm.last_algorithm.get(op))
    comm.policy.forced = {}
    return {"problems": problems, "digests": digests, "ran": {k: sorted(v) for k, v in ran.items()}}


def _all_to_all_cases(comm, tag: str) -> list[str]:
    """Uneven splits with empty pieces (a rank sending nothing, a rank receiving nothing, nothing at all),
    rows of 3, totals across the 4 KiB chunks."""
    n, me = comm.world_size, comm.rank
    problems = []
    for case in range(5):
        g = torch.Generator().manual_seed(case)
        sends = torch.randint(0, 700, (n, n), generator=g)
        sends[torch.rand(n, n, generator=g) < 0.3] = 0
        if case == 0:
            sends.zero_()
        if case == 1:
            sends[:, n - 1] = 0  # the last rank receives nothing
        if case == 2:
            sends[0, :] = 0  # rank 0 sends nothing
        for dtype in (torch.float32, torch.int64):
            inp = [values(r, int(sends[r].sum()) * 3, dtype, 50 + case).view(-1, 3) for r in range(n)]
            out = torch.full((int(sends[:, me].sum()), 3), 99, dtype=dtype, device=comm.device)
            comm.all_to_all_single(out, inp[me].to(comm.device), sends[:, me].tolist(), sends[me].tolist())
            out = out.cpu()
            want = torch.cat([inp[q][int(sends[q, :me].sum()):int(sends[q, :me + 1].sum())] for q in range(n)])
            problems += _eq(f"{tag} case {case} {str(dtype)[6:]}", out, want)
    return problems


def random_floats(comm) -> dict:
    """float32 / bfloat16 random values (inexact sums): every rank the same bits, within the bound of the
    float64 sum, for both algorithms."""
    n, me = comm.world_size, comm.rank
    out = {}
    for algo in ("parallel", "leader"):
        comm.policy.forced = {"all_reduce": algo, "reduce_scatter": algo}
        for dtype in (torch.float32, torch.bfloat16):
            g = [torch.Generator().manual_seed(r) for r in range(n)]
            parts = [torch.randn(3001, generator=g[r], dtype=torch.float64).to(dtype) for r in range(n)]
            t = parts[me].clone().to(comm.device)
            comm.all_reduce(t)
            t = t.cpu()
            exact = torch.stack([p.double() for p in parts]).sum(0)
            u = torch.finfo(dtype).eps / 2
            bound = (n - 1) * u * torch.stack([p.double().abs() for p in parts]).sum(0) + u * exact.abs()
            err = (t.double() - exact).abs()
            out[f"{algo}/{str(dtype)[6:]}"] = (_digest(t), bool((err <= bound + 1e-30).all()))
    comm.policy.forced = {}
    return out


def moved_bytes(comm, count: int) -> dict:
    """Bytes each rank moves between kinds for one all_reduce / all_gather / reduce_scatter of ``count``
    float32 per rank, with each algorithm."""
    out = {}
    for algo in ("parallel", "leader"):
        for op in ("all_reduce", "all_gather", "reduce_scatter"):
            comm.policy.forced = {op: algo}
            before = list(comm.cross_kind_bytes)
            if op == "all_reduce":
                comm.all_reduce(torch.ones(count))
            elif op == "all_gather":
                comm.all_gather(torch.empty(comm.world_size * count), torch.ones(count))
            else:
                comm.reduce_scatter(torch.empty(count), torch.ones(comm.world_size * count))
            out[f"{op}/{algo}"] = [a - b for a, b in zip(comm.cross_kind_bytes, before)]
            assert comm.last_algorithm[op] == algo
    comm.policy.forced = {}
    return out


def chosen_algorithms(comm) -> dict:
    """What the policy picked for a small and a large call of each collective (no forcing)."""
    out = {}
    for nbytes in (64, 64 * 1024):
        count = nbytes // 4
        comm.all_reduce(torch.ones(count))
        comm.all_gather(torch.empty(comm.world_size * count), torch.ones(count))
        comm.reduce_scatter(torch.empty(count), torch.ones(comm.world_size * count))
        comm.all_to_all_single(torch.empty(comm.world_size * count), torch.ones(comm.world_size * count))
        out[nbytes] = dict(comm.last_algorithm)
    out["source"] = comm.policy.source
    return out


def rank_zero_table_wins(comm, tables: list[str]) -> dict:
    """Each rank points $OPENSEEK_HAL_COMM_TUNE at its own file; a new communicator uses rank 0's on every
    rank (and rank 0's warning, if any, is raised on rank 0 only)."""
    os.environ["OPENSEEK_HAL_COMM_TUNE"] = tables[comm.rank]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sub = comm.new_group(list(range(comm.world_size)))
    out = chosen_algorithms(sub)
    out["warnings"] = [str(w.message) for w in caught]
    return out


def die_during(comm, op: str, victim: int) -> None:
    """Rank ``victim`` exits after a first call; the others call ``op`` again (parallel algorithm)."""
    n = comm.world_size
    comm.policy.forced = {op: "parallel"}
    x = torch.ones(n * 5000)
    for _ in range(2):
        if _ and comm.rank == victim:
            os._exit(3)
        if op == "all_reduce":
            comm.all_reduce(x)
        else:
            comm.all_to_all_single(torch.empty_like(x), x)


def host_chunks(comm) -> dict:
    """The host adaptor takes its chunk per call from the table."""
    out = {"slot": comm.transport.chunk_bytes}
    for count in (100, 100_000):
        comm.all_reduce(torch.ones(count))
        out[count * 4] = comm.transport.call_chunk
    return out


def uneven_all_to_all_with_a_table(comm) -> dict:
    """Uneven all-to-alls (ranks sending 0 to thousands of bytes) under a table whose rows change at 4 KiB:
    every rank must choose alike (else they would run different collectives)."""
    problems = _all_to_all_cases(comm, "all_to_all_single/table")
    algo = getattr(comm, "last_algorithm", {}).get("all_to_all_single")
    chunk = getattr(getattr(comm, "transport", None), "call_chunk", None)
    return {"problems": problems, "algo": algo, "chunk": chunk}
