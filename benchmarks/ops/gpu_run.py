"""One GPU session: check every Triton kernel (fwd+bwd vs float64 reference) on the GPU, then benchmark.

Usage (from the repository root, on a CUDA machine):
    python benchmarks/ops/gpu_run.py OUT_DIR [--check OP[,OP...]|all] [--bench OP[,OP...]|all] [--timing graph]
        [--flaggems]
Writes OUT_DIR/check.json and OUT_DIR/bench.json (bench_graph.json with --timing graph); prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


def _backends():
    from openseek_hal.backend import register_backend
    from openseek_hal.backends.cuda import CUDABackend
    from openseek_hal.backends.flaggems import FlagGemsBackend

    # Entry points may not be installed where this runs: register the in-tree classes directly.
    register_backend(CUDABackend)
    register_backend(FlagGemsBackend)
    return CUDABackend, FlagGemsBackend


def _compile_checks(ops: dict) -> dict[str, str]:
    """torch.compile(fullgraph=True) (inductor) must trace each kernel, forward and backward."""
    x = torch.randn(64, 256, device="cuda", requires_grad=True)
    w = torch.ones(256, device="cuda", requires_grad=True)
    t = torch.randint(0, 256, (64,), device="cuda")
    cos, sin = torch.randn(64, 128, device="cuda"), torch.randn(64, 128, device="cuda")
    cases = {
        "rms_norm+cross_entropy": lambda: ops["cross_entropy"](ops["rms_norm"](x, w), t),
        "add_rms_norm": lambda: ops["add_rms_norm"](x, x, w)[0].sum(),
        "silu_and_mul": lambda: ops["silu_and_mul"](x).sum(),
        "rope": lambda: ops["rope"](x, cos, sin, interleaved=True).sum(),
        "moe_route": lambda: ops["moe_route"](x, None, top_k=4, n_group=8, topk_group=2)[1].sum(),
    }
    status = {}
    for name, fn in cases.items():
        try:
            torch._dynamo.reset()
            torch.compile(fn, fullgraph=True)().backward()
            status[name] = "pass"
        except Exception as e:
            status[name] = f"FAIL {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    from openseek_hal.backends.cuda import CUDABackend

    status.update(_attention_compile_checks(ops["causal_attention"], CUDABackend().op("causal_attention")))
    return status


def _attention_compile_checks(attn, selector, device: str = "cuda", backend: str = "inductor",
                               dtype: torch.dtype = torch.bfloat16, dims: tuple[int, ...] = (2, 200, 4, 192, 128),
                               cu: tuple[int, ...] = (0, 37, 130, 200, 201, 400)) -> dict[str, str]:
    """The MLA flash kernel (its torch.library custom ops) under torch.compile(fullgraph=True) with
    inductor, dense and packed (cu_seqlens), on (B,H,S,D) views of (B,S,H,D) bf16 tensors as the model
    calls it, and the cuda backend's selector with packed documents (which must take the flash op):
    the compiled output and gradients must equal the eager ones bit for bit (the same kernels run) and
    keep their layouts (a different one is reported: inductor re-laid the op's inputs out). The
    arguments let it run on the CPU (interpreted kernels, aot_eager) at a small size."""
    b, s, h, dqk, dv = dims
    gen = torch.Generator(device=device).manual_seed(0)
    q, k = (torch.randn(b, s, h, dqk, device=device, generator=gen).to(dtype) for _ in range(2))
    v = torch.randn(b, s, h, dv, device=device, generator=gen).to(dtype)
    do = torch.randn(b, s, h, dv, device=device, generator=gen).to(dtype).transpose(1, 2)
    cu = torch.tensor(cu, dtype=torch.int32, device=device)

    def run(fn, cu_seqlens):
        qq, kk, vv = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
        out = fn(qq, kk, vv, cu_seqlens)
        return (out, *torch.autograd.grad(out, (qq, kk, vv), do))

    def flash(q, k, v, cu_seqlens):
        return attn(q, k, v, 0.1, cu_seqlens=cu_seqlens)

    def selected(q, k, v, cu_seqlens):
        return selector(q, k, v, 0.1, cu_seqlens=cu_seqlens)

    status = {}
    for name, fn, cu_seqlens in (("causal_attention", flash, None), ("causal_attention packed", flash, cu),
                                 ("causal_attention selector packed", selected, cu)):
        try:
            torch._dynamo.reset()
            eager = run(flash, cu_seqlens)  # the flash kernel itself: the selector must pick it for packed calls
            compiled = run(torch.compile(fn, fullgraph=True, backend=backend), cu_seqlens)
            if device == "cuda":
                torch.cuda.synchronize()
            diff = [n for n, a, b in zip(("out", "dq", "dk", "dv"), eager, compiled) if not torch.equal(a, b)]
            layout = [n for n, a, b in zip(("out", "dq", "dk", "dv"), eager, compiled) if a.stride() != b.stride()]
            if diff:
                status[name] = f"FAIL compiled != eager (bitwise) in {diff}"
            else:
                status[name] = "pass" + (f" (other strides than eager: {layout})" if layout else "")
        except Exception as e:
            status[name] = f"FAIL {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    torch._dynamo.reset()
    return status


def check(out: Path, only: list[str] | None) -> list[str]:
    from openseek_hal.ops.kernel_loader import kernel_table
    from openseek_hal.ops.selfcheck import check_op

    cuda_cls, fg_cls = _backends()
    results, lines = [], []
    targets = [("cuda", name, fn) for name, fn in sorted(kernel_table(interpret=False).items())
               if only is None or name in only]
    for backend, name, fn in targets:
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            t0 = time.time()
            try:
                n = check_op(name, fn, dtype, device="cuda")
                status, err = "pass", ""
            except Exception as e:
                n, status, err = 0, "FAIL", f"{type(e).__name__}: {str(e)[:600]}"
            results.append(dict(backend=backend, op=name, dtype=str(dtype), status=status, samples=n,
                                seconds=round(time.time() - t0, 2), error=err))
            if status != "pass":
                lines.append(f"{backend} {name} {dtype}: {err[:300]}")
    compile_status = _compile_checks(kernel_table(interpret=False))
    results += [dict(backend="cuda", op=f"torch.compile(fullgraph) {k}", status=v) for k, v in compile_status.items()]
    (out / "check.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(), results=results), indent=1))
    passed = sum(r["status"] == "pass" for r in results)
    lines.append(f"check: {passed}/{len(results)} pass on {torch.cuda.get_device_name()}; compile: {compile_status}")
    lines += [f"{r['backend']} {r['op']} {r.get('dtype', '')}: {r['status'][:200]}" for r in results
              if r["status"] != "pass"]
    return lines


def check_flaggems(out: Path) -> list[str]:
    """Each FlagGems-native op in its own process: a FlagGems crash must not poison the others' CUDA context."""
    _, fg_cls = _backends()
    ok, reason = fg_cls.is_available()
    if not ok:
        return [f"flaggems unavailable: {reason}"]
    results, lines = [], []
    for name, origin in sorted(fg_cls().op_origins().items()):
        if origin != "flaggems":
            continue
        proc = subprocess.run([sys.executable, __file__, str(out), "--flaggems-one", name],
                              capture_output=True, text=True, env={**os.environ, "CUDA_LAUNCH_BLOCKING": "1"})
        done = [line[len("RESULT "):] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        for line in done:
            results.append(json.loads(line))
            lines.append(f"flaggems {name} {results[-1]['dtype']}: {results[-1]['status']} "
                         f"{results[-1]['error'][:200]}")
        if proc.returncode:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
            results.append(dict(backend="flaggems", op=name, dtype="(crash)", status="FAIL", error=tail[0][:500]))
            lines.append(f"flaggems {name}: process died: {tail[0][:200]}")
    (out / "check_flaggems.json").write_text(json.dumps(results, indent=1))
    return lines


def flaggems_one(spec: str) -> None:
    from openseek_hal.ops.selfcheck import check_op

    _, fg_cls = _backends()
    impl = fg_cls().op(spec)
    for dtype in ("float32", "bfloat16", "float64"):
        try:
            check_op(spec, impl, getattr(torch, dtype), device="cuda")
            status, err = "pass", ""
        except AssertionError as e:
            status, err = "FAIL", str(e)[:500]
        print("RESULT " + json.dumps(dict(backend="flaggems", op=spec, dtype=dtype, status=status, error=err)),
              flush=True)


def bench(out: Path, ops: list[str] | None, timing: str = "events") -> None:
    from openseek_hal.ops import bench as bench_mod
    from openseek_hal.ops import bench_cases

    _backends()
    names = ops or sorted({c.op for c in bench_cases.cases()})
    merged = None
    for op in names:
        t0 = time.time()
        res = bench_mod.run_bench("cuda", op, lambda msg: print("bench", msg, flush=True), timing)
        print(f"  {op}: {time.time() - t0:.0f}s", flush=True)
        if merged is None:
            merged = res
        else:
            merged["rows"] += res["rows"]
            merged.setdefault("errors", []).extend(res.get("errors", []))
            mem = res.get("cross_entropy_extra_peak_bytes", {})
            merged.setdefault("cross_entropy_extra_peak_bytes", {}).update(mem)
        (out / f"bench{'_graph' if timing == 'graph' else ''}.json").write_text(json.dumps(merged, indent=1))
    bench_mod.print_table(merged)
    for err in merged.get("errors", []):
        print(f"no row: {err['op']} {err['shape']}: {err['error']}")
    if "cross_entropy_extra_peak_bytes" in merged:
        print(json.dumps(merged["cross_entropy_extra_peak_bytes"], indent=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--check", default=None, help="OP[,OP...] or all: kernel checks on the GPU")
    parser.add_argument("--bench", default=None)
    parser.add_argument("--timing", choices=("events", "graph"), default="events",
                        help="the bench's timing (openseek-hal bench --timing); graph writes bench_graph.json")
    parser.add_argument("--flaggems", action="store_true", help="check the FlagGems-native ops (last)")
    parser.add_argument("--flaggems-one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flaggems_one:
        return flaggems_one(args.flaggems_one)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = check(args.out, None if args.check == "all" else args.check.split(",")) if args.check else []
    if args.bench:
        bench(args.out, None if args.bench == "all" else args.bench.split(","), args.timing)
    if args.flaggems:
        lines += check_flaggems(args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
