"""Training configs: YAML loading, overrides, and one clear error for each kind of bad input."""

from __future__ import annotations

import pytest

from openseek_hal.errors import ConfigError
from openseek_hal.train.config import load_config, model_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 7\nlr: 0.001\n"
                    "model:\n  hidden_size: 64\n  num_attention_heads: 2\n  num_key_value_heads: 2\n")
    cfg = load_config(path, {"steps": "9", "model.num_hidden_layers": 3})
    assert cfg.steps == 9 and cfg.lr == 0.001
    assert cfg.model == {"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2,
                         "num_hidden_layers": 3}
    mc = model_config(cfg, vocab_size=300)
    assert (mc.hidden_size, mc.num_attention_heads, mc.num_hidden_layers, mc.vocab_size) == (64, 2, 3, 300)
    assert mc.n_routed_experts == 8  # the rest comes from the tiny preset


@pytest.mark.parametrize("text, message", [
    ("stepz: 3\n", "unknown key"),
    ("steps: many\n", "steps: expected int"),
    ("steps: 2.5\n", "expected an integer"),
    ("wandb: maybe\n", "expected true/false"),
    ("- a\n- b\n", "mapping"),
    ("steps: [\n", "not valid YAML"),
    ("steps: 0\n", "steps must be positive"),
    ("model:\n  hidden_sizee: 3\n", "unknown DeepSeek-V3 config field"),
    ("model:\n  n_group: 3\n", "not a multiple of n_group"),
    ("model: 5\n", "model: expected a mapping"),
    ("model_preset: huge\n", "neither a preset"),
    ("dtype: fp8\n", "dtype must be"),
    ("expert_dispatch: experts\n", "expert_dispatch must be one of pairs, tokens, allgather"),
    ("fp8: true\nexpert_parallel: 2\nexpert_dispatch: allgather\n", "allgather does not run with fp8"),
])
def test_bad_config_gives_one_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_moment_dtype_auto_is_bf16_only_in_the_accelerator_regime():
    """`moment_dtype: auto` (the default): bf16 moments where `dtype: auto` gives bf16 weights (a GPU job),
    the master's dtype in every other regime; `master` and `bf16` hold everywhere."""
    import torch

    from openseek_hal.train.trainer import moment_dtype

    def resolve(weights: torch.dtype, **fields) -> torch.dtype:
        return moment_dtype(load_config(overrides=fields), weights)

    assert load_config().moment_dtype == "auto"
    assert resolve(torch.bfloat16) == torch.bfloat16  # dtype auto on an accelerator
    assert resolve(torch.float32) == torch.float32  # dtype auto on the CPU (or a mixed cuda+cpu job)
    assert resolve(torch.bfloat16, dtype="bf16") == torch.float32  # explicit bf16: fp32 master and moments
    assert resolve(torch.float32, dtype="autocast") == torch.float32
    assert resolve(torch.float64, dtype="fp64") == torch.float64
    assert resolve(torch.bfloat16, moment_dtype="master") == torch.float32
    assert resolve(torch.float32, moment_dtype="bf16") == torch.bfloat16
    assert resolve(torch.float64, dtype="fp64", moment_dtype="bf16") == torch.bfloat16
    with pytest.raises(ConfigError, match="moment_dtype must be one of auto, master, bf16, got 'fp16'"):
        load_config(overrides={"moment_dtype": "fp16"})
