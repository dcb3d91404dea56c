"""The gradient norm's sum of squares over OpenSeek-Small's gradients on one GPU: the two implementations of
the `sum_of_squares` op, torch's multi-tensor norm (`openseek_hal.ops.optim.foreach_sum_of_squares`, the `cuda`
backend's) against the Triton per-block partials (`openseek_hal.ops.kernels.reduce.sum_of_squares`, the other
Triton backends').

    python benchmarks/ops/grad_norm_bench.py OUT_DIR [--model openseek-small] [--reps 10]

The gradients are bf16 tensors shaped like the model's trainable parameters (MTP off), grouped into the
trainer's buckets (its `bucket_mb`, 128 MiB of float32 by default; one call per bucket, as backward's hooks
make them). Each variant's calls over every bucket are captured ``--reps`` times in one CUDA graph and the
graph is replayed, so the time is device time, as in the trainer's captured step. A device copy of one buffer
as large as all the gradients gives the bandwidth (half its time is one read of them). Both sums are checked
against a float64 one.
Writes OUT_DIR/grad_norm_bench.json (card, versions, commit, command) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from openseek_hal.models import build_model
from openseek_hal.ops.kernel_loader import kernel_table
from openseek_hal.ops.optim import foreach_sum_of_squares
from openseek_hal.provenance import cuda_devices, provenance
from openseek_hal.train.zero import bucket_groups


def _graph_ms(fn, reps: int) -> float:
    """Device ms a call of ``fn``: ``reps`` calls captured in one CUDA graph, the median of 10 replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return sorted(times)[len(times) // 2]


def _wall_ms(fn, reps: int) -> float:
    """The CPU plumbing run's stand-in timer (no number it gives is meaningful)."""
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1e3 / reps


def buckets_of(model: torch.nn.Module, bucket_mb: float, device: torch.device) -> list[list[torch.Tensor]]:
    """bf16 gradients (random, ~1e-3) shaped like ``model``'s trainable parameters, in the trainer's buckets of
    ``bucket_mb`` MiB of float32 (`openseek_hal.train.zero.bucket_groups`: one data-parallel space, no experts
    split off)."""
    gen = torch.Generator(device=device).manual_seed(0)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [[(torch.randn(p.shape, device=device, generator=gen) * 1e-3).to(torch.bfloat16) for _, p in group]
            for group in bucket_groups(named, int(bucket_mb * 2**20))]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="openseek-small")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--bucket-mb", type=float, default=128.0, help="the trainer's bucket_mb (float32 MiB)")
    ap.add_argument("--cpu", action="store_true", help=argparse.SUPPRESS)  # CPU plumbing test: interpreted kernel
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cpu" if args.cpu else "cuda")
    triton_sum = kernel_table(interpret=args.cpu)["sum_of_squares"]
    timer = _wall_ms if args.cpu else _graph_ms
    meta = build_model(args.model, "cpu", device="meta", num_nextn_predict_layers=0)
    buckets = buckets_of(meta, args.bucket_mb, dev)
    grads = [g for b in buckets for g in b]
    numel = sum(g.numel() for g in grads)
    exact = sum(g.double().square().sum().item() for g in grads)
    flat = torch.empty(numel, dtype=torch.bfloat16, device=dev)
    other = torch.empty_like(flat)
    rows = [{"variant": "copy of all gradients' bytes (read + write)",
             "ms": timer(lambda: other.copy_(flat), args.reps)}]
    for name, fn in (("torch multi-tensor norm per bucket", foreach_sum_of_squares),
                     ("triton partials per bucket", triton_sum)):
        value = sum(fn(b).item() for b in buckets)
        ms = timer(lambda fn=fn: [fn(b) for b in buckets], args.reps)
        rows.append({"variant": name, "ms": ms, "sum": value, "relative_error": abs(value - exact) / exact})
    read_ms = rows[0]["ms"] / 2
    for r in rows[1:]:
        r["pct_of_read"] = 100 * read_ms / r["ms"]
    record = {"provenance": {**provenance(), **(cuda_devices() if not args.cpu else {})},
              "command": " ".join(sys.argv), "model": args.model, "tensors": len(grads), "buckets": len(buckets),
              "elements": numel, "exact_sum": exact, "rows": rows}
    (args.out / "grad_norm_bench.json").write_text(json.dumps(record, indent=1))
    print(f"{len(grads)} gradients, {numel / 1e9:.3f}G bf16 elements, {len(buckets)} buckets")
    for r in rows:
        print(f"{r['variant']:<46} {r['ms']:8.3f} ms  {r.get('pct_of_read', 0):5.0f}% of a read  "
              f"rel err {r.get('relative_error', 0):.2e}")


if __name__ == "__main__":
    main()
