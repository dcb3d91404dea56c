"""Where an fp8 training step spends its GPU time: torch.profiler over the fp8 layers and a 2-layer model.

    OPENSEEK_HAL_COMMIT=<sha> python benchmarks/ops/fp8_profile.py OUT_DIR

For the dense layer (16384 x 1280 -> 1792), the routed experts' grouped layer (8192 tokens x top-6 over 64
experts, 1280 -> 1792) and openseek-small with 2 layers (4 x 4096 tokens), each forward+backward in bf16
and with fp8 (new code paths, and "fp8-old": every `kernels.fp8.PATHS` path old; the grouped layer with
balanced and skewed routing): the total CUDA time per iteration and the kernels that take it (top 12 by CUDA time).
Writes OUT_DIR/fp8_profile.json (card, versions, commit, command) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ITERS = 5
OLD = {"weight_cache": False, "fused_quant": False, "kgrouped_split": False, "split_k": False}


def _old_paths(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` run with every path of `openseek_hal.ops.kernels.fp8.PATHS` old (the pre-change kernels)."""
    from openseek_hal.ops.kernels import fp8 as k8

    def run() -> None:
        saved = k8.set_paths(**OLD)
        try:
            fn()
        finally:
            k8.set_paths(**saved)
    return run


def _profile(fn: Callable[[], None]) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):  # compile every kernel, warm the allocator
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(ITERS):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        if t is None:
            t = ev.cuda_time_total
        if t > 0:
            rows.append(dict(kernel=ev.key[:110], ms_per_iter=t / 1e3 / ITERS, calls_per_iter=ev.count / ITERS))
    rows.sort(key=lambda r: -r["ms_per_iter"])
    return dict(total_ms_per_iter=sum(r["ms_per_iter"] for r in rows), top=rows[:12])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from openseek_hal.backend import get_backend
    from openseek_hal.models import build_model
    from openseek_hal.models.deepseek_v3 import enable_fp8
    from openseek_hal.provenance import provenance

    backend = get_backend("cuda")
    dev = backend.device.torch_device
    gen = torch.Generator(device=dev).manual_seed(0)
    bf16 = torch.bfloat16
    cases: dict[str, dict[str, Callable[[], None]]] = {}

    x = torch.randn(16384, 1280, device=dev, dtype=bf16, generator=gen, requires_grad=True)
    w = (torch.randn(1792, 1280, device=dev, dtype=bf16, generator=gen) * 0.02).requires_grad_()
    fp8_linear, grouped = backend.op("fp8_linear"), backend.op("grouped_linear")
    fp8_grouped = backend.op("fp8_grouped_linear")
    cases["dense 16384x1280->1792"] = {
        "bf16": lambda: torch.nn.functional.linear(x, w).sum().backward(),
        "fp8": lambda: fp8_linear(x, w).float().sum().backward()}
    xg = torch.randn(8192 * 6, 1280, device=dev, dtype=bf16, generator=gen, requires_grad=True)
    wg = (torch.randn(64, 1792, 1280, device=dev, dtype=bf16, generator=gen) * 0.02).requires_grad_()
    share = 1.0 / torch.arange(1, 65, dtype=torch.float64) ** 1.2  # skewed: expert i ~ 1/(i+1)^1.2
    skewed = (share / share.sum() * 8192 * 6).floor().long()
    skewed[0] += 8192 * 6 - int(skewed.sum())
    for label, counts in (("balanced", torch.full((64,), 8192 * 6 // 64, device=dev, dtype=torch.int64)),
                          ("skewed", skewed.to(dev))):
        cases[f"grouped E64 {label} 49152x1280->1792"] = {
            "bf16": lambda c=counts: grouped(xg, wg, c).float().sum().backward(),
            "fp8": lambda c=counts: fp8_grouped(xg, wg, c).float().sum().backward()}
    ids = torch.randint(0, 151872, (4, 4096), device=dev, generator=gen)
    models = {}
    for mode in ("bf16", "fp8"):
        m = build_model("openseek-small", backend, dtype=bf16, seed=0, num_hidden_layers=2,
                        num_nextn_predict_layers=0)
        if mode == "fp8":
            enable_fp8(m, backend)
        models[mode] = m
    cases["openseek-small 2 layers 4x4095"] = {
        mode: (lambda m=m: m.loss(ids[:, :-1], ids[:, 1:]).total.backward()) for mode, m in models.items()}

    for impls in cases.values():
        impls["fp8-old"] = _old_paths(impls["fp8"])
    result: dict[str, Any] = dict(device=torch.cuda.get_device_name(dev), provenance=provenance(), cases={})
    for name, impls in cases.items():
        result["cases"][name] = {mode: _profile(fn) for mode, fn in impls.items()}
        (args.out / "fp8_profile.json").write_text(json.dumps(result, indent=1))
    for name, modes in result["cases"].items():
        print(f"\n{name}: " + ", ".join(f"{k} {v['total_ms_per_iter']:.3f} ms" for k, v in modes.items()))
        for mode in ("fp8-old", "fp8"):
            for r in modes[mode]["top"]:
                print(f"  {mode:7s} {r['ms_per_iter']:8.3f} ms  x{r['calls_per_iter']:<5g} {r['kernel']}")


if __name__ == "__main__":
    main()
