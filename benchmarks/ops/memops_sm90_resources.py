"""Compile every launch candidate of the memops kernels for an H100 (sm_90a) without a GPU; print registers and spills.

    python benchmarks/ops/memops_sm90_resources.py [KERNEL ...]

For each row of ``memops_sweep.py`` (op, row length) and each config of `launch.candidates`, the op
runs once under the Triton interpreter at 2 rows of the real width with the config forced, its
kernel launches are recorded, and each launched kernel is compiled for sm_90 with the recorded
argument types and constexprs (the installed Triton; ptxas and cuobjdump ship in its wheel). Prints
registers per thread and the spill stack (STACK > 0: spilled to local memory). It checks that every
candidate builds for a real GPU and which ones spill, not how fast they run.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
          torch.int64: "i64", torch.int32: "i32", torch.bool: "i1", torch.uint8: "u8", torch.int8: "i8",
          torch.float8_e4m3fn: "fp8e4nv", torch.float8_e5m2: "fp8e5"}


def compile_launch(name: str, module: str, args: tuple, kwargs: dict):
    """Compile one recorded interpreted launch's kernel (its compiled twin) for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(module.replace("_kernels_interpreted", "kernels")), name)
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(fn.arg_names, args)) | {k: v for k, v in kwargs.items() if k not in options}
    # the interpreter-only switches (INTERP, INTERP_BF16: emulate on the CPU what the GPU does) are off on a GPU
    values |= {k: False for k in values if k.startswith("INTERP")}
    signature, constexprs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        value = values[arg]
        if i in fn.constexprs or value is None:
            signature[arg], constexprs[arg] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[arg] = "*" + _TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[arg] = "i1"
        elif isinstance(value, int):
            signature[arg] = "i32" if -2**31 <= value < 2**31 else "i64"
        else:
            signature[arg] = "fp32"
    return triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                          options=options)


def record_launches(fn) -> list:
    """Run ``fn()`` with every interpreted launch recorded as ``(kernel name, module, args, kwargs)``."""
    from openseek_hal.ops import kernel_loader

    seen: list = []
    original = kernel_loader._InterpretedKernel.__getitem__

    def getitem(self, grid):
        run = original(self, grid)

        def recording(*args, **kwargs):
            seen.append((self.fn.fn.__name__, self.fn.fn.__module__, args, kwargs))
            return run(*args, **kwargs)
        return recording

    kernel_loader._InterpretedKernel.__getitem__ = getitem
    try:
        fn()
    finally:
        kernel_loader._InterpretedKernel.__getitem__ = original
    return seen


def _run_op(pkg, op: str, n: int, direction: str) -> None:
    torch.manual_seed(0)
    if op in ("rms_norm", "add_rms_norm"):
        args = [torch.randn(2, n, dtype=torch.bfloat16) for _ in range(2 if op == "add_rms_norm" else 1)]
        args.append(torch.ones(n, dtype=torch.bfloat16))
    elif op == "silu_and_mul":
        args = [torch.randn(2, 2 * n, dtype=torch.bfloat16)]
    elif op == "rope":  # (batch, heads, seq, dim) with tables (seq, dim / 2); rows and heads a program are
        # capped at the sequence and the head count: enough of both for every candidate's own block
        args = [torch.randn(1, 8, 128, n, dtype=torch.bfloat16), torch.randn(128, n // 2), torch.randn(128, n // 2)]
    else:
        args = [torch.randn(2, n), None]
    args = [a.requires_grad_() if a is not None and a.is_floating_point() and i == 0 or
            (a is not None and op.endswith("rms_norm")) else a for i, a in enumerate(args)]
    kwargs = dict(top_k=8 if n > 64 else 6, n_group=8 if n > 64 else 1, topk_group=4 if n > 64 else 1,
                  routed_scaling_factor=2.5) if op == "moe_route" else {}
    outs = [o for o in torch.utils._pytree.tree_leaves(pkg.KERNELS[op](*args, **kwargs))
            if isinstance(o, torch.Tensor) and o.requires_grad]
    if direction == "bwd":
        torch.autograd.grad(outs, [a for a in args if a is not None and a.requires_grad],
                            [torch.ones_like(o) for o in outs])


def main(only: list[str]) -> None:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from openseek_hal.ops.kernel_loader import load_kernels

    resources = _load("attention_sm90_resources").resources
    sweep = _load("memops_sweep")
    pkg = load_kernels(interpret=True)
    done = set()
    for op, _, direction, kernel, n in sweep.ROWS:
        if (only and kernel not in only) or (kernel, n) in done:
            continue
        done.add((kernel, n))
        for cfg in pkg.launch.candidates(kernel, n):
            with pkg.launch.override(kernel, cfg):
                seen = record_launches(functools.partial(_run_op, pkg, op, n, direction))
            wanted = {"fwd": ("_rms_norm_fwd", "_silu_and_mul_fwd", "_rope_kernel"),
                      "bwd": ("_rms_norm_bwd", "_silu_and_mul_bwd", "_route_bwd", "_rope_kernel")}[direction]
            for name, module, args, kwargs in seen:
                if name in wanted:
                    try:
                        used = resources(compile_launch(name, module, args, kwargs))
                    except Exception as e:  # a config that does not build is reported, not fatal
                        used = f"FAILED {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                    cfg_text = ",".join(f"{k}={v}" for k, v in cfg.items())
                    print(f"{kernel:18s} n={n:<5d} {cfg_text:44s} {used}", flush=True)
                    break


if __name__ == "__main__":
    main(sys.argv[1:])
