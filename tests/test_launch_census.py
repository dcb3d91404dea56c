"""`benchmarks/train/launch_census.py`: what one training step launches, counted on the CPU."""

from __future__ import annotations

import json

import torch
from benchmark_scripts import load_script

from openseek_hal.models import build_model


def test_census_counts_a_steps_kernels_and_torch_operators(tmp_path, capsys):
    """A step of the tiny model (two layers, bf16 weights, the Triton interpreter): one AdamW launch and one
    sum-of-squares launch per parameter tensor (counted independently from the built model), the tied
    embedding's rows added by the Triton kernel (main and MTP lookups) with no ``index_put_``, the routing
    biases of every MoE layer updated by one ``sign`` and one multi-tensor add, and the JSON record."""
    census = load_script("train/launch_census.py")
    out = tmp_path / "census.json"
    assert census.main(["--set", "seq_len=16", "--set", 'model={"num_hidden_layers": 2}', "--step", "2",
                        "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert f"step 2: {result['torch_ops']} torch operators" in capsys.readouterr().out
    model = build_model("tiny", "cpu", seed=0, num_hidden_layers=2)
    tensors = sum(1 for p in model.parameters() if p.numel())
    launches = result["triton_launches_by_kernel"]
    assert launches["_adamw_kernel"] == launches["_square_partials"] == tensors
    assert launches["_add_sorted_rows"] == 2 and "index_put_" not in result["torch_ops_by_name"]
    ops = result["torch_ops_by_name"]
    assert ops["sign"] == 1 and ops["_foreach_add_"] == 1 and len(list(model.moe_layers())) == 2
    assert result["torch_ops"] == sum(row["calls"] for row in result["torch_ops_by_shape"]) == sum(ops.values())
    assert result["provenance"]["command"].startswith("python") and torch.__version__ in json.dumps(result)
