"""GPU check: `grouped_linear` on the ``cuda`` backend (``torch._grouped_mm``) with rows past ``sum(counts)``.

The expert-parallel ``allgather`` dispatch hands the experts a buffer whose used length is known on the
device only. The op's contract (`openseek_hal.ops.grouped`): rows past the counts add nothing to the
weight's gradient; their output and input-gradient rows are unspecified. This script checks the first
part against the reference on the used rows, at OpenSeek-Small's expert shapes, and reports what the
grouped GEMM leaves in the unspecified rows (informational). Writes ``OUT/grouped_tail_check.json``.

    python benchmarks/ops/grouped_tail_check.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from openseek_hal.ops.grouped import grouped_linear, grouped_mm_linear
from openseek_hal.provenance import cuda_devices, provenance


def check(experts: int, used_rows: int, tail: int, k: int, m: int, seed: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    picks = torch.randint(0, experts, (used_rows,), device="cuda", generator=gen)
    counts = torch.bincount(picks, minlength=experts)
    x = torch.randn(used_rows + tail, k, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(experts, m, k, device="cuda", generator=gen) * k ** -0.5).bfloat16()
    g = torch.randn(used_rows + tail, m, device="cuda", generator=gen).bfloat16()
    a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = grouped_mm_linear(a, b, counts)
    y.backward(g)
    ra, rb = x[:used_rows].double().requires_grad_(), w.double().requires_grad_()
    ry = grouped_linear(ra, rb, counts)
    ry.backward(g[:used_rows].double())

    def rel(got: torch.Tensor, ref: torch.Tensor) -> float:  # norm-wise; absolute where the reference is 0
        scale = float(ref.norm())
        return float((got.double() - ref).norm()) / (scale if scale > 0 else 1.0)

    row = {"experts": experts, "used_rows": used_rows, "tail_rows": tail, "k": k, "m": m,
           "y_rel": rel(y[:used_rows], ry), "dx_rel": rel(a.grad[:used_rows], ra.grad),
           "dw_rel": rel(b.grad, rb.grad),
           "tail_y_nonzero": int((y[used_rows:] != 0).sum()),
           "tail_y_nonfinite": int((~y[used_rows:].isfinite()).sum()),
           "tail_dx_nonfinite": int((~a.grad[used_rows:].isfinite()).sum())}
    # bf16 operands, fp32 accumulation: relative error a few bf16 roundings (2^-8) at most, norm-wise
    row["ok"] = max(row["y_rel"], row["dx_rel"], row["dw_rel"]) < 2 ** -6
    return row


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    rows = [check(32, 49152, 49152, 1280, 1792, 0), check(32, 49152, 49152, 896, 1280, 1),
            check(64, 1000, 3, 128, 256, 2), check(8, 0, 64, 128, 128, 3)]
    result = {**provenance(), **cuda_devices(), "command": " ".join(sys.argv), "rows": rows}
    (out / "grouped_tail_check.json").write_text(json.dumps(result, indent=1))
    for r in rows:
        print(json.dumps(r))
    print("grouped tail check:", "PASS" if all(r["ok"] for r in rows) else "FAIL")


if __name__ == "__main__":
    main()
