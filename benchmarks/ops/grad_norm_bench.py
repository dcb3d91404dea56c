"""The gradient norm's sum of squares over OpenSeek-Small's gradients on one GPU: torch's multi-tensor norm
(``torch._foreach_norm``, what the trainer used) against the Triton per-block partials
(`openseek_hal.ops.kernels.reduce.sum_of_squares`).

    python benchmarks/ops/grad_norm_bench.py OUT_DIR [--model openseek-small] [--reps 10]

The gradients are bf16 tensors shaped like the model's trainable parameters (MTP off), grouped as the
trainer's 128 MB buckets group them (one call per bucket, as backward's hooks make them). Each variant's
calls over every bucket are captured ``--reps`` times in one CUDA graph and the graph is replayed, so the
time is device time, as in the trainer's captured step; a plain read of the same bytes (``sum`` of each
bucket's flat copy is not free, so the reference is a device copy of one buffer as large as all the
gradients: half its time is one read) gives the bandwidth. Both results are checked against a float64 sum.
Writes OUT_DIR/grad_norm_bench.json (card, versions, commit, command) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from openseek_hal.models import build_model
from openseek_hal.ops.kernels.reduce import sum_of_squares
from openseek_hal.provenance import cuda_devices, provenance


def _foreach(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).square().sum()


def _graph_ms(fn, reps: int) -> float:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="openseek-small")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--bucket-mb", type=float, default=128.0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    meta = build_model(args.model, "cuda", device="meta", num_nextn_predict_layers=0)
    shapes = [p.shape for p in meta.parameters() if p.requires_grad]
    gen = torch.Generator(device=dev).manual_seed(0)
    grads = [(torch.randn(s, device=dev, generator=gen) * 1e-3).to(torch.bfloat16) for s in shapes]
    buckets: list[list[torch.Tensor]] = [[]]
    size = 0
    for g in reversed(grads):  # backward's order: last layers first
        if size and size + g.numel() * 2 > args.bucket_mb * 2**20:
            buckets.append([])
            size = 0
        buckets[-1].append(g)
        size += g.numel() * 2
    numel = sum(g.numel() for g in grads)
    exact = sum(g.double().square().sum().item() for g in grads)
    flat = torch.empty(numel, dtype=torch.bfloat16, device=dev)
    other = torch.empty_like(flat)
    rows = [{"variant": "copy of all gradients' bytes (read + write)",
             "ms": _graph_ms(lambda: other.copy_(flat), args.reps)}]
    for name, fn in (("torch._foreach_norm per bucket", _foreach), ("triton partials per bucket", sum_of_squares)):
        value = sum(fn(b).item() for b in buckets)
        ms = _graph_ms(lambda fn=fn: [fn(b) for b in buckets], args.reps)
        rows.append({"variant": name, "ms": ms, "relative_error": abs(value - exact) / exact})
    read_ms = rows[0]["ms"] / 2
    for r in rows[1:]:
        r["pct_of_read"] = 100 * read_ms / r["ms"]
    record = {"provenance": {**provenance(), **cuda_devices()}, "command": " ".join(sys.argv), "model": args.model,
              "tensors": len(grads), "buckets": len(buckets), "elements": numel, "rows": rows}
    (args.out / "grad_norm_bench.json").write_text(json.dumps(record, indent=1))
    print(f"{len(grads)} gradients, {numel / 1e9:.3f}G bf16 elements, {len(buckets)} buckets")
    for r in rows:
        print(f"{r['variant']:<46} {r['ms']:8.3f} ms  {r.get('pct_of_read', 0):5.0f}% of a read  "
              f"rel err {r.get('relative_error', 0):.2e}")


if __name__ == "__main__":
    main()
