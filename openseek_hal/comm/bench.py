"""`openseek-hal bench comm`: nccl-tests-style collective benchmark of the adaptors, beside raw baselines.

For each collective and each message size (8 KiB to 1 GiB, doubling) it prints the time per call,
the algorithm bandwidth (bytes / time) and the bus bandwidth (algbw times nccl-tests' factor:
2(n-1)/n for all-reduce, (n-1)/n for all-gather, reduce-scatter and all-to-all) of every adaptor
asked for, next to raw ``torch.distributed`` calls on the same default group in the same run, and,
on CUDA with CuPy present, raw CuPy NCCL calls (the latency floor). Sizes follow nccl-tests: the
bytes of the larger buffer (the all-gather output, the reduce-scatter input).

Before timing, every (implementation, collective, size) is run once on rank-dependent data and
checked against the exact expected values (nccl-tests' ``-c``); the "check" column says so.
Each point runs warm-up calls, then enough iterations to fill about a quarter of a second (the same
count on every rank), and reports the slowest rank's mean. Host-staged adaptors stop at
``--staged-max-bytes``. ``hier`` runs with the ranks split into two simulated chip kinds (first
half, second half) so that its between-kinds path is what is measured.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from importlib import import_module
from pathlib import Path
from typing import Any

import click
import torch

from ..provenance import cpu_model, provenance

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all_single")
BUS_FACTOR: dict[str, Callable[[int], float]] = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all_single": lambda n: (n - 1) / n,
}
RAW_TORCH = "torch.distributed"
RAW_CUPY = "cupy-direct"
STAGED = ("host", "hier")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
TARGET_TIME_S = 0.25
TUNE_CHUNKS = (256 * 2**10, 2**20, 4 * 2**20)  # the host adaptor's chunk sizes tried by --tune
HIER_ALGOS = ("leader", "parallel")


def parse_bytes(text: str) -> int:
    """'8K', '64M', '1G', '1GiB', '512' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)(?:I?B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise click.BadParameter(f"'{text}' is not a size (examples: 8K, 64M, 1G)")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2).upper()])


def human(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes} B"


def sizes(min_bytes: int, max_bytes: int, factor: int) -> list[int]:
    out, s = [], min_bytes
    while s <= max_bytes:
        out.append(s)
        s *= factor
    return out


# -- what runs on each rank ---------------------------------------------------------------------

def _buffers(op: str, nbytes: int, n: int, dtype: torch.dtype, device: torch.device) -> tuple | None:
    """(output, input) for ``op`` at ``nbytes`` (the larger buffer), or None when it cannot split."""
    count = nbytes // torch.tensor([], dtype=dtype).element_size()
    if op == "all_reduce":
        t = torch.zeros(count, dtype=dtype, device=device)
        return t, t
    if count % n or count == 0:
        return None
    out_count, in_count = {"all_gather": (count, count // n), "reduce_scatter": (count // n, count)}.get(
        op, (count, count))
    return (torch.zeros(out_count, dtype=dtype, device=device),
            torch.zeros(in_count, dtype=dtype, device=device))


def _fill_and_expect(op: str, out: torch.Tensor, inp: torch.Tensor, rank: int, n: int) -> Callable[[], bool]:
    """Put rank-dependent integers in the input; return the check of the output after one call."""
    inp.fill_(rank + 1)
    ranks = torch.arange(1, n + 1, dtype=torch.float64, device=out.device)
    total = n * (n + 1) / 2
    if op in ("all_reduce", "reduce_scatter"):
        return lambda: bool((out.double() == total).all())
    # all_gather and all_to_all_single: chunk j of the output came from rank j
    return lambda: bool((out.double().view(n, -1) == ranks[:, None]).all()) if out.numel() else True


def _calls(impl: str, comm: Any, cupy_comm: Any) -> dict[str, Callable[[torch.Tensor, torch.Tensor], Any]]:
    """op -> f(output, input) for one implementation."""
    if impl == RAW_TORCH:
        import torch.distributed as dist

        from .base import all_gather_flat
        from .torch_dist import _reduce_scatter_flat

        return {"all_reduce": lambda o, i: dist.all_reduce(o),
                "all_gather": lambda o, i: all_gather_flat(o, i),
                "reduce_scatter": lambda o, i: _reduce_scatter_flat(o, i),
                "all_to_all_single": lambda o, i: dist.all_to_all_single(o, i)}
    if impl == RAW_CUPY:
        return _cupy_calls(cupy_comm)
    return {"all_reduce": lambda o, i: comm.all_reduce(o),
            "all_gather": lambda o, i: comm.all_gather(o, i),
            "reduce_scatter": lambda o, i: comm.reduce_scatter(o, i),
            "all_to_all_single": lambda o, i: comm.all_to_all_single(o, i)}


def _cupy_calls(cc: Any) -> dict[str, Callable]:
    """Raw ``cupy.cuda.nccl`` calls: pointers, counts and stream, nothing else (the latency floor)."""
    from cupy.cuda import nccl

    from .nccl import NCCL_OPS, nccl_dtype

    stream = torch.cuda.current_stream().cuda_stream
    n = cc.size()
    total = NCCL_OPS["sum"]

    def all_to_all(o: torch.Tensor, i: torch.Tensor) -> None:
        chunk, size, dt = i.numel() // n, i.element_size(), nccl_dtype(i.dtype)
        nccl.groupStart()
        for peer in range(n):
            cc.send(i.data_ptr() + peer * chunk * size, chunk, dt, peer, stream)
            cc.recv(o.data_ptr() + peer * chunk * size, chunk, dt, peer, stream)
        nccl.groupEnd()

    return {
        "all_reduce": lambda o, i: cc.allReduce(o.data_ptr(), o.data_ptr(), o.numel(), nccl_dtype(o.dtype),
                                                total, stream),
        "all_gather": lambda o, i: cc.allGather(i.data_ptr(), o.data_ptr(), i.numel(), nccl_dtype(i.dtype),
                                                stream),
        "reduce_scatter": lambda o, i: cc.reduceScatter(i.data_ptr(), o.data_ptr(), o.numel(),
                                                        nccl_dtype(i.dtype), total, stream),
        "all_to_all_single": all_to_all,
    }


def _slowest(value: float) -> float:
    """The maximum of ``value`` over ranks (on the host, through the default group's gloo)."""
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _time(call: Callable[[], Any], sync: Callable[[], None], iters: int) -> float:
    import torch.distributed as dist

    sync()
    dist.barrier(group=_host_group())
    start = time.perf_counter()
    for _ in range(iters):
        call()
    sync()
    return (time.perf_counter() - start) / iters


_HOST_GROUP: list = []


def _host_group() -> Any:
    import torch.distributed as dist

    from .rendezvous import gloo_group

    if not _HOST_GROUP:
        pg = dist.group.WORLD
        _HOST_GROUP.append(gloo_group(pg, str(dist.get_backend(pg)), dist.get_process_group_ranks(pg), 300))
    return _HOST_GROUP[0]


def bench_rank(world: Any, config: dict) -> dict | None:
    """Everything one rank does; rank 0 returns the results."""
    import torch.distributed as dist

    from ..backend import get_backend
    from . import create
    from .host import host_view
    from .nccl import _connect

    rank, n = world.rank, world.world_size
    be = get_backend(config["backend"], device_index=None if config["backend"] == "cpu" else rank)
    device, dtype = world.device, DTYPES[config["dtype"]]
    impls: dict[str, tuple[Any, Any]] = {}
    problems: dict[str, str] = {}  # implementation -> why it stopped being measured
    if config["baseline"]:
        impls[RAW_TORCH] = (None, None)
    # An implementation that fails to start or to run is reported and dropped; the others go on.
    # (Its failure is a Python error raised alike on every rank, so the ranks stay in step.)
    if config["cupy"]:
        try:
            impls[RAW_CUPY] = (None, _connect(host_view(dist.group.WORLD, name="world", timeout=300),
                                              "openseek_hal/bench/cupy", device.index or 0))
        except Exception as e:
            problems[RAW_CUPY] = f"could not start: {type(e).__name__}: {e}"
    for adaptor in config["adaptors"]:
        kind = bench_kinds(n, config.get("kinds"))[rank] if adaptor == "hier" and n > 1 else None
        try:
            comm = create(adaptor, be, timeout=config["timeout"], check=False, **({"kind": kind} if kind else {}),
                          **({"chunk_bytes": max(TUNE_CHUNKS)} if config.get("tune") and adaptor == "host" else {}))
        except Exception as e:
            problems[adaptor] = f"could not start: {type(e).__name__}: {e}"
            continue
        if adaptor == "hier" and kind is not None:
            for algo in config.get("hier_algos") or HIER_ALGOS:
                impls[f"hier/{algo}"] = (comm, None)
        else:
            impls[adaptor] = (comm, None)
    if config.get("tune"):
        return tune_rank(impls, be, config, rank, n)
    sync = be.device.synchronize
    results = []
    points = [(op, s) for op in config["ops"] for s in config["sizes"]]
    progress = _progress(rank == 0, len(points) * len(impls))
    for op, nbytes in points:
        bufs = _buffers(op, nbytes, n, dtype, device)
        for impl, (comm, cupy_comm) in impls.items():
            progress(f"{op} {human(nbytes)} {impl}")
            staged_skip = impl.split("/")[0] in STAGED and nbytes > config["staged_max_bytes"]
            if bufs is None or impl in problems or staged_skip:
                continue
            if impl.startswith("hier/"):  # this algorithm for this collective on every rank
                comm.policy.forced = {op: hier_algorithm(op, impl.split("/", 1)[1])}
            out, inp = bufs
            try:
                ok, iters, seconds = _measure(op, _calls(impl, comm, cupy_comm)[op], out, inp, rank, n, sync,
                                              config)
            except Exception as e:
                problems[impl] = f"failed at {op} {human(nbytes)}: {type(e).__name__}: {e}"
                continue
            algbw = nbytes / seconds / 1e9
            results.append({"op": op, "impl": impl, "bytes": nbytes, "count": max(out.numel(), inp.numel()),
                            "dtype": config["dtype"], "time_us": seconds * 1e6, "algbw_GBps": algbw,
                            "busbw_GBps": algbw * BUS_FACTOR[op](n), "iters": iters,
                            "check": "ok" if ok else "FAILED"})
        del bufs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    progress(None)
    for _, cupy_comm in impls.values():
        if cupy_comm is not None:
            cupy_comm.destroy()
    if rank:
        return None
    return {"meta": _meta(be, n, config), "results": results, "problems": problems}


def bench_kinds(n: int, kinds: list[str] | None) -> list[str]:
    """The simulated chip kind of each rank: ``kinds`` as given, else the first half and the second half."""
    if kinds:
        if len(kinds) != n:
            raise ValueError(f"--kinds names {len(kinds)} kinds for {n} ranks")
        return list(kinds)
    return ["kind-a" if r < n // 2 else "kind-b" for r in range(n)]


def hier_algorithm(op: str, algo: str) -> str:
    """``leader``/``parallel`` as the collective names it (all-to-all's non-parallel path is ``staged``)."""
    from .tune import ALGORITHMS

    return algo if algo in ALGORITHMS[op] else ALGORITHMS[op][0]


def tune_rank(impls: dict[str, tuple[Any, Any]], be: Any, config: dict, rank: int, n: int) -> dict | None:
    """``--tune`` on one rank: per adaptor (hier, host), collective and size, every candidate timed with the
    same iterations on every rank; rank 0 returns {adaptor: {op: rows}} with the fastest per size."""
    from .tune import ALGORITHMS, Policy

    sync = be.device.synchronize
    dtype = DTYPES[config["dtype"]]
    tables: dict[str, dict[str, list[dict]]] = {}
    keys: dict[str, str] = {}
    for impl, (comm, _) in impls.items():
        adaptor = impl.split("/")[0]
        if adaptor not in STAGED or adaptor in tables:
            continue
        from .tune import topology

        keys[adaptor] = topology(adaptor, comm.kinds if adaptor == "hier" else [be.device_type] * n)
        rows: dict[str, list[dict]] = {}
        for op in config["ops"]:
            for nbytes in config["sizes"]:
                bufs = _buffers(op, nbytes, n, dtype, world_device(be))
                if bufs is None:
                    continue
                out, inp = bufs
                timings: dict[str, float] = {}
                if adaptor == "hier":
                    candidates = [(algo, {"forced": {op: algo}}) for algo in ALGORITHMS[op]]
                else:
                    candidates = [(str(c), {"rows": {op: [{"max_bytes": 2**62, "algo": None, "chunk_bytes": c}]}})
                                  for c in TUNE_CHUNKS]
                for name, fields in candidates:
                    comm.policy = Policy(**fields)
                    ok, _, seconds = _measure(op, _calls(adaptor, comm, None)[op], out, inp, rank, n, sync, config)
                    if not ok:  # agreed on every rank (the check is reduced over ranks)
                        raise RuntimeError(f"tune: {adaptor} {op} with {name} at {human(nbytes)} gave wrong results")
                    timings[name] = seconds * 1e6
                best = min(timings, key=timings.__getitem__)
                row = {"max_bytes": nbytes, "algo": best if adaptor == "hier" else None,
                       "chunk_bytes": int(best) if adaptor == "host" else None,
                       "us": {k: round(v, 1) for k, v in timings.items()}}
                rows.setdefault(op, []).append(row)
        tables[adaptor] = rows
    if rank:
        return None
    return {"meta": _meta(be, n, config), "tables": tables, "keys": keys}


def world_device(be: Any) -> torch.device:
    return be.device.torch_device


def _measure(op: str, f: Callable, out: torch.Tensor, inp: torch.Tensor, rank: int, n: int,
             sync: Callable[[], None], config: dict) -> tuple[bool, int, float]:
    """(result check passed on every rank, iterations, slowest rank's seconds per call)."""
    call = functools.partial(f, out, inp)
    expect = _fill_and_expect(op, out, inp, rank, n)
    call()
    sync()
    ok = _slowest(0.0 if expect() else 1.0) == 0.0
    out.zero_()  # zeros stay zeros however often they are summed
    inp.zero_()
    first = _slowest(_time(call, sync, 1))
    iters = int(min(config["iters"], max(config["min_iters"], TARGET_TIME_S / max(first, 1e-7))))
    _time(call, sync, min(config["warmup"], iters))
    return ok, iters, _slowest(_time(call, sync, iters))


def _progress(show: bool, total: int) -> Callable[[str | None], None]:
    if not show:
        return lambda _: None
    try:
        from rich.console import Console
        from rich.progress import Progress
    except ImportError:  # a bare GPU image: plain lines
        return lambda text: text and print(f"bench comm: {text}", file=sys.stderr, flush=True)

    bar = Progress(console=Console(stderr=True))
    task = bar.add_task("bench comm", total=total)
    bar.start()

    def step(text: str | None) -> None:
        if text is None:
            bar.stop()
        else:
            bar.update(task, advance=1, description=text)

    return step


def _machine() -> dict:
    """What the numbers depend on besides the code: CPU model and count, load when measured."""
    model = cpu_model()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": model, "cpus": os.cpu_count(), "arch": platform.machine(), "load_average": load,
            "omp_threads": os.environ.get("OMP_NUM_THREADS")}


def _meta(be: Any, n: int, config: dict) -> dict:
    meta = {"device": be.capabilities().device_name, "backend": be.name, "world_size": n,
            "kinds": bench_kinds(n, config.get("kinds")) if "hier" in config["adaptors"] else None,
            "dtype": config["dtype"], "torch": torch.__version__, "python": platform.python_version(),
            "host": platform.node(), "machine": _machine(),
            "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")},
            "provenance": provenance()}
    if be.device_type == "cuda":
        version = torch.cuda.nccl.version()  # a tuple in recent torch, an int (2xxyy) in old ones
        meta["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        meta["cuda"] = torch.version.cuda
    if config["cupy"]:
        import cupy

        meta["cupy"] = cupy.__version__
    return meta


# -- reporting ----------------------------------------------------------------------------------

def _by_point(results: list[dict]) -> dict[tuple[str, int, str], dict]:
    return {(r["op"], r["bytes"], r["impl"]): r for r in results}


def targets(results: list[dict]) -> list[dict]:
    """The issue's targets, evaluated on this run (only where both sides were measured)."""
    at = _by_point(results)
    out = []

    def add(what: str, value: float | None, limit: str, ok: bool | None) -> None:
        out.append({"target": what, "value": value, "limit": limit, "met": ok})

    ops = sorted({r["op"] for r in results})
    for op in ops:
        big = sorted({b for (o, b, _) in at if o == op and b >= 64 * 2**20})
        for impl, base in (("nccl", RAW_TORCH), ("torch", RAW_TORCH)):
            ratios = [at[(op, b, impl)]["busbw_GBps"] / at[(op, b, base)]["busbw_GBps"] for b in big
                      if (op, b, impl) in at and (op, b, base) in at]
            if ratios:
                add(f"{impl} {op} busbw / raw torch.distributed, >= 64 MiB (worst)", min(ratios), ">= 0.97",
                    min(ratios) >= 0.97)
    for nbytes in (8 * 2**10, 2**20):
        for op in ops:
            if (op, nbytes, "nccl") in at and (op, nbytes, RAW_CUPY) in at:
                r = at[(op, nbytes, "nccl")]["time_us"] / at[(op, nbytes, RAW_CUPY)]["time_us"]
                add(f"nccl {op} time / cupy-direct at {human(nbytes)}", r, "<= 1.5", r <= 1.5)
    for op in ops:
        key = (op, 8 * 2**10)
        if (*key, "torch") in at and (*key, RAW_TORCH) in at:
            d = at[(*key, "torch")]["time_us"] - at[(*key, RAW_TORCH)]["time_us"]
            add(f"torch {op} added time at 8 KiB (us)", d, "<= 10", d <= 10)
    return out


def table_text(report: dict) -> str:
    """The nccl-tests-style text table: one block per collective, implementations side by side."""
    results, meta = report["results"], report["meta"]
    impls = list(dict.fromkeys(r["impl"] for r in results))
    at = _by_point(results)
    lines = [f"# openseek-hal bench comm: {meta['world_size']} x {meta['device']} ({meta['backend']}), "
             f"{meta['dtype']}, torch {meta['torch']}" + (f", NCCL {meta['nccl']}" if "nccl" in meta else "")]
    width = 30
    for op in dict.fromkeys(r["op"] for r in results):
        lines.append("")
        lines.append(f"## {op}   (time us, algbw GB/s, busbw GB/s; '#' = result check failed)")
        lines.append(f"{'size':>10} " + "".join(f"{impl:>{width}}" for impl in impls))
        lines.append(f"{'':>10} " + "".join(f"{'time   algbw   busbw':>{width}}" for _ in impls))
        for nbytes in sorted({r["bytes"] for r in results if r["op"] == op}):
            cells = []
            for impl in impls:
                r = at.get((op, nbytes, impl))
                cells.append(f"{'-':>{width}}" if r is None else
                             f"{r['time_us']:>12.1f}{r['algbw_GBps']:>8.2f}{r['busbw_GBps']:>8.2f}"
                             f"{'#' if r['check'] != 'ok' else ' ':>2}")
            lines.append(f"{human(nbytes):>10} " + "".join(cells))
    return "\n".join(lines)


def markdown(report: dict) -> str:
    results, meta = report["results"], report["meta"]
    impls = list(dict.fromkeys(r["impl"] for r in results))
    at = _by_point(results)
    out = [f"# Collective benchmark: {meta['world_size']} x {meta['device']}", "",
           f"backend `{meta['backend']}`, dtype {meta['dtype']}, torch {meta['torch']}"
           + (f", NCCL {meta['nccl']}" if "nccl" in meta else "")
           + (f", CuPy {meta['cupy']}" if "cupy" in meta else "")
           + f", env {meta['env']}. Time in us, bandwidths in GB/s (1e9 B/s); sizes as in nccl-tests.", ""]
    for op in dict.fromkeys(r["op"] for r in results):
        header = " | ".join(f"{i} time | {i} algbw | {i} busbw" for i in impls)
        out += [f"## {op}", "", f"| size | {header} |", "|---:|" + "---:|" * (3 * len(impls))]
        for nbytes in sorted({r["bytes"] for r in results if r["op"] == op}):
            cells = []
            for impl in impls:
                r = at.get((op, nbytes, impl))
                cells += ["-"] * 3 if r is None else [
                    f"{r['time_us']:.1f}" + (" (check FAILED)" if r["check"] != "ok" else ""),
                    f"{r['algbw_GBps']:.2f}", f"{r['busbw_GBps']:.2f}"]
            out.append(f"| {human(nbytes)} | " + " | ".join(cells) + " |")
        out.append("")
    if report.get("problems"):
        out += ["## Not (fully) measured", ""]
        out += [f"- `{impl}`: {why}" for impl, why in report["problems"].items()] + [""]
    if report.get("targets"):
        out += ["## Targets (issue #5)", "", "| target | value | limit | met |", "|---|---:|---|---|"]
        out += [f"| {t['target']} | {t['value']:.3g} | {t['limit']} | {'yes' if t['met'] else 'NO'} |"
                for t in report["targets"]]
    return "\n".join(out) + "\n"


@click.command("comm")
@click.option("--backend", default=None,
              help="Backend whose devices the ranks use (default: the default backend).")
@click.option("--adaptor", "adaptors", default="torch,nccl,host,hier", show_default=True,
              help="Comma-separated adaptors to measure (unavailable ones are skipped with a note).")
@click.option("--op", "ops", default=",".join(OPS), show_default=True, help="Comma-separated collectives.")
@click.option("--world-size", "-n", type=int, default=None, help="Ranks (default: all devices; 2 on CPU).")
@click.option("--min-bytes", default="8K", show_default=True)
@click.option("--max-bytes", default="1G", show_default=True)
@click.option("--factor", type=int, default=2, show_default=True, help="Size multiplier between points.")
@click.option("--staged-max-bytes", default="64M", show_default=True,
              help="Largest size for the host-staged adaptors (host, hier).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="bfloat16", show_default=True)
@click.option("--iters", type=int, default=1000, show_default=True, help="Most timed iterations per point.")
@click.option("--min-iters", type=int, default=5, show_default=True)
@click.option("--warmup", type=int, default=5, show_default=True)
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Also time raw torch.distributed calls on the same group.")
@click.option("--cupy/--no-cupy", "use_cupy", default=None,
              help="Also time raw CuPy NCCL calls (default: when CuPy is present on CUDA).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Write comm_bench.json and comm_bench.md here.")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Collective timeout (s).")
@click.option("--kinds", default=None,
              help="hier: the simulated chip kind of each rank, comma-separated (default: first half, second half).")
@click.option("--hier-algos", default=",".join(HIER_ALGOS), show_default=True,
              help="hier: the algorithms to measure, each as its own column (hier/leader, hier/parallel).")
@click.option("--tune", is_flag=True,
              help="Measure the tuning table (hier algorithms, host chunk sizes) and write it to the cache.")
def comm(backend: str | None, adaptors: str, ops: str, world_size: int | None, min_bytes: str, max_bytes: str,
         factor: int, staged_max_bytes: str, dtype: str, iters: int, min_iters: int, warmup: int,
         baseline: bool, use_cupy: bool | None, out_dir: str | None, timeout: float, kinds: str | None,
         hier_algos: str, tune: bool) -> None:
    """Benchmark collectives like nccl-tests: time, algbw and busbw per size, beside raw baselines.

    With --tune: measure the choices of the hier and host adaptors and cache the fastest per size."""
    from ..backend import default_backend_name, get_backend
    from . import adaptor_available, adaptor_names
    from .launcher import launch
    from .nccl import is_available as cupy_available

    be = get_backend(backend or default_backend_name())
    chosen_ops = [o.strip() for o in ops.split(",") if o.strip()]
    bad = [o for o in chosen_ops if o not in OPS]
    if bad:
        raise click.BadParameter(f"unknown collective(s) {bad} (choose from {', '.join(OPS)})",
                                 param_hint="--op")
    wanted = [a.strip() for a in adaptors.split(",") if a.strip()]
    installed = adaptor_names()
    unknown = [a for a in wanted if a not in installed]
    if unknown:
        raise click.BadParameter(f"unknown adaptor(s) {unknown} (choose from {', '.join(installed)})",
                                 param_hint="--adaptor")
    chosen = []
    for a in wanted:
        ok, reason = adaptor_available(a, be.device_type)
        if ok:
            chosen.append(a)
        else:
            click.echo(f"bench comm: skipping adaptor '{a}': {reason}", err=True)
    if use_cupy is None:
        use_cupy = be.device_type == "cuda" and cupy_available()[0]
    elif use_cupy and not (be.device_type == "cuda" and cupy_available()[0]):
        raise click.UsageError(f"--cupy needs CuPy and the cuda backend ({cupy_available()[1]})")
    n = world_size or (be.device.count() if be.device_type != "cpu" else 2)
    lo, hi = parse_bytes(min_bytes), parse_bytes(max_bytes)
    if lo <= 0 or hi < lo or factor < 2:
        raise click.BadParameter("need 0 < --min-bytes <= --max-bytes and --factor >= 2")
    kind_list = [k.strip() for k in kinds.split(",")] if kinds else None
    if kind_list is not None and (len(kind_list) != n or not all(kind_list)):
        raise click.BadParameter(f"{kinds!r} must name one kind per rank ({n} ranks)", param_hint="--kinds")
    algos = [a.strip() for a in hier_algos.split(",") if a.strip()]
    if not algos or any(a not in HIER_ALGOS for a in algos):
        raise click.BadParameter(f"{hier_algos!r}: choose from {', '.join(HIER_ALGOS)}", param_hint="--hier-algos")
    if tune:
        chosen = [a for a in chosen if a in STAGED]
        if not chosen:
            raise click.UsageError("--tune measures the hier and host adaptors; neither is available here")
        baseline, use_cupy = False, False
    config = {"backend": be.name, "adaptors": chosen, "ops": chosen_ops, "sizes": sizes(lo, hi, factor),
              "staged_max_bytes": parse_bytes(staged_max_bytes), "dtype": dtype, "iters": iters,
              "min_iters": min_iters, "warmup": warmup, "baseline": baseline, "cupy": use_cupy,
              "timeout": timeout, "kinds": kind_list, "hier_algos": algos, "tune": tune}
    if not (chosen or baseline or use_cupy):
        raise click.UsageError("nothing to measure: no adaptor is available and the baselines are off")
    rank_fn = import_module(__spec__.name if __spec__ else __name__).bench_rank  # not __main__'s copy
    report = launch(rank_fn, n, backend=be.name, adaptor="torch", timeout=timeout, check=False,
                    args=(config,))[0]
    if tune:
        _write_tuning(report, out_dir)
        return
    report["targets"] = targets(report["results"]) if be.device_type == "cuda" else []
    click.echo(table_text(report))
    if report["targets"]:
        click.echo("")
        for t in report["targets"]:
            click.echo(f"target: {t['target']}: {t['value']:.3g} ({t['limit']}) "
                       f"{'met' if t['met'] else 'NOT MET'}")
    for impl, why in report["problems"].items():
        click.echo(f"bench comm: {impl} not (fully) measured: {why}", err=True)
    failed = [r for r in report["results"] if r["check"] != "ok"]
    if out_dir:
        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        (path / "comm_bench.json").write_text(json.dumps(report, indent=1))
        (path / "comm_bench.md").write_text(markdown(report))
        click.echo(f"wrote {path / 'comm_bench.json'} and {path / 'comm_bench.md'}", err=True)
    if report["problems"]:
        raise click.ClickException(f"{len(report['problems'])} implementation(s) failed: "
                                   f"{', '.join(report['problems'])} (see above)")
    if failed:
        raise click.ClickException(f"{len(failed)} result check(s) failed, e.g. {failed[0]['impl']} "
                                   f"{failed[0]['op']} at {human(failed[0]['bytes'])}")


def _write_tuning(report: dict, out_dir: str | None) -> None:
    """Store each adaptor's measured rows in this host's table and print them."""
    from .tune import table_path, write_table

    path = table_path()
    for adaptor, rows in report["tables"].items():
        key = report["keys"][adaptor]
        write_table(path, key, rows, report["meta"])
        click.echo(f"## {key}")
        for op, entries in rows.items():
            for r in entries:
                choice = r["algo"] or human(r["chunk_bytes"])
                times = ", ".join(f"{k if adaptor == 'hier' else human(int(k))} {v:.0f} us" for k, v in r["us"].items())
                click.echo(f"{op:>18} <= {human(r['max_bytes']):>8}: {choice:>9}   ({times})")
    click.echo(f"wrote the tuning table {path}", err=True)
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "comm_tune.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":  # before the `bench` group lands: python -m openseek_hal.comm.bench
    from ..errors import UserError

    try:
        comm.main(args=sys.argv[1:], prog_name="openseek-hal bench comm", standalone_mode=False)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except UserError as e:
        click.echo(f"openseek-hal: error: {e}", err=True)
        sys.exit(e.exit_code)
