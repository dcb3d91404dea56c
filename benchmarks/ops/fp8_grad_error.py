"""How far FP8 training's gradients are from float64's, layer by layer, next to bf16's (CPU, interpreted kernels).

    python benchmarks/ops/fp8_grad_error.py [--json OUT.json] [--hidden 256] [--seq 256]

One batch through a small DeepSeek-V3 (one dense and one MoE layer, dimensions multiples of 128 as the
real models' are) three times from the same weights: float64 (the reference), bf16 weights (the CPU's
references in bf16), and bf16 with `fp8: true`'s layers (the Triton FP8 kernels under the interpreter).
For every parameter it prints ``|g - g64| / |g64|`` of both and their ratio. A broken FP8 layer (a wrong
scale, a misplaced tile) shows as an outlier row; e4m3's 3 mantissa bits show as a roughly uniform ratio.
Writes the rows with the versions and the commit to ``--json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from openseek_hal.backend import Capabilities
from openseek_hal.backends.cpu import CPUBackend
from openseek_hal.models import build_model
from openseek_hal.models.deepseek_v3.model import enable_fp8
from openseek_hal.models.deepseek_v3.presets import preset
from openseek_hal.ops.kernel_loader import kernel_table
from openseek_hal.provenance import provenance


class FP8Interpret(CPUBackend):
    """The CPU references everywhere except the FP8 layers, which are the interpreted Triton kernels: the FP8
    training path of triton-interpret at the cost of a CPU run (the full interpreter takes minutes)."""

    name = "cpu-fp8-interpret"

    def native_ops(self):
        table = kernel_table(interpret=True)
        return {**CPUBackend.native_ops(self), "fp8_linear": table["fp8_linear"],
                "fp8_grouped_linear": table["fp8_grouped_linear"]}

    def capabilities(self):
        return Capabilities(device_name="CPU + interpreted fp8 kernels", dtypes=(torch.float32,), fp8=True)


def gradient_errors(hidden: int = 256, seq: int = 256, batch: int = 2, experts: int = 8, seed: int = 0) -> dict:
    """Loss and per-parameter relative gradient errors of bf16 and fp8 against float64."""
    cfg = preset("openseek-small", vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden,
                 moe_intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                 n_routed_experts=experts, num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=128,
                 qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=128, num_nextn_predict_layers=0,
                 max_position_embeddings=seq, initializer_range=0.02)
    ids = torch.randint(1, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    reference = build_model(cfg, CPUBackend(), seed=seed, dtype=torch.float64)

    def run(model: torch.nn.Module) -> tuple[float, dict[str, torch.Tensor]]:
        out = model.loss(inputs, labels)
        out.total.backward()
        return out.main.item(), {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}

    loss64, g64 = run(reference)
    bf16 = copy.deepcopy(reference).to(torch.bfloat16)
    bf16.zero_grad()
    fp8 = copy.deepcopy(bf16)
    enable_fp8(fp8, FP8Interpret())
    loss_bf16, g_bf16 = run(bf16)
    loss_fp8, g_fp8 = run(fp8)

    def rel(g: torch.Tensor, ref: torch.Tensor) -> float:
        return ((g - ref).norm() / ref.norm().clamp(min=1e-300)).item()

    rows = [{"param": n, "bf16": rel(g_bf16[n], ref), "fp8": rel(g_fp8[n], ref)} for n, ref in g64.items()]
    return {"loss": {"fp64": loss64, "bf16": loss_bf16, "fp8": loss_fp8}, "rows": rows,
            "shape": {"hidden": hidden, "seq": seq, "batch": batch, "experts": experts, "seed": seed}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    result = gradient_errors(args.hidden, args.seq, seed=args.seed)
    loss = result["loss"]
    print(f"loss: float64 {loss['fp64']:.6f}  bf16 {loss['bf16']:.6f}  fp8 {loss['fp8']:.6f}")
    print(f"{'parameter':<50} {'bf16':>8} {'fp8':>8} {'ratio':>6}")
    for r in result["rows"]:
        print(f"{r['param']:<50} {r['bf16']:>8.4f} {r['fp8']:>8.4f} {r['fp8'] / max(r['bf16'], 1e-12):>6.1f}")
    if args.json:
        args.json.write_text(json.dumps({"env": provenance(), "command": " ".join(sys.argv), **result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
