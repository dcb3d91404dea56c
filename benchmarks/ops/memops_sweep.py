"""Sweep the launch parameters of the memory-bound kernels on a GPU (issue #13, the rows that miss).

Usage (from the repository root, on a CUDA machine, after ``pip install --no-deps -e .``):
    python benchmarks/ops/memops_sweep.py OUT_DIR [--budget-s 190] [--rows SUBSTRING[,SUBSTRING...]] [--no-guard]
        [--timing graph]

For each row below (op, `bench_cases` shape, direction) it times every config of
`openseek_hal.ops.kernels.launch.candidates` (the current choice first, then the launch this module
replaced, then the alternatives) and the baselines of ``openseek-hal bench`` (torch.compile of the
OpDef reference, Liger and FlagGems where installed), in the same process, with the bench's timing
(`openseek_hal.ops.bench._median_ms`: ``triton.testing.do_bench`` median, L2 flushed) and its copy
bandwidth; with ``--timing graph`` the bench's device-time timing instead (`bench._time_case_graph`: calls
captured in a CUDA graph, which at rows of a few tens of microseconds is the only timing that separates the
configs from the host's overhead). Each config's outputs (forward) or gradients (backward) are compared with the current
default's (bf16 tolerance), and the default's with the float32 eager reference, so a broken config
is flagged (``ok: false``) and never suggested.

Writes OUT_DIR/memops_sweep.json (with provenance) and prints, last, a table and the `launch.TABLE`
entries of the best configs (paste them into openseek_hal/ops/kernels/launch.py). Warnings raised
while it runs (e.g. Triton's "'and'/'or' deprecated for non-scalar tensors") are counted per source
file, so a kernel that warns is named. A time budget (default 190 s of sweeping, after start-up)
stops trying alternatives of a row once its share is spent; the default config and the baselines
always run. Last come the guard rows (`GUARD_ROWS`: rows that met the target before but whose
default launch changed), with only the default and the previous launch timed.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import time
import warnings
from importlib import import_module
from pathlib import Path
from typing import Any

import torch

# (op, label prefix in bench_cases, direction, launch kernel, row length n)
ROWS: list[tuple[str, str, str, str, int]] = [
    ("rms_norm", "openseek-small 16384x1280", "fwd", "rms_norm_fwd", 1280),
    # the narrow rows' backward trailed torch.compile (0.84-0.90x at 878920c3): every candidate again
    ("rms_norm", "openseek-small 16384x1280", "bwd", "rms_norm_bwd", 1280),
    ("add_rms_norm", "openseek-small 16384x1280", "bwd", "add_rms_norm_bwd", 1280),
    ("rms_norm", "deepseek-v3 16384x7168", "bwd", "rms_norm_bwd", 7168),
    ("rms_norm", "reference 16384x4096", "bwd", "rms_norm_bwd", 4096),
    ("add_rms_norm", "deepseek-v3 16384x7168", "bwd", "add_rms_norm_bwd", 7168),
    ("add_rms_norm", "reference 16384x4096", "bwd", "add_rms_norm_bwd", 4096),
    ("silu_and_mul", "openseek-small 16384x2*2560", "fwd", "silu_and_mul_fwd", 2560),
    ("silu_and_mul", "deepseek-v3 16384x2*2048", "bwd", "silu_and_mul_bwd", 2048),
    ("silu_and_mul", "reference 16384x2*4096", "bwd", "silu_and_mul_bwd", 4096),
    ("moe_route", "openseek-small 16384x64", "bwd", "moe_route_bwd", 64),
    ("moe_route", "deepseek-v3 16384x256", "bwd", "moe_route_bwd", 256),
    # rope at OpenSeek-Small's shape (both layouts) was 0.93-0.97x torch.compile at 878920c3
    ("rope", "openseek-small 4x10x4096x64 half", "fwd", "rope", 64),
    ("rope", "openseek-small 4x10x4096x64 half", "bwd", "rope", 64),
    ("rope", "openseek-small 4x10x4096x64 interleaved", "fwd", "rope", 64),
    ("rope", "openseek-small 4x10x4096x64 interleaved", "bwd", "rope", 64),
]
RTOL = ATOL = 2e-2  # bf16 outputs (8 bits of mantissa): a config differs from another by rounding only
REF_RTOL = 1e-2  # the default against the float32 eager reference, normwise (bf16 rounding is 2**-9)
TARGET_PCT = 85.0
# Rows that met the target with the previous launch but whose default changed with launch.py's rule:
# only the default and the previous launch are timed (and the baselines), to catch a regression.
GUARD_ROWS: list[tuple[str, str, str, str, int]] = [
    ("add_rms_norm", "openseek-small 16384x1280", "fwd", "add_rms_norm_fwd", 1280),
    ("silu_and_mul", "openseek-small 16384x2*2560", "bwd", "silu_and_mul_bwd", 2560),
    ("silu_and_mul", "deepseek-v3 16384x2*2048", "fwd", "silu_and_mul_fwd", 2048),
    ("silu_and_mul", "reference 16384x2*4096", "fwd", "silu_and_mul_fwd", 4096),
]
GUARD_S = 8.0  # seconds kept back for each guard row


def _case(bench_cases, op: str, prefix: str):
    found = [c for c in bench_cases.cases(op) if c.label.startswith(prefix)]
    if len(found) != 1:
        raise SystemExit(f"no single bench case {op} {prefix!r}: {[c.label for c in bench_cases.cases(op)]}")
    return found[0]


def _outputs(case, impl, direction: str, device, seed: int = 0) -> list[torch.Tensor]:
    """The forward's floating outputs, or the gradients of the grad inputs for fixed random cotangents."""
    from openseek_hal.ops.bench import _floating

    torch.manual_seed(seed)
    args, kwargs = case.make(device)
    if direction == "fwd":
        with torch.no_grad():
            return [o.float() for o in torch.utils._pytree.tree_leaves(impl(*args, **kwargs))
                    if isinstance(o, torch.Tensor) and o.is_floating_point()]
    grad_args = [a.requires_grad_(True) for i, a in enumerate(args) if i in case.grad_args]
    outs = _floating(impl(*args, **kwargs))
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    cots = [torch.randn(o.shape, device=device, generator=gen).to(o.dtype) for o in outs]
    return [g.float() for g in torch.autograd.grad(outs, grad_args, cots)]


def _relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest normwise relative difference, ``|a - b| / |b|`` per tensor (robust to cancellation in
    single elements, e.g. a weight gradient summed over rows from a residual rounded to bf16)."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    return max([float((x - y).norm() / y.norm().clamp_min(1e-30)) for x, y in zip(a, b)], default=0.0)


def _compare(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[bool, float]:
    if len(a) != len(b):
        return False, float("inf")
    ok, worst = True, 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return False, float("inf")
        ok &= bool(torch.allclose(x, y, rtol=RTOL, atol=ATOL))
        worst = max(worst, float((x - y).abs().max())) if x.numel() else worst
    return ok, worst


def _time(case, impl, direction: str, device, timing: str = "events") -> float:
    """The bench's own timing of one direction (`bench._time_case`, events or graph)."""
    from openseek_hal.ops import bench

    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    if direction == "fwd":
        return bench._time_case(dataclasses.replace(case, grad_args=()), impl, device, timing, l2)["fwd"]
    times = bench._time_case(case, impl, device, timing, l2, backward_only=True)
    if "error" in times:
        raise RuntimeError(times["error"])
    return times["bwd"]


def _error(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def sweep_row(row, device, copy_bw: float, row_deadline: float, global_deadline: float,
              interpret: bool = False, guard: bool = False, timing: str = "events") -> dict[str, Any]:
    """One row: every candidate config (checked, timed; with ``guard`` only the default and the
    previous launch), then the baselines. ``interpret`` runs the interpreted kernels (the CPU test
    of this script; timings then mean nothing). ``timing``: the bench's ("events" or "graph")."""
    from openseek_hal.ops import bench, bench_cases
    from openseek_hal.ops.kernel_loader import load_kernels

    op, prefix, direction, kernel, n = row
    started = time.time()
    pkg = load_kernels(interpret=interpret)
    launch, ours = pkg.launch, pkg.KERNELS[op]
    case = _case(bench_cases, op, prefix)
    nbytes = case.fwd_bytes if direction == "fwd" else case.bwd_bytes
    out: dict[str, Any] = {"op": op, "shape": case.label, "dir": direction, "kernel": kernel, "n": n,
                           "bytes": nbytes, "guard": guard, "configs": [], "baselines": {}}

    def pct(ms: float) -> float:
        return 100 * nbytes / (ms * 1e-3) / copy_bw

    # the float32 eager reference, as a check of the default (the configs are compared with the default)
    try:
        ref_impl = bench.case_impls(case, ours)["eager"]
        ref = _outputs(case, lambda *a, **k: ref_impl(*[t.float() if isinstance(t, torch.Tensor)
                                                           and t.is_floating_point() else t for t in a], **k),
                       direction, device)
    except Exception as e:
        ref, out["reference_error"] = None, _error(e)
    default = None
    configs = launch.candidates(kernel, n)
    if guard:
        configs = [configs[0]] + ([launch.previous(kernel, n)] if launch.previous(kernel, n) != configs[0] else [])
    for i, cfg in enumerate(configs):
        entry: dict[str, Any] = {"config": cfg, "default": i == 0}
        if i == 1:  # the row's share counts from here: the first row's start-up and compiles are not sweeping
            row_deadline = min(global_deadline, row_deadline + (time.time() - started))
        if i and time.time() > row_deadline:
            entry["skipped"] = "time budget"
            out["configs"].append(entry)
            continue
        try:
            with launch.override(kernel, cfg):
                result = _outputs(case, ours, direction, device)
                if default is None:
                    default = result
                    if ref is not None:
                        entry["rel_error_vs_reference"] = _relative_error(result, ref)
                        entry["ok_vs_reference"] = entry["rel_error_vs_reference"] <= REF_RTOL
                    entry["ok"], entry["max_abs_diff"] = True, 0.0  # the anchor of the comparisons
                else:
                    entry["ok"], entry["max_abs_diff"] = _compare(result, default)
                del result
                entry["ms"] = _time(case, ours, direction, device, timing)
                entry["pct_copy"] = pct(entry["ms"])
        except Exception as e:
            entry["error"] = _error(e)
            entry["ok"] = False
        out["configs"].append(entry)
        torch.cuda.empty_cache()
    del ref, default
    torch.cuda.empty_cache()
    impls = bench.case_impls(case, ours)
    for name, impl in impls.items():
        if name in ("ours", "eager"):
            continue
        if time.time() > global_deadline:
            out["baselines"][name] = {"skipped": "time budget"}
            continue
        try:
            ms = _time(case, impl, direction, device, timing)
            out["baselines"][name] = {"ms": ms, "pct_copy": pct(ms)}
        except Exception as e:
            out["baselines"][name] = {"error": _error(e)}
        if name == "compile":
            torch._dynamo.reset()
        torch.cuda.empty_cache()
    timed = [c for c in out["configs"] if c.get("ok") and "ms" in c]
    best = min(timed, key=lambda c: c["ms"]) if timed else None
    base = [(b["ms"], name) for name, b in out["baselines"].items() if "ms" in b]
    out["best"] = best["config"] if best else None
    out["best_ms"] = best["ms"] if best else None
    out["best_pct_copy"] = best["pct_copy"] if best else None
    out["default_ms"] = out["configs"][0].get("ms")
    out["best_baseline"] = min(base)[1] if base else None
    out["best_baseline_ms"] = min(base)[0] if base else None
    out["meets_target"] = bool(best) and (best["pct_copy"] >= TARGET_PCT or (bool(base) and best["ms"] <= min(base)[0]))
    return out


def _table_line(row: dict[str, Any]) -> str:
    cfg = ", ".join(f"{k}={v}" for k, v in row["best"].items())
    return f'    ("{row["kernel"]}", {row["n"]}): dict({cfg}),  # {row["op"]} {row["shape"]} {row["dir"]}'


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--budget-s", type=float, default=190.0, help="seconds of sweeping (after start-up)")
    parser.add_argument("--rows", default=None, help="only rows whose 'op shape dir' contains one of these")
    parser.add_argument("--no-guard", action="store_true", help="skip the guard rows (default and previous only)")
    parser.add_argument("--timing", choices=("events", "graph"), default="events",
                        help="events: do_bench; graph: device time in a CUDA graph (openseek-hal bench --timing)")
    parser.add_argument("--interpret", action="store_true", help=argparse.SUPPRESS)  # CPU plumbing test only
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available() and not args.interpret:
        raise SystemExit("memops_sweep times GPU kernels with CUDA events: no CUDA device")
    from openseek_hal.ops import bench
    from openseek_hal.provenance import provenance

    bench.WARMUP_MS, bench.REP_MS = 15, 60  # a few hundred reps each: ~100 configs and baselines fit the budget
    rows = [(r, False) for r in ROWS] + ([] if args.no_guard else [(r, True) for r in GUARD_ROWS])
    rows = [(r, g) for r, g in rows if args.rows is None
            or any(s in f"{r[0]} {r[1]} {r[2]}" for s in args.rows.split(","))]
    n_full = sum(not g for _, g in rows)
    device = torch.device("cpu" if args.interpret else "cuda")
    t0 = time.time()
    caught: collections.Counter = collections.Counter()
    results: dict[str, Any] = {
        "device": "cpu (interpreter)" if args.interpret else torch.cuda.get_device_name(device),
        "torch": torch.__version__,        "triton": import_module("triton").__version__, "provenance": provenance(),
        "timing": ({"warmup_ms": bench.WARMUP_MS, "rep_ms": bench.REP_MS, "stat": "median, do_bench (L2 flushed)"}
                   if args.timing == "events" else
                   {"calls": bench.GRAPH_CALLS, "replays": bench.GRAPH_REPLAYS,
                    "stat": "median replay of a CUDA graph of calls on rotating input sets"}),
        "tolerance": {"rtol": RTOL, "atol": ATOL}, "rows": [],
    }
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        copy_bw = bench.copy_bandwidth(device)
        results["copy_bandwidth_GBps"] = copy_bw / 1e9
        deadline = time.time() + args.budget_s
        full_deadline = deadline - GUARD_S * (len(rows) - n_full)
        for i, (row, guard) in enumerate(rows):
            now = time.time()
            # a full row's share of the time left to full rows (its baselines need about half of it)
            row_deadline = now + 0.5 * (full_deadline - now) / max(1, n_full - i) if not guard else deadline
            print(f"[{now - t0:5.0f}s] {row[0]} {row[1]} {row[2]}{' (guard)' if guard else ''}", flush=True)
            results["rows"].append(sweep_row(row, device, copy_bw, row_deadline, deadline, args.interpret, guard,
                                             args.timing))
            for w in seen:
                caught[(w.filename, w.lineno, str(w.message)[:120])] += 1
            seen.clear()
            (args.out / "memops_sweep.json").write_text(json.dumps(results, indent=1, default=str))
    results["warnings"] = [dict(file=f, line=ln, message=m, count=c) for (f, ln, m), c in caught.most_common()]
    results["seconds"] = time.time() - t0
    (args.out / "memops_sweep.json").write_text(json.dumps(results, indent=1, default=str))

    if caught:
        print(f"\nwarnings while sweeping ({sum(caught.values())}), by source:")
        for (f, ln, m), c in caught.most_common(12):
            print(f"  {c:4d}x {f}:{ln}: {m}")
    for r in results["rows"]:
        first = r["configs"][0]
        if "reference_error" in r or not first.get("ok_vs_reference", True):
            why = r.get("reference_error") or f"relative error {first['rel_error_vs_reference']:.3g}"
            print(f"FLAGGED {r['op']} {r['shape']} {r['dir']} the default config against the float32 reference: {why}")
        for c in r["configs"]:
            if not c.get("ok", True) or "error" in c:
                why = c.get("error") or f"differs (max abs {c.get('max_abs_diff', float('nan')):.3g})"
                print(f"FLAGGED {r['op']} {r['shape']} {r['dir']} {c['config']}: {why}")
    print(f"\n{results['device']}, torch {results['torch']}, Triton {results['triton']}, copy "
          f"{results['copy_bandwidth_GBps']:.0f} GB/s, {results['seconds']:.0f} s; target: >= {TARGET_PCT:.0f}% of "
          "copy or <= the best baseline")
    print(f"{'op':13s} {'shape':28s} {'dir':3s} {'best config':48s} {'ms':>7s} {'%copy':>5s} {'default':>7s} "
          f"{'best baseline':>20s} {'meets':>5s}")
    for r in results["rows"]:
        cfg = ",".join(f"{k}={v}" for k, v in r["best"].items()) if r["best"] else "-"
        ms = f"{r['best_ms']:.3f}" if r["best_ms"] else "-"
        pc = f"{r['best_pct_copy']:.0f}" if r["best_pct_copy"] else "-"
        dm = f"{r['default_ms']:.3f}" if r.get("default_ms") else "-"
        bb = f"{r['best_baseline']} {r['best_baseline_ms']:.3f}" if r["best_baseline"] else "-"
        print(f"{r['op']:13s} {r['shape']:28s} {r['dir']:3s} {cfg:48s} {ms:>7s} {pc:>5s} {dm:>7s} {bb:>20s} "
              f"{'yes' if r['meets_target'] else 'NO':>5s}{' (guard)' if r['guard'] else ''}")
    print("\nlaunch.TABLE entries (openseek_hal/ops/kernels/launch.py; the last row per key wins):")
    for r in results["rows"]:
        if r["best"]:
            print(_table_line(r))
    print(f"\nresults: {args.out / 'memops_sweep.json'}")


if __name__ == "__main__":
    main()
