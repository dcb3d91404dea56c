"""Probe cuBLAS's block-scaled FP8 GEMM (``torch._scaled_mm`` with 1x128 / 128x128 scales) on one GPU.

Usage: python benchmarks/ops/fp8_cublas_probe.py OUT_DIR

Which scale layouts torch accepts, whether the result matches the float64 reference of our
`fp8_gemm` contract (error / bound), and its speed against our Triton FP8 GEMM and the bf16
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
from openseek_hal.ops.kernels import fp8 as kfp8
from openseek_hal.provenance import provenance


def variants(a_scale, b_scale, b_block):
    """Candidate layouts of the scales for torch._scaled_mm (a: [M, KB]; b: [NB or N, KB])."""
    a_outer = a_scale.t().contiguous().t()
    out = {
        "a outer-major, b^T contiguous": (a_outer, b_scale.t().contiguous()),
        "a outer-major, b^T view": (a_outer, b_scale.t()),
        "a contiguous, b^T contiguous": (a_scale, b_scale.t().contiguous()),
        "a contiguous, b^T view": (a_scale, b_scale.t()),
    }
    return out


def cublas(a_q, a_s, b_q, b_s, out_dtype=torch.bfloat16):
    return torch._scaled_mm(a_q, b_q.t(), scale_a=a_s, scale_b=b_s, out_dtype=out_dtype)


def bench(fn, reps=50):
    return triton.testing.do_bench(fn, warmup=10, rep=reps, return_mode="median")


def time_shape(label, m, n, k, b_tile, gen, layouts) -> dict:
    a = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    b = torch.randn(n, k, device="cuda", generator=gen).bfloat16()
    a_q, a_s = kfp8.quantize(a, "1x128")
    b_q, b_s = kfp8.quantize(b, b_tile)
    row = {"shape": label, "m": m, "n": n, "k": k, "b_tile": b_tile}
    row["bf16_ms"] = bench(lambda: a @ b.t())
    row["triton_fp8_ms"] = bench(lambda: kfp8.fp8_gemm(a_q, a_s, b_q, b_s))
    for name, (sa, sb) in variants(a_s, b_s, b_tile).items():
        if not layouts.get(f"b {b_tile}: {name}", {}).get("ok"):
            continue
        try:
            row[f"cublas_fp8_ms[{name}]"] = bench(lambda sa=sa, sb=sb: cublas(a_q, sa, b_q, sb))
        except Exception as exc:  # noqa: BLE001 - a probe: record why
            row[f"cublas_fp8_error[{name}]"] = f"{type(exc).__name__}: {exc}"[:300]
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

    # 1. layouts and numerics at a small shape, both recipes
    m, n, k = 512, 384, 640
    a = torch.randn(m, k, device=dev, generator=gen).bfloat16()
    b = torch.randn(n, k, device=dev, generator=gen).bfloat16()
    a_q, a_s = kfp8.quantize(a, "1x128")
    for b_tile in ("128x128", "1x128"):
        b_q, b_s = kfp8.quantize(b, b_tile)
        want = ref.fp8_gemm(a_q.cpu(), a_s.cpu().double(), b_q.cpu(), b_s.cpu().double())
        bound = ref._gemm_error_scale(a_q.cpu(), a_s.cpu().double(), b_q.cpu(), b_s.cpu().double())
        for name, (sa, sb) in variants(a_s, b_s, b_tile).items():
            key = f"b {b_tile}: {name}"
            try:
                got = cublas(a_q, sa, b_q, sb).double().cpu()
                err = ((got - want).abs() / bound).max().item()
                result["layouts"][key] = {"ok": True, "error_over_bound": err}
            except Exception as exc:  # noqa: BLE001 - a probe: record why a layout is refused
                result["layouts"][key] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:400]}
            print(key, result["layouts"][key], flush=True)
        triton_got = kfp8.fp8_gemm(a_q, a_s, b_q, b_s).double().cpu()
        print(f"b {b_tile}: triton error/bound", ((triton_got - want).abs() / bound).max().item(), flush=True)

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
        row = time_shape(label, m, n, k, b_tile, gen, result["layouts"])
        result["timings"].append(row)
        print(json.dumps(row), flush=True)

    (out_dir / "fp8_cublas_probe.json").write_text(json.dumps(result, indent=2))
    print("\n| shape | bf16 TFLOP/s | triton fp8 | cublas fp8 (best layout) |")
    for row in result["timings"]:
        t = row["tflops"]
        cub = max((v for key, v in t.items() if key.startswith("cublas")), default=float("nan"))
        print(f"| {row['shape']} | {t['bf16_ms']:.0f} | {t['triton_fp8_ms']:.0f} | {cub:.0f} |")


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        raise
