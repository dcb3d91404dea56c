"""Forward + backward throughput and peak memory of a DeepSeek-V3 preset on one accelerator.

Times ``model.loss(ids, labels).total.backward()`` (main + MTP + balance losses) of our model on the
chosen backend and, as the baseline in the same process, transformers' ``DeepseekV3ForCausalLM``
built from the same config (it has no MTP, so our model is also timed with MTP off). Prints one
line per run and a JSON summary with the card's name.

    python benchmarks/model/fwd_bwd.py --preset openseek-small --seq 4096 --batch 1 --dtype bfloat16 --backend cuda
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

from openseek_hal.backend import OpFallbackWarning, get_backend
from openseek_hal.models import build_model, preset


def timed(step, device, warmup: int, iters: int) -> tuple[float, float]:
    """Seconds per step and peak memory (GiB) over ``iters`` steps after ``warmup``."""
    for _ in range(warmup):
        step()
    device.synchronize()
    torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
    start = time.perf_counter()
    for _ in range(iters):
        step()
    device.synchronize()
    seconds = (time.perf_counter() - start) / iters
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="openseek-small")
    parser.add_argument("--backend", default="cuda")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-baseline", action="store_true", help="skip the transformers baseline")
    args = parser.parse_args()

    warnings.simplefilter("ignore", OpFallbackWarning)  # coverage is printed once below instead
    backend = get_backend(args.backend)
    device = backend.device
    dtype = getattr(torch, args.dtype)
    config = preset(args.preset)
    tokens = args.batch * args.seq
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), device=device.torch_device)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    fallback = sorted(op for op, kind in backend.coverage().items() if kind == "fallback")
    print(f"device: {backend.capabilities().device_name}  backend: {backend.name}  "
          f"reference-fallback ops: {', '.join(fallback) or 'none'}")
    results = {"device": backend.capabilities().device_name, "backend": backend.name, "preset": args.preset,
               "seq": args.seq, "batch": args.batch, "dtype": args.dtype, "runs": {}}

    def record(name: str, step) -> None:
        seconds, peak = timed(step, device, args.warmup, args.iters)
        results["runs"][name] = {"tokens_per_s": tokens / seconds, "ms_per_step": 1e3 * seconds, "peak_gib": peak}
        print(f"{name:<32} {tokens / seconds:>10.0f} tokens/s  {1e3 * seconds:8.1f} ms/step  peak {peak:6.2f} GiB")

    for mtp in (config.num_nextn_predict_layers, 0):
        model = build_model(config, backend, dtype=dtype, seed=0, num_nextn_predict_layers=mtp).train()

        def step(model=model):
            model.loss(inputs, labels).total.backward()
            model.zero_grad(set_to_none=True)

        record(f"openseek-hal (MTP depth {mtp})", step)
        del model, step
        torch.cuda.empty_cache() if device.type == "cuda" else None

    if not args.no_baseline:
        import transformers

        hf_config = transformers.DeepseekV3Config(**config.replace(num_nextn_predict_layers=0).to_hf())
        hf = transformers.DeepseekV3ForCausalLM(hf_config).to(device=device.torch_device, dtype=dtype).train()

        def hf_step():
            hf(input_ids=inputs, labels=inputs).loss.backward()  # transformers shifts labels itself
            hf.zero_grad(set_to_none=True)

        record(f"transformers {transformers.__version__} (no MTP)", hf_step)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
