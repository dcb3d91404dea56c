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
from pathlib import Path

import torch

from openseek_hal.ops.kernels import launch, norm
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


def _configs(kernel: str, n: int) -> list[dict]:
    out = launch.candidates(kernel, n)
    for r, w, p, s in EXTRA:
        cfg = dict(ROWS=r, num_warps=w, per_sm=p, num_stages=s)
        if cfg not in out and not launch._spills(kernel, n, cfg):
            out.append(cfg)
    return out


def _time_graph(fn, reps: int, replays: int = 10) -> float:
    """Microseconds per call of ``fn`` captured ``reps`` times in one graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    results = []
    copy_src = torch.empty(8192 * 1280 * 2, dtype=torch.bfloat16, device=dev)
    copy_dst = torch.empty_like(copy_src)
    copy_us = _time_graph(lambda: copy_dst.copy_(copy_src), args.reps)
    copy_gbs = 2 * copy_src.numel() * 2 / copy_us / 1e3
    for label, kernel, rows, n, stride, has_ds in ROWS:
        base = torch.randn(rows, stride, device=dev, generator=gen).to(torch.bfloat16)
        x = base[:, :n]  # a strided view when stride > n, like the latent
        dy = torch.randn(rows, n, device=dev, generator=gen).to(torch.bfloat16)
        ds = torch.randn(rows, n, device=dev, generator=gen).to(torch.bfloat16) if has_ds else None
        w = (torch.randn(n, device=dev, generator=gen) * 0.1 + 1).to(torch.bfloat16)
        rstd = torch.rsqrt(x.float().pow(2).mean(1) + 1e-6)
        moved = (4 if has_ds else 3) * rows * n * 2  # bytes: x, dy, (ds,) dx
        ref = None
        entries = []
        for cfg in _configs(kernel, n):
            with launch.override(kernel, cfg):
                try:
                    args_ = (dy, ds, x, w, rstd)
                    dx, dw = norm._backward(*args_)
                    us = _time_graph(lambda a=args_: norm._backward(*a), args.reps)
                except Exception as e:  # noqa: BLE001 - a config that fails to compile is reported, not fatal
                    entries.append(dict(config=cfg, error=f"{type(e).__name__}: {e}"[:300]))
                    continue
            if ref is None:
                ref = (dx.float(), dw.float())
            ok = bool(torch.allclose(dx.float(), ref[0], rtol=2e-2, atol=2e-2)
                      and torch.allclose(dw.float(), ref[1], rtol=2e-2, atol=2e-2 * ref[1].abs().max().item()))
            entries.append(dict(config=cfg, us=us, pct_copy=100 * moved / us / 1e3 / copy_gbs, ok=ok))
        timed = sorted((e for e in entries if "us" in e), key=lambda e: e["us"])
        results.append(dict(row=label, kernel=kernel, rows=rows, n=n, stride=stride, bytes=moved,
                            default=entries[0], entries=entries))
        print(f"\n{label} ({kernel}, {moved / 1e6:.0f} MB moved; default {entries[0].get('us', float('nan')):.1f} us)")
        for e in timed[:6]:
            print(f"  {e['us']:7.1f} us  {e['pct_copy']:5.1f}% of copy  ok={e['ok']}  {e['config']}")
        best = next((e for e in timed if e["ok"]), None)
        if best is not None:
            print(f"  TABLE: ({kernel!r}, {n}): dict({', '.join(f'{k}={v}' for k, v in best['config'].items())}),"
                  f"  # {best['us']:.1f} us ({entries[0].get('us', float('nan')):.1f})")
    record = {"provenance": {**provenance(), **cuda_devices()}, "command": " ".join(sys.argv),
              "copy_gbs": copy_gbs, "reps": args.reps, "results": results}
    (args.out / "norm_bwd_sweep.json").write_text(json.dumps(record, indent=1))
    print(f"\ncopy {copy_gbs:.0f} GB/s; wrote {args.out / 'norm_bwd_sweep.json'}")


if __name__ == "__main__":
    main()
