"""Probe cuBLAS's block-scaled FP8 GEMM (``torch._scaled_mm`` with 1x128 / 128x128 scales) on one GPU.

Usage: python benchmarks/ops/fp8_cublas_probe.py OUT_DIR

Whether `openseek_hal.ops.fp8_select.cublas_fp8_gemm` (our contract passed to cuBLAS) matches the
float64 reference of `fp8_gemm` (error / bound, with tile scales spread over 2^12 so a misplaced scale
shows), and its speed against our Triton FP8 GEMM and the bf16
``torch.matmul`` at 8192^3 and the OpenSeek-Small layer shapes (forward, dx, dW), in one process.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
import triton

from openseek_hal.ops import fp8 as ref
from openseek_hal.ops.fp8_select import cublas_fp8_gemm, exact_check
from openseek_hal.ops.kernels import fp8 as kfp8
from openseek_hal.provenance import provenance


def _tiled(x: torch.Tensor, rows: int, gen: torch.Generator) -> torch.Tensor:
    """``x`` with each (rows x 128) tile multiplied by 2^e, e uniform in -6..6."""
    m, k = x.shape
    e = torch.randint(-6, 7, (-(-m // rows), -(-k // 128)), device=x.device, generator=gen).float()
    f = torch.exp2(e).repeat_interleave(rows, 0)[:m].repeat_interleave(128, 1)[:, :k]
    return x * f


def bench(fn, reps=50):
    return triton.testing.do_bench(fn, warmup=10, rep=reps, return_mode="median")


def time_shape(label, m, n, k, b_tile, gen) -> dict:
    a = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    b = torch.randn(n, k, device="cuda", generator=gen).bfloat16()
    a_q, a_s = kfp8.quantize(a, "1x128")
    b_q, b_s = kfp8.quantize(b, b_tile)
    row = {"shape": label, "m": m, "n": n, "k": k, "b_tile": b_tile}
    row["bf16_ms"] = bench(lambda: a @ b.t())
    row["triton_fp8_ms"] = bench(lambda: kfp8.fp8_gemm(a_q, a_s, b_q, b_s))
    try:
        row["cublas_fp8_ms"] = bench(lambda: cublas_fp8_gemm(a_q, a_s, b_q, b_s))
    except Exception as exc:  # noqa: BLE001 - a probe: record why
        row["cublas_fp8_error"] = f"{type(exc).__name__}: {exc}"[:300]
    flops = 2 * m * n * k
    row["tflops"] = {key: flops / (v * 1e-3) / 1e12 for key, v in row.items() if "_ms" in key}
    return row


def main() -> None:
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    result = {"provenance": provenance(), "cublas": torch.backends.cuda.preferred_blas_library().name,
              "cuda": torch.version.cuda, "layouts": {}, "timings": []}
    gen = torch.Generator(device=dev).manual_seed(0)

    # 1. numerics of the adaptor with scales that differ by up to 2^12 from tile to tile (a scale read
    # from the wrong place shows), at the layer shapes (K/128 not a multiple of 4 included)
    for m, n, k, b_tile in [(512, 384, 640, "128x128"), (200, 1792, 1280, "128x128"), (2048, 1280, 1792, "128x128"),
                            (576, 1280, 8192, "1x128"), (1792, 1280, 384, "1x128")]:
        a = _tiled(torch.randn(m, k, device=dev, generator=gen), 1, gen)
        b = _tiled(torch.randn(n, k, device=dev, generator=gen), 128 if b_tile == "128x128" else 1, gen)
        a_q, a_s = kfp8.quantize(a.bfloat16(), "1x128")
        b_q, b_s = kfp8.quantize(b.bfloat16(), b_tile)
        want = ref.fp8_gemm(a_q.cpu(), a_s.cpu().double(), b_q.cpu(), b_s.cpu().double())
        # conformance's bound: the error scale in units of float32 roundoff (2^-24)
        bound = ref._gemm_error_scale(a_q.cpu(), a_s.cpu().double(), b_q.cpu(), b_s.cpu().double()) * 2.0 ** -24
        key = f"{m}x{n}x{k} b {b_tile}"
        row = {}
        for name, fn in (("cublas", cublas_fp8_gemm), ("triton", kfp8.fp8_gemm)):
            try:
                got = fn(a_q, a_s, b_q, b_s, torch.float32).double().cpu()
                row[name] = ((got - want).abs() / bound).max().item()
            except Exception as exc:  # noqa: BLE001 - a probe: record why
                row[name] = f"{type(exc).__name__}: {exc}"[:300]
        for out_dtype in (torch.bfloat16, torch.float32):
            try:
                exact_check(cublas_fp8_gemm, m, n, k, b_tile, out_dtype, dev)
                row[f"cublas exact check {out_dtype}"] = "pass"
            except Exception as exc:  # noqa: BLE001 - a probe: record why
                row[f"cublas exact check {out_dtype}"] = f"{type(exc).__name__}: {exc}"[:300]
        result["layouts"][key] = row
        print(key, "error / bound:", row, flush=True)

    # 2. speed: (label, M, N, K, b tile)
    shapes = [("8192^3", 8192, 8192, 8192, "128x128"),
              ("fwd 16384x1280->1792", 16384, 1792, 1280, "128x128"),
              ("fwd 16384x1280->576", 16384, 576, 1280, "128x128"),
              ("fwd 16384x896->1280", 16384, 1280, 896, "128x128"),
              ("dx 16384x1792->1280", 16384, 1280, 1792, "128x128"),
              ("dW 1792x1280 over 16384", 1792, 1280, 16384, "1x128"),
              ("dW 576x1280 over 16384", 576, 1280, 16384, "1x128"),
              ("dW 1280x896 over 16384", 1280, 896, 16384, "1x128")]
    for label, m, n, k, b_tile in shapes:
        row = time_shape(label, m, n, k, b_tile, gen)
        result["timings"].append(row)
        print(json.dumps(row), flush=True)

    (out_dir / "fp8_cublas_probe.json").write_text(json.dumps(result, indent=2))
    print("\n| shape | bf16 TFLOP/s | triton fp8 | cublas fp8 |")
    for row in result["timings"]:
        t = row["tflops"]
        print(f"| {row['shape']} | {t['bf16_ms']:.0f} | {t['triton_fp8_ms']:.0f} | {t.get('cublas_fp8_ms', 0):.0f} |")


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        raise
