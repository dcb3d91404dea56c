"""Every attention launch candidate against float64 on the GPU, at small and awkward shapes.

    OPENSEEK_HAL_COMMIT=<sha> python benchmarks/ops/attention_config_check.py OUT_DIR

The interpreter checks the kernels' logic (tests/test_ops_kernels.py), not the GPU compiler's code: this
runs each config of `sweep_configs` (bf16, forward + backward, causal, (B,S,H,D) views) at head dims
(48, 32), (64, 64), (192, 128) and sequence lengths shorter than a block, between blocks and over
several blocks, packed documents included, against the float64 reference; error relative to the
reference's max, bound 3e-2 (bf16 inputs, fp32 accumulation). Writes OUT_DIR/attention_config_check.json
and prints the failures, then a summary line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

BOUND = 3e-2


def _case(dev: torch.device, dqk: int, dv: int, s: int, docs: list[int] | None) -> dict:
    """bf16 q, k, v as (B,H,S,D) views of (B,S,H,D) storage, an upstream gradient, the document bounds."""
    gen = torch.Generator(device=dev).manual_seed(s + dqk)
    b, h = 2, 3

    def make(d: int) -> torch.Tensor:
        return torch.randn(b, s, h, d, device=dev, dtype=torch.bfloat16, generator=gen).transpose(1, 2)

    q, k, v = make(dqk), make(dqk), make(dv)
    return dict(qkv=(q, k, v), grad=torch.randn(b, h, s, dv, device=dev, dtype=torch.bfloat16, generator=gen),
                cu=torch.tensor(docs, device=dev, dtype=torch.int32) if docs else None)


def _grads(fn, case: dict, dtype: torch.dtype) -> list[torch.Tensor]:
    """``[o, dq, dk, dv]`` in float64 of ``fn`` run in ``dtype``."""
    ins = [t.detach().to(dtype).requires_grad_() for t in case["qkv"]]
    o = fn(*ins, None, case["cu"]) if case["cu"] is not None else fn(*ins)
    o.backward(case["grad"].to(dtype))
    return [o.detach().double()] + [t.grad.double() for t in ins]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--vary", choices=("all", "fwd", "kv", "dq"), default="all",
                    help="the default plus only this kernel's alternatives (default: every candidate)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from openseek_hal.ops.attention import causal_attention as reference
    from openseek_hal.ops.kernel_loader import load_kernels
    from openseek_hal.provenance import provenance

    pkg = load_kernels(interpret=False)
    ours = pkg.KERNELS["causal_attention"]
    kernels = pkg.attention_kernels if hasattr(pkg, "attention_kernels") else None
    import sys

    kernels = kernels or sys.modules[ours.__module__]
    dev = torch.device("cuda")
    rows, failures = [], 0
    for dqk, dv in ((48, 32), (64, 64), (192, 128)):
        for s, docs in ((24, None), (100, None), (200, [0, 70, 200, 330, 400])):
            case = _case(dev, dqk, dv, s, docs)
            ref = _grads(reference, case, torch.float64)
            configs = kernels.sweep_configs(dqk, dv)
            base = configs[0]
            if args.vary != "all":
                others = [k for k in ("fwd", "kv", "dq") if k != args.vary]
                configs = [c for c in configs if all(getattr(c, k) == getattr(base, k) for k in others)]
            for cfg in configs:
                with kernels.use_config(cfg):
                    try:
                        got = _grads(ours, case, torch.bfloat16)
                        errs = [float((x - r).abs().max() / r.abs().max().clamp_min(1e-30)) for x, r in zip(got, ref)]
                        err = None
                    except Exception as e:  # a launch that cannot compile here is a finding too
                        errs, err = [], f"{type(e).__name__}: {str(e)[:200]}"
                ok = err is None and max(errs) <= BOUND
                failures += not ok
                rows.append(dict(dqk=dqk, dv=dv, s=s, packed=bool(docs), config=cfg.name, rel_errors=errs,
                                 error=err, ok=ok))
                if not ok:
                    shown = err or [f"{e:.2g}" for e in errs]
                    print(f"FAIL {dqk}/{dv} S{s}{' packed' if docs else ''} {cfg.name}: {shown}", flush=True)
    (args.out / "attention_config_check.json").write_text(json.dumps(
        dict(device=torch.cuda.get_device_name(), provenance=provenance(), bound=BOUND, rows=rows), indent=1))
    print(f"{len(rows) - failures} of {len(rows)} (shape, config) pairs within {BOUND} of float64 "
          f"(o, dq, dk, dv); {failures} failures")


if __name__ == "__main__":
    main()
