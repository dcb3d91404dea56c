"""FP8 on one GPU: numerics of every fp8 op against the float64 reference, a config sweep of the GEMMs against
torch's bf16 GEMMs (same process), and one OpenSeek-Small block's forward+backward with fp8 on and off.

    OPENSEEK_HAL_COMMIT=$(git rev-parse HEAD) python benchmarks/ops/fp8_gpu.py OUT_DIR [--quick]

Writes OUT_DIR/fp8_gpu.json (card, versions, commit via `openseek_hal.provenance`, every number) and prints a
short table last. About 2-3 minutes on an H100 (Triton compiles each config once); the "paths" part times every
layer with the old and new code paths of `kernels.fp8.PATHS` (one at a time and all) in the same process
(``--parts`` picks parts). ``--smoke-cpu`` runs every code path at tiny shapes on ``triton-interpret`` (no GPU;
the numbers mean nothing) to check the script.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path
from typing import Any

import torch

SMOKE = {"on": False}  # --smoke-cpu: every code path at tiny shapes on triton-interpret (no GPU)


def D(n: int) -> int:
    """A dimension of the real run, or a tiny one (not a multiple of 128) in the CPU smoke run."""
    return max(8, n // 24) if SMOKE["on"] else n


def _kernels():
    from openseek_hal.ops.kernel_loader import load_kernels

    return load_kernels(SMOKE["on"]).fp8


def _backend():
    from openseek_hal.backend import get_backend, register_backend
    from openseek_hal.backends.cuda import CUDABackend

    register_backend(CUDABackend)  # entry points may not be installed where this runs
    return get_backend("triton-interpret" if SMOKE["on"] else "cuda")


def _ms(fn) -> float:
    from triton.testing import do_bench

    if SMOKE["on"]:
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)
    fn()
    torch.cuda.synchronize()
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


# -- (a) numerics ---------------------------------------------------------------------------------

def _ratio(got: torch.Tensor, expected: torch.Tensor, terms: torch.Tensor, out_dtype: torch.dtype) -> float:
    """Worst |got - expected| / (output rounding + the documented accumulation bound); <= 1 passes."""
    u_out = {torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24}[out_dtype]
    allowed = u_out * expected.abs() + terms * 2.0 ** -24 + 1e-30
    return float(((got.double() - expected).abs() / allowed).max())


def check_numerics(backend, dev) -> list[dict[str, Any]]:
    from openseek_hal.conformance import SuiteConfig, run_suite
    from openseek_hal.ops import fp8 as ref
    from openseek_hal.ops.bench_cases import expert_counts

    rows: list[dict[str, Any]] = []
    ops = ["fp8_quantize", "fp8_gemm", "fp8_grouped_gemm", "fp8_linear", "fp8_grouped_linear"]
    # the conformance samples (small shapes, ties, subnormals, NaN/Inf, determinism) on the GPU
    suite = run_suite(SuiteConfig(backend=backend.name, levels=("ops",), ops=ops, seed=0))
    for op in ops:
        checks = [c for c in suite.checks if c.op == op]
        bad = [f"{c.sample} {c.check}: {c.message}" for c in checks if c.status not in ("pass", "xfail", "skip")]
        rows.append(dict(check=f"conform {op}", ok=not bad, detail=f"{len(checks)} checks" + (f"; {bad[:2]}"
                                                                                             if bad else "")))
    q = backend.op("fp8_quantize")
    g = torch.Generator(device=dev).manual_seed(0)
    # quantize: bitwise at a real shape (the reference runs in float64 on the GPU)
    for shape, tile in (((8192, 7168), "1x128"), ((7168, 2048), "128x128"), ((4096, 1280), "1x128"),
                        ((1792, 1280), "128x128"), ((1000, 900), "1x128")):
        shape = (D(shape[0]), D(shape[1]))
        x = (torch.randn(*shape, device=dev, generator=g) * 3).to(torch.bfloat16)
        qq, s = q(x, tile)
        qr, sr = ref.fp8_quantize(x, tile)
        same = torch.equal(qq.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr)
        rows.append(dict(check=f"quantize {shape[0]}x{shape[1]} {tile} bitwise", ok=same, detail=""))
    # gemm: within the bound at real shapes
    gemm = backend.op("fp8_gemm")
    for m, n, k, b_tile in ((4096, 4096, 4096, "128x128"), (8192, 1792, 1280, "128x128"), (1280, 896, 8192, "1x128"),
                            (1000, 300, 900, "128x128")):
        m, n, k = D(m), D(n), D(k)
        aq, as_ = q(torch.randn(m, k, device=dev, generator=g).to(torch.bfloat16), "1x128")
        bq, bs = q((torch.randn(n, k, device=dev, generator=g) * k ** -0.5).to(torch.bfloat16), b_tile)
        expected = ref.fp8_gemm(aq, as_.double(), bq, bs.double())
        terms = ref._gemm_error_scale(aq, as_.double(), bq, bs.double())
        r = _ratio(gemm(aq, as_, bq, bs, "bfloat16"), expected, terms, torch.bfloat16)
        r32 = _ratio(gemm(aq, as_, bq, bs, "float32"), expected, terms, torch.float32)
        rows.append(dict(check=f"gemm {m}x{n}x{k} b{b_tile}", ok=max(r, r32) <= 1, detail=f"err/bound bf16 {r:.3g}, "
                         f"fp32 {r32:.3g}"))
    # grouped gemm at OpenSeek-Small's experts (2048 tokens x top-6, 64 experts)
    e = 8 if SMOKE["on"] else 64
    counts = expert_counts(D(2048), 6, e, dev)
    rows_n = int(counts.sum())
    for n, k in ((D(1792), D(1280)), (D(1280), D(896))):
        aq, as_ = q(torch.randn(rows_n, k, device=dev, generator=g).to(torch.bfloat16), "1x128")
        bq, bs = _quant3(torch.randn(e, n, k, device=dev, generator=g) * k ** -0.5)
        expected = ref.fp8_grouped_gemm(aq, as_.double(), bq, bs.double(), counts)
        terms = ref._grouped_gemm_error_scale(aq, as_.double(), bq, bs.double(), counts)
        r = _ratio(backend.op("fp8_grouped_gemm")(aq, as_, bq, bs, counts, "bfloat16"), expected, terms,
                   torch.bfloat16)
        rows.append(dict(check=f"grouped gemm E{e} {rows_n}x{n}x{k}", ok=r <= 1, detail=f"err/bound {r:.3g}"))
    # the layers: forward and both gradients against the float64 reference (same quantization rule)
    for name, x, w, extra in (
            ("linear 4096x1280->1792", torch.randn(D(4096), D(1280), device=dev, generator=g),
             torch.randn(D(1792), D(1280), device=dev, generator=g) * D(1280) ** -0.5, ()),
            ("linear 1000x900->300", torch.randn(D(1000), D(900), device=dev, generator=g),
             torch.randn(D(300), D(900), device=dev, generator=g) * D(900) ** -0.5, ()),
            ("grouped linear E64 2048x6 1280->1792", torch.randn(rows_n, D(1280), device=dev, generator=g),
             torch.randn(e, D(1792), D(1280), device=dev, generator=g) * D(1280) ** -0.5, (counts,))):
        x, w = x.to(torch.bfloat16), w.to(torch.bfloat16)
        op = backend.op("fp8_grouped_linear" if extra else "fp8_linear")
        rfn = ref.fp8_grouped_linear if extra else ref.fp8_linear
        dy = torch.randn(x.shape[0], w.shape[-2], device=dev, generator=g).to(torch.bfloat16)
        got = _fwd_bwd(op, x, w, extra, dy)
        exp = _fwd_bwd(rfn, x.double(), w.double(), extra, dy.double())
        if extra:
            bounds = [ref._grouped_linear_error_scale(x.double(), w.double(), *extra),
                      *ref._grouped_linear_grad_error_scale((x.double(), w.double(), *extra), {}, [dy.double()])[:2]]
        else:
            bounds = [ref._linear_error_scale(x.double(), w.double()),
                      *ref._linear_grad_error_scale((x.double(), w.double()), {}, [dy.double()])]
        ratios = [_ratio(a, b, t, torch.bfloat16) for a, b, t in zip(got, exp, bounds)]
        rows.append(dict(check=name, ok=max(ratios) <= 1, detail="err/bound y {:.3g} dx {:.3g} dw {:.3g}".format(
            *ratios)))
    return rows


def _quant3(w: torch.Tensor):
    """Per-expert 128x128 blocks of ``w[E, N, K]`` (the kernels' batched quantizer; the op takes 2-d)."""
    return _kernels().quantize(w.to(torch.bfloat16), "128x128")


def _fwd_bwd(fn, x, w, extra, dy):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = fn(x, w, *extra)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


# -- (b) config sweep -----------------------------------------------------------------------------

def sweep(backend, dev, quick: bool) -> list[dict[str, Any]]:
    from openseek_hal.ops.bench_cases import expert_counts
    from openseek_hal.ops.grouped import grouped_mm_linear
    k8 = _kernels()
    rows: list[dict[str, Any]] = []
    m = n = k = D(8192)
    a, b = torch.randn(m, k, device=dev).to(torch.bfloat16), (torch.randn(n, k, device=dev) * k ** -0.5).to(
        torch.bfloat16)
    aq, as_ = k8.quantize(a, "1x128")
    bq, bs = k8.quantize(b, "128x128")
    flops = 2 * m * n * k
    bf16_ms = _ms(lambda: torch.matmul(a, b.T))
    rows.append(dict(case=f"gemm {m}^3", impl="torch bf16 matmul", ms=bf16_ms, tflops=flops / bf16_ms / 1e9))
    configs = k8.CONFIGS[:3] if quick else k8.CONFIGS
    for cfg in (None, *configs):
        k8.set_config_override(cfg)
        try:
            ms = _ms(lambda: k8.fp8_gemm(aq, as_, bq, bs, torch.bfloat16))
            rows.append(dict(case=f"gemm {m}^3", impl="fp8 " + ("default " + k8.gemm_config(m, n, k, dev).text()
                                                               if cfg is None else cfg.text()),
                             ms=ms, tflops=flops / ms / 1e9, speedup=bf16_ms / ms))
        except Exception as e:  # a config that does not compile (shared memory) is reported, not fatal
            rows.append(dict(case=f"gemm {m}^3", impl=f"fp8 {cfg.text() if cfg else 'default'}", error=repr(e)[:200]))
        finally:
            k8.set_config_override(None)
    # the quantization cost of the same GEMM's activation (what a training step pays on top)
    qms = _ms(lambda: k8.quantize(a, "1x128"))
    rows.append(dict(case=f"quantize {m}x{k} 1x128", impl="fp8", ms=qms, GBps=3 * m * k / qms / 1e6))
    # grouped: OpenSeek-Small routed experts, 8192 tokens x top-6 over 64 experts
    e = 8 if SMOKE["on"] else 64
    counts = expert_counts(D(8192), 6, e, dev)
    total = int(counts.sum())
    for n_, k_, label in ((D(1792), D(1280), "gate_up"), (D(1280), D(896), "down")):
        x = torch.randn(total, k_, device=dev).to(torch.bfloat16)
        w = (torch.randn(e, n_, k_, device=dev) * k_ ** -0.5).to(torch.bfloat16)
        xq, xs = k8.quantize(x, "1x128")
        wq, ws = k8.quantize(w, "128x128")
        fl = 2 * total * n_ * k_
        base = _ms(lambda: grouped_mm_linear(x, w, counts))  # noqa: B023 (called at once)
        case = f"grouped {label} {D(8192)}x6 E{e} N{n_} K{k_}"
        rows.append(dict(case=case, impl="torch._grouped_mm bf16", ms=base, tflops=fl / base / 1e9))
        for cfg in (None, *configs):
            k8.set_config_override(cfg)
            try:
                ms = _ms(lambda: k8.fp8_grouped_gemm(xq, xs, wq, ws, counts, torch.bfloat16))  # noqa: B023
                rows.append(dict(case=case, impl="fp8 " + ("default" if cfg is None else cfg.text()), ms=ms,
                                 tflops=fl / ms / 1e9, speedup=base / ms))
            except Exception as e:
                rows.append(dict(case=case, impl=f"fp8 {cfg.text() if cfg else 'default'}", error=repr(e)[:200]))
            finally:
                k8.set_config_override(None)
        # the layer, forward+backward (quantization included) vs the bf16 grouped layer
        if label == "gate_up":
            dy = torch.randn(total, n_, device=dev).to(torch.bfloat16)
            for impl, fn in (("torch._grouped_mm bf16 fwd+bwd", grouped_mm_linear),
                             ("fp8_grouped_linear fwd+bwd", k8.fp8_grouped_linear)):
                xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
                ms = _ms(lambda: torch.autograd.grad(fn(xr, wr, counts), (xr, wr), dy))  # noqa: B023
                rows.append(dict(case=f"grouped layer {label}", impl=impl, ms=ms, tflops=3 * fl / ms / 1e9))
    return rows


# -- (c) old vs new code paths (`kernels.fp8.PATHS`), one process ---------------------------------------

OLD = {"weight_cache": False, "fused_quant": False, "kgrouped_split": False, "split_k": False}
VARIANTS = (("old", {}), ("+weight_cache", {"weight_cache": True}), ("+fused_quant", {"fused_quant": True}),
            ("+kgrouped_split", {"kgrouped_split": True}), ("+split_k", {"split_k": True}),
            ("new", {k: True for k in OLD}))


def skewed_counts(rows: int, experts: int, dev, power: float = 1.2) -> torch.Tensor:
    """A skewed routing: expert i gets a share ~ 1/(i+1)^power of ``rows`` (the busiest ~25% at E=64)."""
    w = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** power
    counts = (w / w.sum() * rows).floor().to(torch.int64)
    counts[0] += rows - int(counts.sum())
    return counts.to(torch.int32).to(dev)


def paths_compare(backend, dev) -> list[dict[str, Any]]:
    """Each layer forward+backward at OpenSeek-Small shapes with every path old, one path new at a time, and all
    new; plus the numerics of all-new against all-old (pure refactors bitwise; the split GEMMs within the
    float64 bound)."""
    from openseek_hal.ops import fp8 as ref
    from openseek_hal.ops.bench_cases import expert_counts

    k8 = _kernels()
    rows: list[dict[str, Any]] = []
    g = torch.Generator(device=dev).manual_seed(1)
    tokens, e = D(16384), (8 if SMOKE["on"] else 64)
    cases = []
    for n_out, k_in in ((D(1792), D(1280)), (D(576), D(1280)), (D(1280), D(896))):
        x = torch.randn(tokens, k_in, device=dev, generator=g).to(torch.bfloat16)
        w = (torch.randn(n_out, k_in, device=dev, generator=g) * k_in ** -0.5).to(torch.bfloat16)
        cases.append((f"linear {tokens}x{k_in}->{n_out}", k8.fp8_linear, x, w, ()))
    routed = D(8192) * 6
    for label, counts in (("balanced", expert_counts(D(8192), 6, e, dev)), ("skewed", skewed_counts(routed, e, dev))):
        x = torch.randn(int(counts.sum()), D(1280), device=dev, generator=g).to(torch.bfloat16)
        w = (torch.randn(e, D(1792), D(1280), device=dev, generator=g) * D(1280) ** -0.5).to(torch.bfloat16)
        cases.append((f"grouped E{e} {label} max {int(counts.max())} {D(1280)}->{D(1792)}", k8.fp8_grouped_linear, x, w,
                      (counts,)))
    saved = dict(k8.PATHS)
    try:
        for name, fn, x, w0, extra in cases:
            w = torch.nn.Parameter(w0.clone())
            xr = x.detach().requires_grad_()
            dy = torch.randn(x.shape[0], w.shape[-2], device=dev, generator=g).to(torch.bfloat16)
            outs = {}
            base = None
            for label, flags in VARIANTS:
                k8.set_paths(**{**OLD, **flags})
                k8.clear_weight_cache()

                def run(fn=fn, xr=xr, w=w, extra=extra, dy=dy):
                    return torch.autograd.grad(fn(xr, w, *extra), (xr, w), dy)

                if label in ("old", "new"):
                    y = fn(xr, w, *extra)
                    outs[label] = (y.detach(), *torch.autograd.grad(y, (xr, w), dy))
                ms = _ms(run)
                base = base or ms
                rows.append(dict(case=f"paths {name}", impl=f"fp8 {label}", ms=ms, speedup=base / ms))
            # numerics: y and dx bitwise (weight cache and fused quantization are refactors; split-K changes
            # only dW's summation order), dW within the float64 bound
            same = all(torch.equal(a, b) for a, b in zip(outs["old"][:2], outs["new"][:2]))
            if extra:
                bound = ref._grouped_linear_grad_error_scale((x.double(), w.double(), *extra), {}, [dy.double()])[1]
                exp = _fwd_bwd(ref.fp8_grouped_linear, x.double(), w.double(), extra, dy.double())[2]
            else:
                bound = ref._linear_grad_error_scale((x.double(), w.double()), {}, [dy.double()])[1]
                exp = _fwd_bwd(ref.fp8_linear, x.double(), w.double(), extra, dy.double())[2]
            r = _ratio(outs["new"][2], exp, bound, torch.bfloat16)
            rows.append(dict(check=f"new vs old paths {name}", ok=same and r <= 1,
                             detail=f"y, dx bitwise {same}; dW err/bound {r:.3g}"))
    finally:
        k8.set_paths(**saved)
    return rows


# -- (d) one block's forward + backward -----------------------------------------------------------

def block_step(backend, dev) -> list[dict[str, Any]]:
    """OpenSeek-Small with 2 layers (a dense one and a MoE one), 4 x 4096 tokens, bf16: loss forward+backward
    with fp8 off and on (the embedding/head are included; the full step: benchmarks/train/bench_train.py 1gpu-fp8)."""
    from openseek_hal.models import build_model
    from openseek_hal.models.deepseek_v3 import enable_fp8

    rows = []
    preset, vocab, seq = ("tiny", 4096, 64) if SMOKE["on"] else ("openseek-small", 151872, 4096)
    ids = torch.randint(0, vocab, (4, seq), device=dev)
    k8 = _kernels()
    saved = dict(k8.PATHS)
    for fp8 in (False, "old", True):
        k8.set_paths(**(OLD if fp8 == "old" else saved))
        model = build_model(preset, backend, dtype=torch.bfloat16, seed=0, num_hidden_layers=2,
                            num_nextn_predict_layers=0)
        if fp8:
            enable_fp8(model, backend)

        def step(model=model):
            loss = model.loss(ids[:, :-1], ids[:, 1:])
            loss.total.backward()

        try:
            ms = _ms(step)
            rows.append(dict(case=f"{preset} 2 layers 4x{seq - 1} fwd+bwd", impl=_impl(fp8), ms=ms))
        except Exception as e:
            rows.append(dict(case=f"{preset} 2 layers fwd+bwd", impl=_impl(fp8),
                             error=traceback.format_exception_only(e)[-1][:300]))
        del model
        torch.cuda.empty_cache()
    k8.set_paths(**saved)
    for r in rows[1:]:
        if "ms" in r and "ms" in rows[0]:
            r["speedup"] = rows[0]["ms"] / r["ms"]
    return rows


def _impl(fp8) -> str:
    return {False: "bf16", "old": "fp8 old paths", True: "fp8 new paths"}[fp8]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--quick", action="store_true", help="three configs instead of all")
    ap.add_argument("--smoke-cpu", action="store_true", help="tiny shapes on triton-interpret: checks the script")
    ap.add_argument("--parts", default="numerics,sweep,paths,block",
                    help="comma-separated subset of numerics,sweep,paths,block")
    args = ap.parse_args()
    SMOKE["on"] = args.smoke_cpu
    args.out.mkdir(parents=True, exist_ok=True)
    from openseek_hal.provenance import provenance

    backend = _backend()
    dev = backend.device.torch_device
    started = time.time()
    result: dict[str, Any] = dict(device=backend.capabilities().device_name,
                                  capability=torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None,
                                  fp8_capability=backend.capabilities().fp8, provenance=provenance())
    parts = (("numerics", lambda: check_numerics(backend, dev)), ("sweep", lambda: sweep(backend, dev, args.quick)),
             ("paths", lambda: paths_compare(backend, dev)), ("block", lambda: block_step(backend, dev)))
    wanted = set(args.parts.split(","))
    for key, fn in parts:
        if key not in wanted:
            result[key] = []
            continue
        t = time.time()
        try:
            result[key] = fn()
        except Exception:
            result[key] = [dict(error=traceback.format_exc()[-2000:])]
        result[f"{key}_s"] = round(time.time() - t, 1)
        (args.out / "fp8_gpu.json").write_text(json.dumps(result, indent=1, default=str))
        print(f"{key} done in {result[f'{key}_s']} s", flush=True)
    result["total_s"] = round(time.time() - started, 1)
    (args.out / "fp8_gpu.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"\nFP8 on {result['device']} (torch {torch.__version__}, commit {result['provenance'].get('commit')})")
    for r in result["numerics"] + [r for r in result["paths"] if "check" in r or "ms" not in r]:
        print(f"  {'PASS' if r.get('ok') else 'FAIL'}  {r.get('check', '')}  {r.get('detail', r.get('error', ''))}")
    print(f"  {'case':<40} {'impl':<34} {'ms':>8} {'TFLOP/s':>8} {'vs bf16':>8}")
    for r in result["sweep"] + [r for r in result["paths"] if "ms" in r] + result["block"]:
        if "error" in r:
            print(f"  {r.get('case', ''):<40} {r.get('impl', ''):<34} error: {r['error'][:80]}")
            continue
        tf = f"{r['tflops']:.0f}" if r.get("tflops") else "-"
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        print(f"  {r['case']:<40} {r['impl']:<34} {r['ms']:>8.3f} {tf:>8} {sp:>8}")


if __name__ == "__main__":
    main()
