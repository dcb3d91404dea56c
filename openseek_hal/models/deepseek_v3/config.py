"""The DeepSeek-V3 model configuration: a keyword-only dataclass, loadable from dicts, YAML and HF ``config.json``.

Field names are those of Hugging Face's ``DeepseekV3Config`` so that reading a checkpoint's config is a
rename-free copy. Fields that HF does not have (training-only knobs) are listed last: the MTP loss
weight, the sequence-wise auxiliary-loss coefficient and the aux-loss-free bias update rate.

Parameter counts (total and active per token) are computed here from the config alone, so that a
671B configuration can be sized without building it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ...fileio import read_yaml_mapping

# Keys a HF config.json carries that say nothing about the architecture we build.
_HF_IGNORED = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "auto_map", "use_cache",
    "pretraining_tp", "attention_dropout", "output_router_logits", "head_dim", "qk_head_dim", "quantization_config",
    "topk_method", "ep_size", "moe_layer_freq", "seq_aux", "rope_parameters",
    "aux_loss_alpha", "_name_or_path", "num_local_experts",
}


_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "n_routed_experts", "kv_lora_rank", "qk_rope_head_dim",
                  "v_head_dim", "qk_nope_head_dim", "n_group", "topk_group", "num_experts_per_tok",
                  "max_position_embeddings")


@dataclass(kw_only=True)
class DeepseekV3Config:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # width of the dense (first_k_dense_replace) layers' MLP
    moe_intermediate_size: int = 2048  # width of one routed (and one shared) expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128  # MLA has no grouped KV: must equal num_attention_heads
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536  # None: a direct query projection
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF semantics: {"type"/"rope_type": "yarn", "factor": ...}
    rope_interleave: bool = True
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 1  # MTP depth D
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    # -- training knobs that HF's config does not carry --------------------------------------------
    mtp_loss_weight: float = 0.3  # lambda: total MTP loss is lambda * mean over the D depths
    seq_aux_loss_coef: float = 1e-4  # alpha of the sequence-wise balance loss (0 disables it)
    bias_update_rate: float = 1e-3  # gamma of the aux-loss-free bias update
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # unknown HF keys, kept for save_hf

    def __post_init__(self) -> None:
        for name in _POSITIVE_INTS:  # sizes: checked first, so the checks below compare numbers
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        problems = []
        if self.num_key_value_heads != self.num_attention_heads:
            problems.append(f"num_key_value_heads ({self.num_key_value_heads}) must equal num_attention_heads "
                            f"({self.num_attention_heads}) in MLA")
        if self.n_routed_experts % self.n_group:
            problems.append(f"n_routed_experts ({self.n_routed_experts}) is not a multiple of n_group ({self.n_group})")
        if not 1 <= self.topk_group <= self.n_group:
            problems.append(f"topk_group ({self.topk_group}) must be in [1, n_group={self.n_group}]")
        if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            problems.append(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                            f"[1, n_routed_experts={self.n_routed_experts}]")
        if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
            problems.append("num_experts_per_tok exceeds the experts of the topk_group kept groups")
        if self.scoring_func not in ("sigmoid", "softmax"):
            problems.append(f"scoring_func must be 'sigmoid' or 'softmax', got {self.scoring_func!r}")
        if self.hidden_act != "silu":
            problems.append(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.qk_rope_head_dim % 2:
            problems.append(f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even")
        if self.num_nextn_predict_layers < 0 or self.first_k_dense_replace < 0:
            problems.append("num_nextn_predict_layers and first_k_dense_replace must be >= 0")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ("default", "yarn"):
                problems.append(f"rope_scaling type {kind!r} is not supported (use 'yarn' or none)")
            elif kind == "yarn" and "original_max_position_embeddings" not in self.rope_scaling:
                problems.append("yarn rope_scaling needs original_max_position_embeddings")
        if problems:
            raise ConfigError("; ".join(problems))

    # -- derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_index: int) -> bool:
        """Layer ``layer_index`` (MTP blocks continue the numbering after the main layers) is MoE."""
        return layer_index >= self.first_k_dense_replace

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)} - {"extra"}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], **overrides: Any) -> DeepseekV3Config:
        """Strict: an unknown key is a `ConfigError` naming it (a typo must not silently fall back to a default)."""
        merged = {**values, **overrides}
        unknown = sorted(set(merged) - cls.field_names() - {"extra"})
        if unknown:
            raise ConfigError(f"unknown DeepSeek-V3 config field(s): {', '.join(unknown)}")
        try:
            return cls(**merged)
        except TypeError as e:
            raise ConfigError(f"bad DeepSeek-V3 config: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> DeepseekV3Config:
        return cls.from_dict(read_yaml_mapping(path, "model config file"), **overrides)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> DeepseekV3Config:
        """From a HF ``config.json`` dict (transformers 4.x ``rope_scaling`` or 5.x ``rope_parameters``)."""
        values = {k: v for k, v in hf.items() if k in cls.field_names()}
        rope = hf.get("rope_parameters")
        if rope and "rope_scaling" not in hf:
            rope = dict(rope)
            values["rope_theta"] = rope.pop("rope_theta", values.get("rope_theta", 10000.0))
            kind = rope.get("rope_type", rope.get("type", "default"))
            values["rope_scaling"] = None if kind == "default" else rope
        if "aux_loss_alpha" in hf and hf.get("seq_aux", True):
            values["seq_aux_loss_coef"] = hf["aux_loss_alpha"]
        values["extra"] = {k: v for k, v in hf.items()
                           if k not in cls.field_names() and k not in _HF_IGNORED}
        return cls.from_dict(values)

    # -- saving --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("extra")
        return out

    def to_hf(self) -> dict[str, Any]:
        """A ``config.json`` for transformers (4.x and 5.x both read ``rope_scaling`` + ``rope_theta``)."""
        ours = {"mtp_loss_weight", "seq_aux_loss_coef", "bias_update_rate"}
        out = {k: v for k, v in self.to_dict().items() if k not in ours}
        out.update(self.extra)
        out.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", head_dim=self.qk_rope_head_dim,
                   topk_method="noaux_tc", aux_loss_alpha=self.seq_aux_loss_coef, seq_aux=True)
        return out

    def replace(self, **changes: Any) -> DeepseekV3Config:
        return dataclasses.replace(self, **changes)

    # -- parameter counts ------------------------------------------------------------------------
    def num_parameters(self, *, active: bool = False, include_mtp: bool = False) -> int:
        """Parameters of the model built from this config (``active``: those one token uses).

        Published DeepSeek-V3 figures (671B total, 37B active) exclude the MTP module, hence the default.
        Norm weights count; the routing bias is a buffer and does not. Tied embeddings count once.
        """
        h = self.hidden_size
        heads = self.num_attention_heads
        if self.q_lora_rank is None:
            attn = h * heads * self.qk_head_dim
        else:
            attn = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * heads * self.qk_head_dim
        attn += h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        attn += self.kv_lora_rank * heads * (self.qk_nope_head_dim + self.v_head_dim)
        attn += heads * self.v_head_dim * h
        if self.attention_bias:
            attn += (self.q_lora_rank or 0) + self.kv_lora_rank + self.qk_rope_head_dim + h
        expert = 3 * h * self.moe_intermediate_size
        routed = self.num_experts_per_tok if active else self.n_routed_experts
        moe = routed * expert + self.n_shared_experts * expert + self.n_routed_experts * h
        dense = 3 * h * self.intermediate_size

        def block(index: int) -> int:
            return attn + 2 * h + (moe if self.is_moe_layer(index) else dense)

        total = sum(block(i) for i in range(self.num_hidden_layers)) + h  # + final norm
        total += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        if include_mtp:
            for d in range(self.num_nextn_predict_layers):
                total += block(self.num_hidden_layers + d) + 3 * h + 2 * h * h  # enorm, hnorm, head norm, eh_proj
        return total
