"""Cross entropy over the output head's logits on one GPU: launch configs, and the loss and its gradient in
one kernel (``GRAD``) against the forward and backward kernels run one after the other.

    python benchmarks/ops/ce_sweep.py OUT_DIR [--rows 8192] [--vocab 151872,129280]

For each vocabulary: forward, backward and both at the launch used before this sweep (marked "before":
4096 x 16 warps for both kernels); every (BLOCK, num_warps) of the forward, the backward and the fused
kernel; a plain copy of the logits (bandwidth reference). Times are
``triton.testing.do_bench`` medians (L2 flushed between calls). The fused kernel's gradient is checked
against the two-kernel path's (same arithmetic, so equal up to exp's rounding). Writes
OUT_DIR/ce_sweep.json (card, versions, commit, command) and prints a table, best first.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
import triton

from openseek_hal.ops.kernels import cross_entropy as ce
from openseek_hal.ops.kernels._common import acc_type
from openseek_hal.provenance import cuda_devices, provenance

BLOCKS = (2048, 4096, 8192)
WARPS = (4, 8, 16)


def _launch(kind: str, x: torch.Tensor, t: torch.Tensor, bufs: dict, block: int, warps: int) -> None:
    rows, n = x.shape
    acc = acc_type(x.dtype)
    if kind == "bwd":
        ce._ce_bwd[(rows,)](x, t, bufs["lse"], bufs["scale"], x, x.stride(0), x.stride(0), n, -100, 0.0,
                            ACC=acc, BLOCK=block, num_warps=warps)
    else:
        ce._ce_fwd[(rows,)](x, t, bufs["loss"], bufs["lse"], bufs["scale"], x.stride(0), n, -100, 0.0,
                            ACC=acc, BLOCK=block, GRAD=kind == "fused", num_warps=warps)


def _fwd_bwd(x: torch.Tensor, t: torch.Tensor, bufs: dict, block: int, warps: int) -> None:
    _launch("fwd", x, t, bufs, block, warps)
    _launch("bwd", x, t, bufs, block, warps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--vocab", default="151872,129280")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    results: list[dict] = []
    for vocab in (int(v) for v in args.vocab.split(",")):
        gen = torch.Generator(device=dev).manual_seed(0)
        logits = (torch.randn(args.rows, vocab, device=dev, generator=gen) * 3).to(torch.bfloat16)
        target = torch.randint(0, vocab, (args.rows,), device=dev, generator=gen)
        target[::7] = -100
        kept = (target != -100).sum().float()
        bufs = {"loss": torch.empty(args.rows, device=dev), "lse": torch.empty(args.rows, device=dev),
                "scale": (1.0 / kept).reshape(1)}
        gb = logits.numel() * logits.element_size() / 1e9
        work = logits.clone()
        copy_ms = triton.testing.do_bench(functools.partial(work.copy_, logits))
        results.append({"vocab": vocab, "kind": "copy", "ms": copy_ms, "GB_moved": 2 * gb})
        # correctness: fused == fwd then bwd (same arithmetic)
        a, b = logits.clone(), logits.clone()
        block0, warps0 = ce._block(vocab, "bwd")  # the launch before the sweep (fwd and bwd alike)
        _launch("fwd", a, target, bufs, block0, warps0)
        _launch("bwd", a, target, bufs, block0, warps0)
        lse_a = bufs["lse"].clone()
        _launch("fused", b, target, bufs, block0, warps0)
        err = (a.float() - b.float()).abs().max().item()
        lse_err = (lse_a - bufs["lse"]).abs().max().item()
        print(f"V={vocab}: fused vs fwd+bwd max |d grad| {err:.3g}, |d lse| {lse_err:.3g}; copy {copy_ms:.3f} ms",
              flush=True)
        for kind, moved in (("fwd", 1), ("bwd", 2), ("fused", 2)):
            for block in BLOCKS:
                for warps in WARPS:
                    if block // (32 * warps) < 1:
                        continue
                    ms = triton.testing.do_bench(functools.partial(_launch, kind, work, target, bufs, block, warps))
                    results.append({"vocab": vocab, "kind": kind, "block": block, "warps": warps, "ms": ms,
                                    "current": (block, warps) == (block0, warps0), "GB_moved": moved * gb,
                                    "pct_copy": 100 * copy_ms / 2 / ms * moved})
        results.append({"vocab": vocab, "kind": "fwd+bwd(current)", "ms": triton.testing.do_bench(
            functools.partial(_fwd_bwd, work, target, bufs, block0, warps0)), "fused_check_max_abs": err})
    record = {"provenance": {**provenance(), **cuda_devices()}, "command": " ".join(sys.argv), "results": results}
    (args.out / "ce_sweep.json").write_text(json.dumps(record, indent=1))
    print(f"\n{'V':>7} {'kind':<17} {'BLOCK':>6} {'warps':>5} {'ms':>8} {'%copy':>6}")
    for vocab in sorted({r["vocab"] for r in results}):
        mine = [r for r in results if r["vocab"] == vocab]
        for kind in ("copy", "fwd+bwd(current)", "fwd", "bwd", "fused"):
            rows = sorted((r for r in mine if r["kind"] == kind), key=lambda r: r["ms"])
            cur = [r for r in rows if r.get("current")]
            for r in rows[:3] + [c for c in cur if c not in rows[:3]]:
                tag = " (before)" if r.get("current") else ""
                print(f"{vocab:>7} {kind:<17} {r.get('block', ''):>6} {r.get('warps', ''):>5} {r['ms']:>8.3f} "
                      f"{r.get('pct_copy', 0):>6.0f}{tag}")


if __name__ == "__main__":
    main()
