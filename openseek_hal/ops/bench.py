"""`openseek-hal bench`: per-op GPU benchmarks of a backend against torch eager, torch.compile, FlagGems, Liger.

``openseek-hal bench --backend cuda [--op NAME] [--json FILE]`` times every case of
`openseek_hal.ops.bench_cases` forward and backward: median of CUDA-event timings after warm-up
(``triton.testing.do_bench``, which also flushes the L2 cache between runs), achieved GB/s and its
percent of the device-to-device copy bandwidth measured at the start of the same run, and the
speedup of the backend's op over each baseline that is installed. ``--timing graph`` times every
implementation inside a CUDA graph instead (device time only, as a captured training step runs
it; see `_graph_ms`). ``bench comm`` (collectives) comes from `openseek_hal.comm.bench`.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from functools import partial
from importlib import import_module
from pathlib import Path
from typing import Any

import click
import torch
from torch.utils import _pytree as pytree

from ..errors import UserError
from ..provenance import provenance
from . import get

WARMUP_MS, REP_MS = 25, 200


def _median_ms(fn: Callable[[], Any]) -> float:
    from triton.testing import do_bench

    fn()  # compile (Triton, torch.compile) before timing
    torch.cuda.synchronize()
    return float(do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median"))


def copy_bandwidth(device: torch.device, gib: float = 1.0) -> float:
    """Bytes/s of a large device-to-device copy (bytes read plus bytes written)."""
    n = int(gib * 2**30) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = statistics.median(_median_ms(lambda: dst.copy_(src)) for _ in range(3))
    return 2 * src.numel() * 4 / (ms * 1e-3)


def _floating(outputs: Any) -> list[torch.Tensor]:
    return [o for o in pytree.tree_leaves(outputs) if isinstance(o, torch.Tensor) and o.requires_grad]


TIMINGS = ("events", "graph")
GRAPH_CALLS, GRAPH_REPLAYS = 20, 10


def _graph_ms(fns: list[Callable[[], Any]], stream: torch.cuda.Stream, min_calls: int = GRAPH_CALLS) -> float:
    """Device milliseconds a call: ``fns`` called in turn ``min_calls`` times (rounded up to whole rounds)
    inside one CUDA graph, the median over ``GRAPH_REPLAYS`` replays. Only the kernels run: no launch,
    Python or autograd overhead, which dominates `_median_ms` for ops of a few tens of microseconds.
    Each ``fn`` works on its own inputs (`_arg_sets`), so a call does not find its inputs in L2."""
    for _ in range(2):  # compile (Triton, torch.compile) and warm up outside the capture
        for fn in fns:
            fn()
    _check_capturable(fns)
    stream.synchronize()
    calls = len(fns) * math.ceil(min_calls / len(fns))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    stream.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(GRAPH_REPLAYS):
        start.record(stream)
        graph.replay()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return statistics.median(times)


def _check_capturable(fns: list[Callable[[], Any]]) -> None:
    """Raise before the capture if a call synchronizes with the host (a ``.tolist()``, a copy from
    pageable CPU memory): under capture that call fails, and a failed capture leaves the CUDA RNG in
    capture mode, so every later op that draws random numbers fails too (an implementation that builds
    a document mask on the host took the rest of a graph-timed `bench` run down with it). CUDA's sync
    debug mode "error" turns such a call into an exception on an ordinary eager call instead."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fns[0]()
    except RuntimeError as e:
        raise RuntimeError(f"cannot be timed in a CUDA graph: it synchronizes with the host ({str(e)[:120]})") from e
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _arg_sets(case, l2_bytes: int) -> int:
    """How many independent input sets a graph-timed case cycles through: enough that the data of the
    calls in between (``(sets - 1) x`` the bytes a call moves) is three times the L2 cache, 2 to 16 (2 for a
    case that counts no bytes: a compute-bound one)."""
    moved = max(case.fwd_bytes, case.bwd_bytes)
    return 2 if moved <= 0 else max(2, min(16, math.ceil(3 * l2_bytes / moved) + 1))


def _time_case_graph(case, impl: Callable[..., Any], device: torch.device, l2_bytes: int,
                     backward_only: bool = False) -> dict[str, float]:
    """`_time_case` with every direction timed by `_graph_ms` on `_arg_sets` input sets; forward and
    backward run on the capture stream (autograd runs a backward on its forward's stream)."""
    sets = [case.make(device) for _ in range(_arg_sets(case, l2_bytes))]
    stream = None
    if device.type == "cuda":
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        def forward(args=None, kwargs=None):
            with torch.no_grad():
                return impl(*args, **kwargs)
        times = {} if backward_only else {"fwd": _graph_ms([partial(forward, a, kw) for a, kw in sets], stream)}
        if not case.grad_args:
            return times
        for args, _ in sets:
            for i in case.grad_args:
                args[i].requires_grad_(True)
        fns = []
        for args, kwargs in sets:
            grad_args = [args[i] for i in case.grad_args]
            outs = _floating(impl(*args, **kwargs))
            if case.fused_fwd_bwd:
                cots = [torch.ones_like(o) for o in outs]
                fns.append(partial(_fused_step, impl, args, kwargs, grad_args, cots))
            else:
                cots = [torch.randn_like(o) for o in outs]
                fns.append(partial(torch.autograd.grad, outs, grad_args, cots, retain_graph=True))
        try:
            times["fwd+bwd" if case.fused_fwd_bwd else "bwd"] = _graph_ms(fns, stream)
        except Exception as e:  # no backward (FlexAttention on a CPU): the forward time still counts
            text = str(e).strip().splitlines()
            times["error"] = f"{type(e).__name__}: {text[0][:160] if text else ''}"
        return times


def _fused_step(impl: Callable[..., Any], args: tuple, kwargs: dict, grad_args: list[torch.Tensor],
                cots: list[torch.Tensor]) -> None:
    torch.autograd.grad(_floating(impl(*args, **kwargs)), grad_args, cots)


def _time_case(case, impl: Callable[..., Any], device: torch.device, timing: str = "events",
               l2_bytes: int = 0, backward_only: bool = False) -> dict[str, float]:
    """``{"fwd": ms, "bwd": ms}`` (or ``{"fwd+bwd": ms}``) for one implementation of a case;
    ``backward_only``: without the forward's time (a launch sweep's backward row)."""
    if timing == "graph":
        return _time_case_graph(case, impl, device, l2_bytes, backward_only)
    args, kwargs = case.make(device)
    grad_args = [a for i, a in enumerate(args) if i in case.grad_args]
    times: dict[str, float] = {}
    if not backward_only:
        with torch.no_grad():
            times["fwd"] = _median_ms(lambda: impl(*args, **kwargs))
    if not grad_args:
        return times
    for a in grad_args:
        a.requires_grad_(True)
    try:
        return {**times, **_time_backward(case, impl, args, kwargs, grad_args)}
    except Exception as e:  # no backward (FlexAttention on a CPU): the forward time still counts
        text = str(e).strip().splitlines()
        return {**times, "error": f"{type(e).__name__}: {text[0][:160] if text else ''}"}


def _time_backward(case, impl: Callable[..., Any], args: tuple, kwargs: dict,
                   grad_args: list[torch.Tensor]) -> dict[str, float]:
    if case.fused_fwd_bwd:
        # upstream gradients made once, outside the timed step (a loss's is the implicit 1)
        cots = [torch.ones_like(o) for o in _floating(impl(*args, **kwargs))]
        return {"fwd+bwd": _median_ms(partial(_fused_step, impl, args, kwargs, grad_args, cots))}
    outs = _floating(impl(*args, **kwargs))
    cots = [torch.randn_like(o) for o in outs]
    return {"bwd": _median_ms(lambda: torch.autograd.grad(outs, grad_args, cots, retain_graph=True))}


def _extra_peak_bytes(case, impl: Callable[..., Any], device: torch.device, **extra_kwargs: Any) -> int:
    """Peak memory of one forward+backward above what the inputs hold."""
    args, kwargs = case.make(device)
    grad_args = [a.requires_grad_(True) for i, a in enumerate(args) if i in case.grad_args]
    impl(*args, **kwargs, **extra_kwargs)  # compile first
    torch.cuda.synchronize()
    args, kwargs = case.make(device)
    grad_args = [a.requires_grad_(True) for i, a in enumerate(args) if i in case.grad_args]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    grads = torch.autograd.grad(_floating(impl(*args, **kwargs, **extra_kwargs)), grad_args)
    torch.cuda.synchronize()
    del grads
    return torch.cuda.max_memory_allocated(device) - base


def case_impls(case, backend_op: Callable[..., Any], interpret: bool = False) -> dict[str, Callable[..., Any]]:
    """``{"ours": ..., baselines...}`` for one case: the backend's op (or the case's own ``ours``, e.g.
    the Triton flash kernel where the backend picks per shape), torch eager/compile and the extras."""
    reference = get(case.op).reference
    impls: dict[str, Callable[..., Any]] = {"ours": case.ours(interpret) if case.ours is not None else backend_op}
    if case.eager_baseline:
        impls["eager"] = reference
    if case.compile_baseline:
        impls["compile"] = torch.compile(reference, dynamic=False)
    impls.update(case.baselines)
    return impls


def time_impls(case, impls: dict[str, Callable[..., Any]], device: torch.device,
               timing: str = "events") -> dict[str, dict[str, Any]]:
    """`_time_case` for every implementation; one that fails (no such shape, no backward) gets its error."""
    times: dict[str, dict[str, Any]] = {}
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    for name, impl in impls.items():
        try:
            times[name] = _time_case(case, impl, device, timing, l2_bytes)
        except Exception as e:  # a baseline without this shape or a backward is reported, not fatal
            text = str(e).strip().splitlines()
            times[name] = {"error": f"{type(e).__name__}: {text[0][:160] if text else ''}"}
        if name in ("compile", "flex"):
            torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return times


def case_rows(case, times: dict[str, dict[str, Any]], copy_bw: float) -> list[dict[str, Any]]:
    """The result rows of one case from ``{impl: {"fwd"|"bwd"|"fwd+bwd": ms} or {"error": text}}``:
    GB/s and % of copy bandwidth from the bytes moved, TFLOP/s where the case counts FLOPs."""
    rows = []
    for direction in ("fwd", "bwd", "fwd+bwd"):
        ours = times["ours"].get(direction)
        if ours is None:
            continue
        nbytes = {"fwd": case.fwd_bytes, "bwd": case.bwd_bytes, "fwd+bwd": case.fwd_bytes + case.bwd_bytes}[direction]
        flops = {"fwd": case.flops, "bwd": case.bwd_flops, "fwd+bwd": case.flops + case.bwd_flops}[direction]
        row = {"op": case.op, "shape": case.label, "dir": direction, "ours_ms": ours,
               "GBps": nbytes / (ours * 1e-3) / 1e9 if nbytes else None,
               "pct_copy": 100 * nbytes / (ours * 1e-3) / copy_bw if nbytes else None,
               "TFLOPs": flops / (ours * 1e-3) / 1e12 if flops else None, "baselines": {}}
        for name, t in times.items():
            if name != "ours":
                ms = t.get(direction)
                if ms:
                    row["baselines"][name] = {"ms": ms, "speedup": ms / ours}
                    if flops:
                        row["baselines"][name]["TFLOPs"] = flops / (ms * 1e-3) / 1e12
                else:
                    row["baselines"][name] = {"error": t.get("error")}
        rows.append(row)
    return rows


def run_bench(backend_name: str, op: str | None, progress: Callable[[str], None],
              timing: str = "events") -> dict[str, Any]:
    """Benchmark ``backend_name`` on every case (or those of ``op``); returns the JSON-ready results.
    ``timing``: "events" (`_median_ms`) or "graph" (`_graph_ms`, every implementation alike)."""
    if timing not in TIMINGS:
        raise UserError(f"unknown timing {timing!r}; choose one of {', '.join(TIMINGS)}")
    from ..backend import get_backend
    from . import bench_cases

    backend = get_backend(backend_name)
    if backend.device.type != "cuda":
        raise UserError(f"bench times GPU kernels with CUDA events; backend '{backend_name}' runs on "
                        f"'{backend.device.type}'")
    device = backend.device.torch_device
    try:
        cases = bench_cases.cases(op)
    except KeyError as e:
        raise UserError(str(e.args[0])) from None
    copy_bw = copy_bandwidth(device)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
        "triton": import_module("triton").__version__, "backend": backend_name,
        "copy_bandwidth_GBps": copy_bw / 1e9, "timing": timing, "provenance": provenance(), "rows": [],
    }
    for case in cases:
        progress(f"{case.op} {case.label}")
        times = time_impls(case, case_impls(case, backend.op(case.op)), device, timing)
        if "error" in times["ours"]:  # no row can be made: the failure is recorded instead
            results.setdefault("errors", []).append(dict(op=case.op, shape=case.label, error=times["ours"]["error"]))
            progress(f"{case.op} {case.label}: {times['ours']['error']}")
        results["rows"].extend(case_rows(case, times, copy_bw))
        if case.op == "causal_attention" and "causal_attention" in backend.op_choices():
            # what the backend's own op would run at this shape (its per-shape timing), for the report
            args, kwargs = case.make(device)
            backend.op(case.op)(*args, **kwargs)
            results["attention_choices"] = backend.op_choices()["causal_attention"]
        if case.op in ("fp8_gemm", "fp8_linear") and "fp8_gemm" in backend.op_choices():
            results["fp8_gemm_choices"] = backend.op_choices()["fp8_gemm"]  # decided while "ours" was timed
        if case.op == "cross_entropy":
            impls = case_impls(case, backend.op(case.op))
            mem = {"ours_inplace": _extra_peak_bytes(case, impls["ours"], device, inplace_backward=True),
                   "ours": _extra_peak_bytes(case, impls["ours"], device)}
            for name in ("eager", "compile", "liger", "flaggems"):
                if name in impls:
                    try:
                        mem[name] = _extra_peak_bytes(case, impls[name], device)
                    except Exception as e:
                        mem[name] = f"{type(e).__name__}"
            results.setdefault("cross_entropy_extra_peak_bytes", {})[case.label] = mem
            torch._dynamo.reset()
    return results


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    order = ("eager", "compile", "flaggems", "liger", "torch-fused", "sdpa", "flex")
    names = sorted({n for r in results["rows"] for n in r["baselines"]},
                   key=lambda n: (order.index(n) if n in order else len(order), n))
    table = Table(title=f"openseek-hal bench: {results['backend']} on {results['device']} "
                        f"(copy {results['copy_bandwidth_GBps']:.0f} GB/s; {results.get('timing', 'events')} timing)")
    for col in ("op", "shape", "dir", "ms", "GB/s", "% copy", "TFLOP/s", *[f"vs {n}" for n in names]):
        table.add_column(col, justify="left" if col in ("op", "shape", "dir") else "right")
    for r in results["rows"]:
        cells = [r["op"], r["shape"], r["dir"], f"{r['ours_ms']:.3f}",
                 f"{r['GBps']:.0f}" if r["GBps"] else "-", f"{r['pct_copy']:.0f}" if r["pct_copy"] else "-",
                 f"{r['TFLOPs']:.0f}" if r.get("TFLOPs") else "-"]
        for n in names:
            b = r["baselines"].get(n)
            cells.append(f"{b['speedup']:.2f}x" if b and "speedup" in b else "-")
        table.add_row(*cells)
    Console(width=200).print(table)


class _BenchGroup(click.Group):
    """``bench`` with subcommands attached lazily (``comm`` lives with the collectives)."""

    lazy = {"comm": "openseek_hal.comm.bench:comm"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module, _, attr = self.lazy[name].partition(":")
            try:
                return getattr(import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise UserError(f"'bench {name}' is not available: cannot load {self.lazy[name]} ({e})") from None
        return super().get_command(ctx, name)


@click.group("bench", cls=_BenchGroup, invoke_without_command=True)
@click.option("--backend", "backend_name", default="cuda", show_default=True, help="Backend whose ops to time.")
@click.option("--op", default=None, help="Only this op (default: every op with a benchmark case).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the full results here.")
@click.option("--timing", type=click.Choice(TIMINGS), default="events", show_default=True,
              help="events: CUDA events around each call, L2 flushed (do_bench); graph: device time of calls "
                   "captured in a CUDA graph, every implementation alike (no launch or autograd overhead).")
@click.pass_context
def bench(ctx: click.Context, backend_name: str, op: str | None, json_path: Path | None, timing: str) -> None:
    """Time a backend's ops (forward, backward) against torch eager, torch.compile, FlagGems and Liger."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.console import Console

    console = Console(stderr=True)
    with console.status("benchmarking") as status:
        results = run_bench(backend_name, op, lambda msg: status.update(f"benchmarking {msg}"), timing)
    print_table(results)
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=1))
        console.print(f"results written to {json_path}")
