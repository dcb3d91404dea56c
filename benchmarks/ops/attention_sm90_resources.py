"""Compile the flash-attention kernels for an H100 (sm_90a) without a GPU and print their resource use.

    python benchmarks/ops/attention_sm90_resources.py [bf16|fp16|fp32] ...

For each head-dim pair, packed or not: the tiles of ``_config``, shared memory, and from the cubin
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

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from openseek_hal.ops.kernels import attention as A

TARGET = GPUTarget("cuda", 90, 32)
TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_kernel(fn, constexprs: dict, pointers: dict, warps: int, stages: int):
    """Compile one kernel for sm_90; integer arguments as i32, scales as fp32."""
    signature = {name: "constexpr" if name in constexprs else pointers.get(name) or
                 ("fp32" if name in ("qk_scale", "sm_scale") else "i32") for name in fn.arg_names}
    return triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=TARGET,
                          options={"num_warps": warps, "num_stages": stages})


def resources(kernel) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    used = " ".join(re.findall(r"REG:\d+|STACK:\d+", out))
    return f"{used} smem={kernel.metadata.shared}" + (" wgmma" if "wgmma" in kernel.asm["ptx"] else "")


def kernels_for(dqk: int, dv: int, varlen: bool, dtype: str):
    """``(name, kernel, constexprs, pointer types, warps, stages)`` as `causal_attention` launches them."""
    da, db = A.split_head_dim(dqk)
    dvb = max(16, triton.next_power_of_2(dv))
    c = A._config(dqk, dv, interpreted=False, fp32=dtype == "fp32")
    common = dict(VARLEN=varlen, DA=da, DB=db, DVB=dvb, PREC="ieee" if dtype == "fp32" else "tf32", INTERP_BF16=False)
    p, seg = f"*{dtype}", "*i32" if varlen else "*fp32"
    yield ("fwd", A._attn_fwd, dict(common, BLOCK_M=c["fwd_m"], BLOCK_N=c["fwd_n"]),
           dict(Q=p, K=p, V=p, OUT=p, LSE="*fp32", SEG=seg), c["fwd_warps"], c["fwd_stages"])
    yield ("bwd_pre", A._attn_bwd_pre, dict(DVB=dvb, BLOCK_M=64), dict(OUT=p, DO=p, DELTA="*fp32"), 4, 1)
    yield ("bwd_dkdv", A._attn_bwd_dkdv, dict(common, BLOCK_M=c["kv_m"], BLOCK_N=c["kv_n"]),
           dict(Q=p, K=p, V=p, DO=p, LSE="*fp32", DELTA="*fp32", SEG=seg, SEG_END=seg, DK=p, DV=p),
           c["kv_warps"], c["kv_stages"])
    yield ("bwd_dq", A._attn_bwd_dq, dict(common, BLOCK_M=c["dq_m"], BLOCK_N=c["dq_n"]),
           dict(Q=p, K=p, V=p, DO=p, LSE="*fp32", DELTA="*fp32", SEG=seg, DQ=p), c["dq_warps"], c["dq_stages"])


def main(dtypes: list[str]) -> None:
    for dtype in dtypes:
        for dqk, dv in ((192, 128), (128, 128), (64, 64)):
            for varlen in (False, True):
                for name, fn, consts, pointers, warps, stages in kernels_for(dqk, dv, varlen, dtype):
                    k = compile_kernel(fn, consts, pointers, warps, stages)
                    tiles = {key: consts[key] for key in ("BLOCK_M", "BLOCK_N") if key in consts}
                    print(f"{dtype} qk{dqk} v{dv} {'varlen' if varlen else 'dense '} {name:9s} {tiles} "
                          f"warps={warps} stages={stages}: {resources(k)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["bf16"])
