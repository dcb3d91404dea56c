"""Training configs: YAML loading, overrides, and one clear error for each kind of bad input."""

from __future__ import annotations

import pytest

from openseek_hal.errors import ConfigError
from openseek_hal.train.config import load_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 7\nlr: 0.001\nmodel:\n  hidden_size: 64\n  num_attention_heads: 2\n")
    cfg = load_config(path, {"steps": "9", "model.num_hidden_layers": "3"})
    assert cfg.steps == 9 and cfg.lr == 0.001
    assert (cfg.model.hidden_size, cfg.model.num_attention_heads, cfg.model.num_hidden_layers) == (64, 2, 3)


@pytest.mark.parametrize("text, message", [
    ("stepz: 3\n", "unknown key"),
    ("steps: many\n", "steps: expected int"),
    ("steps: 2.5\n", "expected an integer"),
    ("model:\n  tie_word_embeddings: maybe\n", "expected true/false"),
    ("- a\n- b\n", "mapping"),
    ("steps: [\n", "not valid YAML"),
    ("steps: 0\n", "steps must be positive"),
    ("model:\n  hidden_size: 100\n  num_attention_heads: 3\n", "divisible"),
    ("dtype: fp8\n", "dtype must be"),
])
def test_bad_config_gives_one_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
