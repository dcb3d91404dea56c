"""Named DeepSeek-V3 configurations: ``tiny`` (CPU tests and the default `openseek-hal train`),
``openseek-small`` (BAAI OpenSeek's ~1.4B-total / ~0.4B-active model) and ``deepseek-v3`` (671B)."""

from __future__ import annotations

from typing import Any

from ...errors import ConfigError
from .config import DeepseekV3Config

PRESETS: dict[str, dict[str, Any]] = {
    # ~2.9M parameters (MTP included) at vocab 4096: trains for a few hundred steps in minutes on a 2-core
    # CPU while still exercising every part (direct queries, a dense first layer, group-limited routing,
    # a shared expert, MTP).
    "tiny": dict(
        vocab_size=4096, hidden_size=128, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
        n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=2, first_k_dense_replace=1,
        kv_lora_rank=64, q_lora_rank=None, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        routed_scaling_factor=1.0, max_position_embeddings=1024, tie_word_embeddings=True,
        num_nextn_predict_layers=1, initializer_range=0.02,
    ),
    "openseek-small": dict(
        vocab_size=151872, hidden_size=1280, intermediate_size=7168, moe_intermediate_size=896,
        num_hidden_layers=6, num_attention_heads=10, num_key_value_heads=10, n_shared_experts=2,
        n_routed_experts=64, num_experts_per_tok=6, n_group=1, topk_group=1, first_k_dense_replace=1,
        kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        routed_scaling_factor=2.446, max_position_embeddings=4096, tie_word_embeddings=True,
        num_nextn_predict_layers=1, mtp_loss_weight=0.3, initializer_range=0.006,
    ),
    "deepseek-v3": dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
        n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4, first_k_dense_replace=3,
        kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        routed_scaling_factor=2.5, max_position_embeddings=163840, tie_word_embeddings=False,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        num_nextn_predict_layers=1, mtp_loss_weight=0.3, initializer_range=0.006,
    ),
}


def preset(name: str, **overrides: Any) -> DeepseekV3Config:
    """The config of preset ``name`` with ``overrides`` applied (e.g. ``vocab_size`` from a tokenizer)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset '{name}' (choose from: {', '.join(PRESETS)})")
    return DeepseekV3Config.from_dict(PRESETS[name], **overrides)
