"""The spread the model level's bands are sized from: each backend's run in fp32 and bf16 against the
float64 reference, over several seeds (the same runs `conform --level model` makes).

    python benchmarks/conformance/model_level_spread.py --backend cpu --seeds 10 [--json OUT.json]

Prints, per dtype, the worst step-0 logits error (norm-wise) and the worst per-step relative loss and
gradient-norm errors over the seeds; writes them with the card, versions, commit and command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from openseek_hal.backend import get_backend
from openseek_hal.conformance.model_level import ModelLevel, _normwise, _relative, default_spec, train_steps
from openseek_hal.provenance import provenance


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    backend, reference = get_backend(args.backend), get_backend("cpu")
    spec = default_spec()
    worst: dict[str, list[float]] = {}
    rows = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        initial = {k: v.detach().clone() for k, v in spec.factory(reference).state_dict().items()}
        gen = torch.Generator().manual_seed(seed)
        distinct = [torch.randint(0, spec.vocab_size, (spec.batch, spec.seq + 1), generator=gen) for _ in range(2)]
        batches = [distinct[i % 2] for i in range(args.steps)]
        ref = train_steps(ModelLevel._model(spec, reference, initial, torch.float64), reference, batches, spec.lr)
        for dtype in (torch.float32, torch.bfloat16):
            got = train_steps(ModelLevel._model(spec, backend, initial, dtype), backend, batches, spec.lr)
            errors = [_normwise(got.logits, ref.logits), max(_relative(got.loss, ref.loss)),
                      max(_relative(got.grad_norm, ref.grad_norm))]
            name = str(dtype).removeprefix("torch.")
            rows.append({"seed": seed, "dtype": name, "logits": errors[0], "loss": errors[1], "grad_norm": errors[2]})
            worst[name] = [max(a, b) for a, b in zip(worst.get(name, [0.0] * 3), errors)]
            print(f"seed {seed} {name:<9} logits {errors[0]:.3g}  loss {errors[1]:.3g}  grad norm {errors[2]:.3g}",
                  flush=True)
    card = torch.cuda.get_device_name(0) if backend.device_type == "cuda" else backend.capabilities().device_name
    if args.json:
        args.json.write_text(json.dumps({"backend": args.backend, "card": card, **provenance(), "seeds": args.seeds,
                                         "steps": args.steps, "worst": worst, "rows": rows}, indent=1))
    print(f"{'dtype':<9} {'logits':>9} {'loss':>9} {'grad norm':>9}   ({args.backend}, {card}, {args.seeds} seeds)")
    for name, (lg, ls, gn) in worst.items():
        print(f"{name:<9} {lg:>9.3g} {ls:>9.3g} {gn:>9.3g}")


if __name__ == "__main__":
    main()
