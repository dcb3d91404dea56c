"""Where one training step's time goes on one GPU: the trainer's regime against a plain loop, in one process.

    python benchmarks/train/step_profile.py --out $OUT [--mtp 0] [--micro-batch 2] [--seq-len 4096]

Rows (random tokens, the openseek-small preset with its real vocabulary, seq 4096):

- ``plain``: bf16 weights and ``torch.optim.AdamW(fused=True)`` on bf16 state, a bare loop (the floor);
- ``zero1``: the trainer's accelerator regime with a serial update: bf16 weights and gradients, fp32
  master and moments in the `DistributedOptimizer` (gradient buckets, backward hooks, HAL ``adamw``),
  global-norm clipping;
- ``zero1-overlap``: the same with the update on a side stream beside the next forward (the default).

Prints tokens/s, MFU and per-phase device time of each, then the top device kernels of a profiled
``zero1`` step; writes ``step_profile.json`` (card, versions, commit, command).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from openseek_hal.backend import get_backend
from openseek_hal.models import build_model
from openseek_hal.train.zero import DistributedOptimizer, named_spaces

PEAK = 989e12


def _batch(vocab: int, micro: int, seq: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.randint(0, vocab, (micro, seq + 1), device=device)
    return t[:, :-1], t[:, 1:]


def _time(step, n: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def device_busy(prof) -> dict:
    """Union of the device kernels' intervals over the profiled window: how much of it the GPU computed."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start)
    if not spans:
        return {}
    busy, cur_s, cur_e = 0.0, *spans[0]
    for s, e in spans[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    window = spans[-1][1] - spans[0][0]
    return {"profiled_window_ms": window / 1e3, "device_busy_ms": busy / 1e3, "device_busy_fraction": busy / window}


def run_regime(regime: str, args: argparse.Namespace, be) -> dict:
    dev = be.device.torch_device
    model = build_model("openseek-small", be, dtype=torch.bfloat16, seed=0, num_nextn_predict_layers=args.mtp)
    vocab = model.config.vocab_size
    flops = model.flops_per_token(args.seq_len)
    if regime == "plain":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step():
            x, y = _batch(vocab, args.micro_batch, args.seq_len, dev)
            model.loss(x, y).total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.update_expert_bias()
    else:
        zero = DistributedOptimizer(named_spaces(model, None, None, lambda p: False), be, world=None, lr=1e-4,
                                    betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, grad_dtype=torch.bfloat16,
                                    overlap_update=regime == "zero1-overlap")
        # as the trainer: each block waits for its own weights when the next forward reaches it
        zero.gather_before_use([*model.layers, *model.mtp, model.norm])

        def step():
            x, y = _batch(vocab, args.micro_batch, args.seq_len, dev)
            zero.start_step(1)
            model.loss(x, y).total.backward()
            zero.finish_gradients()
            model.update_expert_bias()
            zero.update(1e-4, 1.0)
            zero.wait_weights(lazy=True)
    for _ in range(3):
        step()
    seconds = _time(step, args.steps)
    tps = args.micro_batch * args.seq_len / seconds
    row = {"step_ms": 1e3 * seconds, "tokens_per_s": tps, "mfu": tps * flops / PEAK,
           "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=70)
    row.update(device_busy(prof))
    (args.out / f"profile-{regime}.txt").write_text(table)
    print(f"== {regime}\n{table}", flush=True)
    if regime != "plain":
        zero.close()  # its gradient hooks hold the buckets: let the next regime start from free memory
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--mtp", type=int, default=0)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    be = get_backend("cuda")
    rows = {}
    for regime in ("plain", "zero1", "zero1-overlap"):
        rows[regime] = run_regime(regime, args, be)
        gc.collect()  # parameters and their hooks form cycles
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    from openseek_hal.provenance import provenance

    (args.out / "step_profile.json").write_text(json.dumps(
        {"card": torch.cuda.get_device_name(0), **provenance(), "rows": rows}, indent=1))
    print(f"{'regime':<14} {'step ms':>8} {'tok/s':>9} {'MFU':>6} {'peak MiB':>9} {'busy':>6}")
    for name, r in rows.items():
        print(f"{name:<14} {r['step_ms']:>8.1f} {r['tokens_per_s']:>9,.0f} {100 * r['mfu']:>5.1f}% "
              f"{r['peak_memory_mib']:>9,.0f} {100 * r.get('device_busy_fraction', float('nan')):>5.1f}%")


if __name__ == "__main__":
    main()
