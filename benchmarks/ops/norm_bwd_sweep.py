"""The norm backward kernels at the training step's shapes, timed as the captured step runs them.

    python benchmarks/ops/norm_bwd_sweep.py OUT_DIR [--reps 20]

`openseek-hal bench` and `memops_sweep.py` time one autograd call at a time under ``do_bench``, where a
call of 30-120 us carries its launch and autograd overhead; the trainer captures its step in a CUDA graph,
where only the kernels run. Here each config's backward (`_rms_norm_bwd` then `_sum_partials`, the norm's
whole backward) is captured ``--reps`` times in one CUDA graph and the graph replayed, so the time per call
is device time. Rows: OpenSeek-Small's step (8192 tokens): `add_rms_norm` at hidden 1280 (12 a step), the
key-value latent's `rms_norm` at 512 (its rows 576 apart: a view of the projection; 6 a step) and the first
block's input norm at 1280; and the bench's 16384 x 1280 rows. Configs: `launch.candidates` plus wider
grids (more programs than SMs: more rows in flight, more weight-gradient partials). Each config's
gradients are compared with the default launch's (same arithmetic, other summation order of the weight
gradient). Writes OUT_DIR/norm_bwd_sweep.json (card, versions, commit, command) and prints, per row, the
configs fastest first and the `launch.TABLE` line of the winner.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from openseek_hal.ops.kernel_loader import load_kernels
from openseek_hal.provenance import cuda_devices, provenance

# (label, kernel, rows, n, row stride of the input, residual gradient present)
ROWS = [
    ("step add_rms_norm 8192x1280", "add_rms_norm_bwd", 8192, 1280, 1280, True),
    ("step kv latent rms_norm 8192x512 (stride 576)", "rms_norm_bwd", 8192, 512, 576, False),
    ("step input rms_norm 8192x1280", "rms_norm_bwd", 8192, 1280, 1280, False),
    ("bench add_rms_norm 16384x1280", "add_rms_norm_bwd", 16384, 1280, 1280, True),
    ("bench rms_norm 16384x1280", "rms_norm_bwd", 16384, 1280, 1280, False),
]
# wider grids than the persistent ones: (ROWS, num_warps, per_sm, num_stages)
EXTRA = [(4, 16, 4, 1), (4, 16, 8, 1), (8, 16, 4, 1), (8, 32, 2, 1), (4, 8, 8, 1), (2, 8, 16, 1), (4, 16, 16, 1),
         (8, 16, 8, 1), (2, 4, 16, 1), (1, 4, 16, 1), (4, 16, 4, 2), (2, 8, 8, 2)]


def _configs(launch, kernel: str, n: int, few: bool = False) -> list[dict]:
    """`launch.candidates` then the wider grids of `EXTRA` that fit; ``few``: three of each (the CPU test)."""
    out = launch.candidates(kernel, n)[:3 if few else None]
    extra = [cfg for r, w, p, s in EXTRA if (cfg := dict(ROWS=r, num_warps=w, per_sm=p, num_stages=s)) not in out
             and not launch._spills(kernel, n, cfg)]
    return out + extra[:3 if few else None]


def _time_graph(fn, reps: int) -> float:
    """Microseconds per call of ``fn`` captured ``reps`` times in one graph (`openseek_hal.ops.bench._graph_ms`,
    with one input set, as this sweep always timed: calls in a row may find part of their inputs in L2)."""
    from openseek_hal.ops import bench

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        return 1e3 * bench._graph_ms([fn], stream, min_calls=reps)


def sweep(rows: list[tuple], device: torch.device, timer, reps: int, interpret: bool = False) -> tuple[float, list]:
    """Every row's configs timed by ``timer(fn, reps)`` (microseconds a call): (copy GB/s, results)."""
    pkg = load_kernels(interpret=interpret)
    launch, norm = pkg.launch, pkg.norm
    gen = torch.Generator(device=device).manual_seed(0)
    copy_src = torch.empty(8192 * 1280 * 2, dtype=torch.bfloat16, device=device)
    copy_dst = torch.empty_like(copy_src)
    copy_gbs = 2 * copy_src.numel() * 2 / timer(lambda: copy_dst.copy_(copy_src), reps) / 1e3
    results = []
    for label, kernel, n_rows, n, stride, has_ds in rows:
        base = torch.randn(n_rows, stride, device=device, generator=gen).to(torch.bfloat16)
        x = base[:, :n]  # a strided view when stride > n, like the latent
        dy = torch.randn(n_rows, n, device=device, generator=gen).to(torch.bfloat16)
        ds = torch.randn(n_rows, n, device=device, generator=gen).to(torch.bfloat16) if has_ds else None
        w = (torch.randn(n, device=device, generator=gen) * 0.1 + 1).to(torch.bfloat16)
        rstd = torch.rsqrt(x.float().pow(2).mean(1) + 1e-6)
        moved = (4 if has_ds else 3) * n_rows * n * 2  # bytes: x, dy, (ds,) dx
        ref = None
        entries = []
        for cfg in _configs(launch, kernel, n, few=interpret):
            with launch.override(kernel, cfg):
                try:
                    args_ = (dy, ds, x, w, rstd)
                    dx, dw = norm._backward(*args_)
                    us = timer(lambda a=args_: norm._backward(*a), reps)
                except Exception as e:  # noqa: BLE001 - a config that fails to compile is reported, not fatal
                    entries.append(dict(config=cfg, error=f"{type(e).__name__}: {e}"[:300]))
                    continue
            if ref is None:
                ref = (dx.float(), dw.float())
            ok = bool(torch.allclose(dx.float(), ref[0], rtol=2e-2, atol=2e-2)
                      and torch.allclose(dw.float(), ref[1], rtol=2e-2, atol=2e-2 * ref[1].abs().max().item()))
            entries.append(dict(config=cfg, us=us, pct_copy=100 * moved / us / 1e3 / copy_gbs, ok=ok))
        results.append(dict(row=label, kernel=kernel, rows=n_rows, n=n, stride=stride, bytes=moved,
                            default=entries[0], entries=entries))
    return copy_gbs, results


def table_line(result: dict) -> str | None:
    """The `launch.TABLE` line of the row's fastest config whose gradients agree with the default's."""
    timed = sorted((e for e in result["entries"] if "us" in e and e["ok"]), key=lambda e: e["us"])
    if not timed:
        return None
    best, default = timed[0], result["default"].get("us", float("nan"))
    args = ", ".join(f"{k}={v}" for k, v in best["config"].items())
    return f"({result['kernel']!r}, {result['n']}): dict({args}),  # {best['us']:.1f} us ({default:.1f})"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--interpret", action="store_true", help=argparse.SUPPRESS)  # CPU plumbing test only
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.interpret:  # the test's small rows, timed by a stand-in (no numbers are meaningful)
        device, timer = torch.device("cpu"), _time_calls
        rows = [(label, kernel, 8, n, stride, ds) for label, kernel, _, n, stride, ds in ROWS[:3]]
    else:
        device, timer, rows = torch.device("cuda"), _time_graph, ROWS
    copy_gbs, results = sweep(rows, device, timer, args.reps, interpret=args.interpret)
    for result in results:
        timed = sorted((e for e in result["entries"] if "us" in e), key=lambda e: e["us"])
        print(f"\n{result['row']} ({result['kernel']}, {result['bytes'] / 1e6:.0f} MB moved; "
              f"default {result['default'].get('us', float('nan')):.1f} us)")
        for e in timed[:6]:
            print(f"  {e['us']:7.1f} us  {e['pct_copy']:5.1f}% of copy  ok={e['ok']}  {e['config']}")
        line = table_line(result)
        if line is not None:
            print(f"  TABLE: {line}")
    record = {"provenance": {**provenance(), **cuda_devices()}, "command": " ".join(sys.argv),
              "copy_gbs": copy_gbs, "reps": args.reps, "results": results}
    (args.out / "norm_bwd_sweep.json").write_text(json.dumps(record, indent=1))
    print(f"\ncopy {copy_gbs:.0f} GB/s; wrote {args.out / 'norm_bwd_sweep.json'}")


def _time_calls(fn, reps: int) -> float:
    """Wall-clock microseconds a call (the CPU test's stand-in for `_time_graph`)."""
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) * 1e6 / reps


if __name__ == "__main__":
    main()
