"""Compile the FP8 kernels for sm_90 (H100/H200) without a GPU and print registers, spills, shared memory
and whether the GEMMs use wgmma, for every config `openseek_hal.ops.kernels.fp8.CONFIGS` lists.

    python benchmarks/ops/fp8_sm90_resources.py

Uses the installed Triton's ptxas/cuobjdump (`attention_sm90_resources` has the helpers).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("attention_sm90_resources", _HERE / "attention_sm90_resources.py")
R = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = R
_spec.loader.exec_module(R)

import triton  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from openseek_hal.ops.kernels import fp8 as F  # noqa: E402

FP8, F32 = "*fp8e4nv", "*fp32"
# What Triton's launcher specializes at a real launch on contiguous operands with K % 16 == 0: unit
# strides become the constant 1, pointers and multiples of 16 get ``tt.divisibility = 16``. Without
# this the compile has no vectorized, pipelined loads (one stage of shared memory, heavy spills).
UNIT = ("stride_ak", "stride_bk", "stride_cn", "stride_ask", "stride_bsk", "stride_qk", "stride_xk")
DIV16 = ("M", "N", "K", "stride_tk", "stride_ps", "stride_pm",
         "stride_am", "stride_bn", "stride_cm", "stride_be", "stride_ce", "stride_xm", "stride_qm")


def compile_kernel(fn, constexprs: dict, pointers: dict, warps: int, stages: int):
    consts = dict(constexprs, **{n: 1 for n in UNIT if n in fn.arg_names})
    signature = {n: "constexpr" if n in consts else pointers.get(n) or "i32" for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names
             if n not in consts and (n in pointers or n in DIV16)}
    return triton.compile(ASTSource(fn, signature, constexprs=consts, attrs=attrs), target=R.TARGET,
                          options={"num_warps": warps, "num_stages": stages})


def kernels_for(cfg: F.GemmConfig, out: str = "*bf16"):
    """``(name, kernel, constexprs, pointer types, warps, stages)`` as the launchers call them (K % 128 == 0)."""
    common = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=128, RNE_BF16=False, INTERP=False)
    gemm = dict(A=FP8, AS=F32, B=FP8, BS=F32, C=out)
    yield ("gemm", F._gemm_kernel, dict(common, B_ROW_SCALE=False, MASK_K=False, GROUP_M=cfg.group_m), gemm,
           cfg.num_warps, cfg.num_stages)
    yield ("gemm_rowscale", F._gemm_kernel, dict(common, B_ROW_SCALE=True, MASK_K=True, GROUP_M=cfg.group_m), gemm,
           cfg.num_warps, cfg.num_stages)
    grouped = dict(common, MASK_K=False, BLOCK_E=64, BLOCK_N=min(cfg.block_n, 128))
    yield ("grouped", F._grouped_gemm_kernel, grouped, dict(gemm, TILE_END="*i32", ROW_END="*i32"), cfg.num_warps,
           cfg.num_stages)
    yield ("kgrouped", F._kgrouped_gemm_kernel, common, dict(gemm, ROW_END="*i32"), cfg.num_warps, cfg.num_stages)
    # the new paths (`F.PATHS`): the split K-grouped weight gradient (its unmasked interior loop pipelines:
    # 4 stages of shared memory where the old kernel had one) and the dense split-K
    yield ("kgrouped_split", F._kgrouped_split_kernel, dict(common, BLOCK_E=64),
           dict(gemm, P=F32, ROW_END="*i32", CHUNK_END="*i32", SLOT_START="*i32"), cfg.num_warps, cfg.num_stages)
    splitk = {k: v for k, v in common.items() if k != "RNE_BF16"}
    yield ("gemm_splitk", F._gemm_splitk_kernel, dict(splitk, B_ROW_SCALE=True, MASK_K=True, GROUP_M=cfg.group_m),
           dict(gemm, P=F32), cfg.num_warps, cfg.num_stages)


def quant_kernels():
    for tile_m, rows, warps in ((1, 32, 4), (128, 128, 8)):
        yield (f"quant{tile_m}x128", F._quant_kernel, dict(TILE_M=tile_m, ROWS=rows, BLOCK_K=128),
               dict(X="*bf16", Q="*u8", S=F32), warps, 1)
    for name, fn in (("quant_dual", F._quant_dual_kernel), ("quant_wt", F._quant_wt_kernel)):
        yield (name, fn, dict(BLOCK=128), dict(X="*bf16", Q="*u8", S=F32, QT="*u8", ST=F32), 8, 1)
    yield ("splitk_reduce", F._splitk_reduce_kernel, dict(GROUPED=True, BLOCK=F.REDUCE_BLOCK, RNE_BF16=False),
           dict(P=F32, C="*bf16", CHUNK_END="*i32", SLOT_START="*i32"), 4, 1)


def main() -> None:
    for name, fn, consts, pointers, warps, stages in quant_kernels():
        print(f"{name:14s} warps={warps}: {R.resources(compile_kernel(fn, consts, pointers, warps, stages))}")
    for cfg in F.CONFIGS:
        for name, fn, consts, pointers, warps, stages in kernels_for(cfg):
            k = compile_kernel(fn, consts, pointers, warps, stages)
            print(f"{cfg.text():22s} {name:14s}: {R.resources(k)}", flush=True)


if __name__ == "__main__":
    main()
