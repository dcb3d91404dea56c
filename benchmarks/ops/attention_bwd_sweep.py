"""Sweep the MLA flash-attention launch configs on one GPU against torch SDPA and FlexAttention.

Usage (repository root, one CUDA GPU, e.g. an H100; about 3 minutes):
    python benchmarks/ops/attention_bwd_sweep.py OUT_DIR [--no-flex] [--only SUBSTR] [--shapes small,v3]

Shapes: causal, S = 4096, qk head dim 192 / v 128, bf16, on (B,H,S,D) views of (B,S,H,D) tensors
(the model's layout): OpenSeek-Small 4 x 10 heads (16K tokens) and DeepSeek-V3 1 x 128 heads.
For every config of `openseek_hal.ops.kernels.attention.sweep_configs` (the default first, then
each dK/dV, dQ and forward alternative with the others at their default) and for the baselines
(torch SDPA as torch picks it, then its flash / efficient / cuDNN backends forced with
``torch.nn.attention.sdpa_kernel`` where they take the shape, and FlexAttention compiled with a
causal block mask): the median milliseconds (``triton.testing.do_bench``, L2 flushed) of the forward
(no grad), the backward alone (``autograd.grad`` of a kept forward) and forward + backward.

TFLOP/s count the causal work as flash-attn does: ``pairs = B * H * S (S + 1) / 2`` visible
(query, key) pairs, 2 FLOPs per multiply-add; forward ``2 * pairs * (Dqk + Dv)`` (q k^T, P v),
backward ``2 * pairs * (3 Dqk + 2 Dv)`` (q k^T recomputed, dV, dP, dQ, dK),
forward + backward the sum (`openseek_hal.ops.bench_cases.attention_flops`).

Every implementation's output and gradients are checked against SDPA's (torch's choice) in
relative Frobenius norm; above 2e-2 (bf16 rounding gives ~4e-3) the row is flagged BROKEN.

Writes OUT_DIR/attention_bwd_sweep.json (rows, device, versions, commit: see ``provenance``) and
prints one table per shape last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from openseek_hal.ops.bench_cases import attention_flops, flex_attention_baseline  # noqa: E402
from openseek_hal.ops.kernels import attention as flash  # noqa: E402
from openseek_hal.provenance import provenance  # noqa: E402

SHAPES = {"small": ("openseek-small", 4, 10), "v3": ("deepseek-v3", 1, 128)}
S, DQK, DV = 4096, 192, 128
WARMUP_MS, REP_MS = 10, 60
TOLERANCE = 2e-2  # relative Frobenius error vs SDPA that flags a broken config


def _ms(fn: Callable[[], Any]) -> float:
    from triton.testing import do_bench

    fn()  # compile / pick a backend before timing
    torch.cuda.synchronize()
    return float(do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median"))


def _inputs(b: int, h: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(d: int) -> torch.Tensor:
        x = torch.randn(b, S, h, d, device="cuda", generator=g, dtype=torch.float32).to(torch.bfloat16)
        return x.transpose(1, 2).requires_grad_(True)

    q, k, v = randn(DQK), randn(DQK), randn(DV)
    do = torch.randn(b, S, h, DV, device="cuda", generator=g).to(torch.bfloat16).transpose(1, 2)
    return q, k, v, do


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def measure(fn: Callable[..., torch.Tensor], q, k, v, do, scale: float, ctx: Callable[[], Any],
            reference: tuple[torch.Tensor, ...] | None) -> dict[str, Any]:
    """fwd / bwd / fwd+bwd milliseconds of ``fn`` (run inside ``ctx()``), and its errors vs ``reference``."""
    row: dict[str, Any] = {}
    with ctx():
        out = fn(q, k, v, scale)
        grads = torch.autograd.grad(out, (q, k, v), do)
        got = (out.detach(), *grads)
        if reference is not None:
            row["rel_err"] = {n: _rel(g, r) for n, g, r in zip(("out", "dq", "dk", "dv"), got, reference)}
            row["ok"] = max(row["rel_err"].values()) <= TOLERANCE and all(bool(torch.isfinite(g).all()) for g in got)
        del out, grads, got
        with torch.no_grad():
            row["fwd_ms"] = _ms(lambda: fn(q, k, v, scale))
        kept = [fn(q, k, v, scale)]  # a list: the closure holds the graph until it is cleared
        row["bwd_ms"] = _ms(lambda: torch.autograd.grad(kept[0], (q, k, v), do, retain_graph=True))
        kept.clear()
        row["fwd_bwd_ms"] = _ms(lambda: torch.autograd.grad(fn(q, k, v, scale), (q, k, v), do))
    return row


def _sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def _sdpa_backends() -> dict[str, Callable[[], Any]]:
    out: dict[str, Callable[[], Any]] = {"sdpa": contextlib.nullcontext}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return out
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
        backend = getattr(SDPBackend, name, None)
        if backend is not None:
            out[f"sdpa-{name.split('_')[0].lower()}"] = lambda backend=backend: sdpa_kernel([backend])
    return out


def _add_tflops(row: dict[str, Any], flops: dict[str, int]) -> None:
    for key, ms_key in (("fwd", "fwd_ms"), ("bwd", "bwd_ms"), ("fwd+bwd", "fwd_bwd_ms")):
        if row.get(ms_key):
            row.setdefault("TFLOPs", {})[key] = flops[key] / (row[ms_key] * 1e-3) / 1e12


def sweep_shape(label: str, b: int, h: int, use_flex: bool, only: str | None, log: Callable[[str], None]
                ) -> list[dict[str, Any]]:
    q, k, v, do = _inputs(b, h)
    scale = DQK ** -0.5
    fwd_f, bwd_f = attention_flops(b, h, S, DQK, DV)
    flops = {"fwd": fwd_f, "bwd": bwd_f, "fwd+bwd": fwd_f + bwd_f}
    out = _sdpa(q, k, v, scale)
    reference = (out.detach(), *torch.autograd.grad(out, (q, k, v), do))
    del out
    rows: list[dict[str, Any]] = []

    def record(impl: str, fn, ctx, **extra: Any) -> None:
        t0 = time.time()
        try:
            row = measure(fn, q, k, v, do, scale, ctx, reference)
        except Exception as e:  # a backend that rejects the shape, a config that fails to compile/launch
            text = str(e).strip().splitlines()
            row = {"error": f"{type(e).__name__}: {text[0][:300] if text else ''}", "ok": False}
        torch.cuda.empty_cache()
        row.update(shape=f"{label} {b}x{h}x{S} qk{DQK} v{DV} bf16", impl=impl, seconds=round(time.time() - t0, 1),
                   **extra)
        _add_tflops(row, flops)
        rows.append(row)
        tf = row.get("TFLOPs", {})
        log(f"{label} {impl}: " + (row.get("error") or
            f"fwd {row['fwd_ms']:.3f} bwd {row['bwd_ms']:.3f} fwd+bwd {row['fwd_bwd_ms']:.3f} ms "
            f"({tf.get('fwd', 0):.0f}/{tf.get('bwd', 0):.0f}/{tf.get('fwd+bwd', 0):.0f} TFLOP/s) "
            f"max rel err {max(row['rel_err'].values()):.1e}{'' if row['ok'] else ' BROKEN'} [{row['seconds']}s]"))

    for name, ctx in _sdpa_backends().items():
        record(name, _sdpa, ctx)
    if use_flex:
        flex = flex_attention_baseline(compiled=True)
        if flex is not None:
            record("flex", lambda q, k, v, scale: flex(q, k, v, scale), contextlib.nullcontext)
    default = flash.default_config(DQK, DV, torch.bfloat16)
    for config in flash.sweep_configs(DQK, DV):
        if only and not any(part in config.name for part in only.split(",")):
            continue
        record(f"ours {config.name}", flash.causal_attention, lambda config=config: flash.use_config(config),
               config=config.name, default=config == default)
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        sub = [r for r in rows if r["shape"] == shape and "error" not in r]
        base = {r["impl"]: r for r in sub if not r["impl"].startswith("ours")}
        sdpa_best = min((r for r in base.values() if r["impl"].startswith("sdpa") and r.get("ok")),
                        key=lambda r: r["fwd_bwd_ms"], default=None)
        flex = base.get("flex")
        lines.append(f"\n{shape}  (TFLOP/s fwd / bwd / fwd+bwd; x = fwd+bwd speedup)")
        lines.append(f"{'impl':58s} {'fwd ms':>8s} {'bwd ms':>8s} {'f+b ms':>8s} {'TFLOP/s':>15s} "
                     f"{'x best SDPA':>11s} {'x flex':>7s}")
        for r in sorted(sub, key=lambda r: r["fwd_bwd_ms"]):
            tf = r.get("TFLOPs", {})
            vs_sdpa = sdpa_best["fwd_bwd_ms"] / r["fwd_bwd_ms"] if sdpa_best else float("nan")
            vs_flex = flex["fwd_bwd_ms"] / r["fwd_bwd_ms"] if flex else float("nan")
            tag = (" *default" if r.get("default") else "") + ("" if r.get("ok", True) else " BROKEN")
            lines.append(f"{r['impl'][:58]:58s} {r['fwd_ms']:8.3f} {r['bwd_ms']:8.3f} {r['fwd_bwd_ms']:8.3f} "
                         f"{tf.get('fwd', 0):4.0f}/{tf.get('bwd', 0):4.0f}/{tf.get('fwd+bwd', 0):4.0f} "
                         f"{vs_sdpa:11.2f} {vs_flex:7.2f}{tag}")
        for r in rows:
            if r["shape"] == shape and "error" in r:
                lines.append(f"{r['impl'][:58]:58s} ERROR {r['error'][:120]}")
        if sdpa_best:
            lines.append(f"best SDPA path: {sdpa_best['impl']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--no-flex", action="store_true", help="skip compiled FlexAttention (its compile takes ~1 min)")
    parser.add_argument("--only", default=None, help="only our configs whose name contains one of these (comma list)")
    parser.add_argument("--shapes", default="small,v3", help="comma list of: " + ",".join(SHAPES))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attention_bwd_sweep needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    import triton

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "provenance": provenance(), "S": S, "Dqk": DQK, "Dv": DV, "dtype": "bfloat16", "causal": True,
        "flops": "pairs = B*H*S*(S+1)/2; fwd 2*pairs*(Dqk+Dv); bwd 2*pairs*(3*Dqk+2*Dv); fwd+bwd the sum",
        "timing": f"triton.testing.do_bench median, warmup {WARMUP_MS} ms, rep {REP_MS} ms, L2 flushed",
        "tolerance_rel_fro_vs_sdpa": TOLERANCE,
        "default_config": flash.default_config(DQK, DV, torch.bfloat16).name, "rows": []}
    path = args.out / "attention_bwd_sweep.json"
    for key in args.shapes.split(","):
        label, b, h = SHAPES[key]
        result["rows"] += sweep_shape(label, b, h, not args.no_flex, args.only, log)
        path.write_text(json.dumps(result, indent=1))
    result["seconds"] = round(time.time() - t0, 1)
    path.write_text(json.dumps(result, indent=1))
    print(f"\n{result['device']}, torch {result['torch']}, triton {result['triton']}, "
          f"commit {result['provenance'].get('commit')}; {result['seconds']}s; JSON: {path}")
    print(_table(result["rows"]))


if __name__ == "__main__":
    main()
