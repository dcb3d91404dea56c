"""Compile the flash-attention kernels for an H100 (sm_90a) without a GPU and print their resource use.

    python benchmarks/ops/attention_sm90_resources.py [bf16|fp16|fp32] ...
    python benchmarks/ops/attention_sm90_resources.py --candidates [DQK DV]   # every sweep candidate

For each head-dim pair, packed or not: the tiles of ``default_config``, shared memory, and from the cubin
(``cuobjdump --dump-resource-usage``, shipped in Triton's wheel) registers per thread and the spill
stack (STACK > 0: registers spilled to local memory) and whether wgmma was used. This is how the GPU
tile sizes were picked; it checks that the kernels build for a real GPU, not how fast they run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from openseek_hal.ops.kernels import attention as A

TARGET = GPUTarget("cuda", 90, 32)
TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_kernel(fn, constexprs: dict, pointers: dict, warps: int, stages: int):
    """Compile one kernel for sm_90; integer arguments as i32, scales as fp32.

    As a launch at the benchmark shapes specializes them: pointers (torch allocations) and every
    integer but the head count (strides, S, head dims: multiples of 16 there) marked divisible by 16.
    Without these hints the loads cannot be vectorized (one 2-byte load, and one 64-bit address in
    registers, per element), and the register counts and spills say nothing about the real kernel."""
    signature = {name: "constexpr" if name in constexprs else pointers.get(name) or
                 ("fp32" if name in ("qk_scale", "sm_scale") else "i32") for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name].startswith("*") or (signature[name] == "i32" and name != "H")}
    return triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs), target=TARGET,
                          options={"num_warps": warps, "num_stages": stages})


def resources(kernel) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    used = " ".join(re.findall(r"REG:\d+|STACK:\d+", out))
    return f"{used} smem={kernel.metadata.shared}" + (" wgmma" if "wgmma" in kernel.asm["ptx"] else "")


def kernels_for(dqk: int, dv: int, varlen: bool, dtype: str, config: A.AttentionConfig | None = None):
    """``(name, kernel, constexprs, pointer types, warps, stages)`` as `causal_attention` launches them
    (with ``config``, else `default_config`), for a sequence that is a multiple of every block."""
    da, db = A.split_head_dim(dqk)
    dvb = A._pad_v(dv)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    c = config or A.default_config(dqk, dv, torch_dtype)
    common = dict(VARLEN=varlen, DA=da, DB=db, DVB=dvb, PREC="ieee" if dtype == "fp32" else "tf32", INTERP_BF16=False,
                  MASK_ROWS=False, MASK_QK=da + db != dqk, MASK_V=dvb != dv)
    p, seg = f"*{dtype}", "*i32" if varlen else "*fp32"
    yield ("fwd", A._attn_fwd, dict(common, BLOCK_M=c.fwd.block_m, BLOCK_N=c.fwd.block_n),
           dict(Q=p, K=p, V=p, OUT=p, LSE="*fp32", SEG=seg), c.fwd.warps, c.fwd.stages)
    yield ("bwd_pre", A._attn_bwd_pre, dict(DVB=dvb, BLOCK_M=64), dict(OUT=p, DO=p, DELTA="*fp32"), 4, 1)
    yield ("bwd_dkdv", A._attn_bwd_dkdv, dict(common, BLOCK_M=c.kv.block_m, BLOCK_N=c.kv.block_n),
           dict(Q=p, K=p, V=p, DO=p, LSE="*fp32", DELTA="*fp32", SEG=seg, SEG_END=seg, DK=p, DV=p),
           c.kv.warps, c.kv.stages)
    yield ("bwd_dq", A._attn_bwd_dq, dict(common, BLOCK_M=c.dq.block_m, BLOCK_N=c.dq.block_n),
           dict(Q=p, K=p, V=p, DO=p, LSE="*fp32", DELTA="*fp32", SEG=seg, DQ=p), c.dq.warps, c.dq.stages)


def main(dtypes: list[str]) -> None:
    for dtype in dtypes:
        for dqk, dv in ((192, 128), (128, 128), (64, 64)):
            for varlen in (False, True):
                for name, fn, consts, pointers, warps, stages in kernels_for(dqk, dv, varlen, dtype):
                    k = compile_kernel(fn, consts, pointers, warps, stages)
                    tiles = {key: consts[key] for key in ("BLOCK_M", "BLOCK_N") if key in consts}
                    print(f"{dtype} qk{dqk} v{dv} {'varlen' if varlen else 'dense '} {name:9s} {tiles} "
                          f"warps={warps} stages={stages}: {resources(k)}", flush=True)


def candidates(dqk: int = 192, dv: int = 128) -> None:
    """Every sweep candidate of the backward kernels at ``dqk``/``dv`` (bf16, dense)."""
    seen = set()
    for config in A.sweep_configs(dqk, dv):
        for name, fn, consts, pointers, warps, stages in kernels_for(dqk, dv, False, "bf16", config):
            key = (name, consts.get("BLOCK_M"), consts.get("BLOCK_N"), warps, stages)
            if key in seen:
                continue
            seen.add(key)
            k = compile_kernel(fn, consts, pointers, warps, stages)
            print(f"bf16 qk{dqk} v{dv} {name:9s} m{key[1]} n{key[2]} warps={warps} stages={stages}: {resources(k)}",
                  flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--candidates"]:
        candidates(*(int(x) for x in sys.argv[2:4]))
    else:
        main(sys.argv[1:] or ["bf16"])
