"""Count what one training step launches, on the CPU: torch operators and Triton kernels, by name and shape.

    python benchmarks/train/launch_census.py [--backend triton-interpret] [--json OUT.json] [--set KEY=VALUE ...]

A captured step on a GPU costs each kernel at least its launch (~2-3 us for a small one), so small torch
operators between our kernels (an add of two gradients, a dtype conversion, a per-layer bookkeeping op)
add up. This runs `openseek-hal train` for three steps on the CPU (default: the tiny model with bf16
weights and bf16 moments, the accelerator regime, on the Triton interpreter) and records the third step:
every aten operator dispatched outside a Triton kernel (views and allocations left out: they launch
nothing), and every Triton launch. It counts, it does not time: a GPU profile (`bench_train.py --rows
1gpu-profile`) says what each launch costs. Where the CPU takes another path than CUDA (the router's
fp32 logits instead of the tensor-core ones, the flash kernel instead of SDPA, the reference loop or
torch's grouped GEMM), the counts differ from a GPU step's there.

Prints the counts, most frequent first; ``--json`` writes them with the command, versions and commit.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from openseek_hal.ops import kernel_loader
from openseek_hal.provenance import provenance
from openseek_hal.train import trainer
from openseek_hal.train.config import load_config

# operators that make views or allocate: no kernel runs for them
SILENT = frozenset({"view", "t", "transpose", "slice", "detach", "_unsafe_view", "select", "expand", "unbind",
                    "split", "split_with_sizes", "promote_types", "lift_fresh", "empty", "empty_like",
                    "new_empty", "empty_strided", "as_strided", "alias", "reshape", "unsqueeze", "squeeze",
                    "permute", "_reshape_alias", "unfold", "narrow", "set_"})
DEFAULTS = {"backend": "triton-interpret", "steps": 3, "save": False, "eval_batches": 1, "sample_tokens": 1,
            "global_batch_size": 2, "seq_len": 32, "dtype": "bf16", "moment_dtype": "bf16", "log_every": 1,
            "graph_step": "false"}


class _Census(TorchDispatchMode):
    def __init__(self, inside_kernel: list[int]):
        super().__init__()
        self.inside_kernel = inside_kernel
        self.ops: collections.Counter[tuple[str, str]] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        # aten only: our custom ops (the router, the flash kernel) dispatch here too, their kernels count below
        if not self.inside_kernel[0] and func.namespace == "aten" and name not in SILENT:
            shapes = ", ".join(str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor))
            self.ops[(name, shapes)] += 1
        return func(*args, **(kwargs or {}))


def census(overrides: dict[str, Any], step: int = 3) -> dict[str, Any]:
    """Train with ``overrides`` on top of `DEFAULTS` and count step ``step``'s operators and Triton launches."""
    inside, calls, launches = [0], [0], collections.Counter()  # inside a launch; steps begun; launches counted
    recorded: dict[str, Any] = {}
    launch = kernel_loader._InterpretedKernel.__getitem__
    run_step = trainer._Run._step

    def counted_launch(self, grid):
        run = launch(self, grid)

        def counted(*args, **kwargs):
            if "ops" not in recorded and calls[0] == step:
                launches[self.fn.fn.__name__] += 1
            inside[0] += 1
            try:
                return run(*args, **kwargs)
            finally:
                inside[0] -= 1
        return counted

    def counted_step(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] != step:
            return run_step(self, *args, **kwargs)
        with _Census(inside) as seen:
            out = run_step(self, *args, **kwargs)
        recorded["ops"] = seen.ops
        return out

    with tempfile.TemporaryDirectory() as out:
        config = {**DEFAULTS, **overrides, "steps": step}  # the run ends with the counted step
        cfg = load_config(None, {**config, "out": str(Path(out) / "run")})
        kernel_loader._InterpretedKernel.__getitem__ = counted_launch
        trainer._Run._step = counted_step
        try:
            trainer.train(cfg)
        finally:
            kernel_loader._InterpretedKernel.__getitem__ = launch
            trainer._Run._step = run_step
    ops: collections.Counter = recorded["ops"]
    by_name = collections.Counter()
    for (name, _), n in ops.items():
        by_name[name] += n
    return {"config": config, "step": step, "torch_ops": sum(ops.values()),
            "triton_launches": sum(launches.values()), "torch_ops_by_name": dict(by_name.most_common()),
            "torch_ops_by_shape": [{"op": name, "shapes": shapes, "calls": n}
                                   for (name, shapes), n in ops.most_common()],
            "triton_launches_by_kernel": dict(launches.most_common())}


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default=DEFAULTS["backend"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a training config field")
    parser.add_argument("--step", type=int, default=3, help="the step to count (default 3: after the first "
                                                                "step's one-off work)")
    parser.add_argument("--json", type=Path, help="write the counts here")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {"backend": args.backend}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set wants KEY=VALUE, got {item!r}")
        overrides[key] = _value(value)
    result = census(overrides, args.step)
    print(f"step {result['step']}: {result['torch_ops']} torch operators, {result['triton_launches']} Triton launches")
    for name, n in result["triton_launches_by_kernel"].items():
        print(f"{n:6d}  triton {name}")
    for row in result["torch_ops_by_shape"]:
        print(f"{row['calls']:6d}  {row['op']}  {row['shapes']}")
    if args.json:
        result["provenance"] = provenance(["python", *sys.argv])
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
