"""Rotary tables for plain rope and YaRN (with DeepSeek's mscale), and YaRN's softmax-scale correction.

These build the ``(cos, sin)`` inputs of the `rope` op; they are not ops themselves (no backend
implements them: they run once per sequence length). The ``rope_scaling`` dict follows Hugging
Face's semantics for DeepSeek-V3 checkpoints:

- ``{"type" | "rope_type": "yarn", "factor", "original_max_position_embeddings", "beta_fast"=32,
  "beta_slow"=1, "mscale", "mscale_all_dim", "attention_factor", "truncate"=True}``. Frequencies
  below the ``beta_slow`` rotation count are interpolated by ``factor``, those above ``beta_fast``
  are kept, with a linear ramp between; cos/sin are multiplied by the attention factor
  ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` (1 for DeepSeek-V3's own config).
- The softmax scale of attention is multiplied by ``mscale(factor, mscale_all_dim) ** 2``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch


def rope_type(rope_scaling: Mapping[str, Any] | None) -> str:
    if not rope_scaling:
        return "default"
    return rope_scaling.get("rope_type", rope_scaling.get("type", "default"))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction ``0.1 * mscale * ln(scale) + 1`` (1 when not extending)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_factor(rope_scaling: Mapping[str, Any], max_position_embeddings: int | None) -> float:
    factor = rope_scaling.get("factor")
    if factor is None:  # HF: derived from the context extension when absent
        if max_position_embeddings is None:
            raise ValueError("yarn rope_scaling without 'factor' needs max_position_embeddings")
        factor = max_position_embeddings / rope_scaling["original_max_position_embeddings"]
    return float(factor)


def _yarn_inv_freq(dim: int, theta: float, rope_scaling: Mapping[str, Any], factor: float) -> torch.Tensor:
    original = rope_scaling["original_max_position_embeddings"]
    beta_fast = rope_scaling.get("beta_fast") or 32
    beta_slow = rope_scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dim index that turns ``rotations`` times in ``original``
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope_scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    interpolation = extrapolation / factor
    return interpolation * ramp + extrapolation * (1 - ramp)


def rope_tables(dim: int, seq_len: int, *, theta: float = 10000.0, rope_scaling: Mapping[str, Any] | None = None,
                max_position_embeddings: int | None = None, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of shape ``(seq_len, dim // 2)`` for positions ``0 .. seq_len - 1``."""
    kind = rope_type(rope_scaling)
    if kind == "default":
        inv_freq, attention_factor = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim), 1.0
    elif kind == "yarn":
        factor = _yarn_factor(rope_scaling, max_position_embeddings)
        inv_freq = _yarn_inv_freq(dim, theta, rope_scaling, factor)
        attention_factor = rope_scaling.get("attention_factor")
        if attention_factor is None:
            mscale, mscale_all_dim = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
            if mscale and mscale_all_dim:
                attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
            else:
                attention_factor = yarn_mscale(factor)
    else:
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, yarn)")
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    cos, sin = angles.cos() * attention_factor, angles.sin() * attention_factor
    return cos.to(dtype=dtype, device=device), sin.to(dtype=dtype, device=device)


def softmax_scale(qk_head_dim: int, rope_scaling: Mapping[str, Any] | None = None,
                  max_position_embeddings: int | None = None) -> float:
    """``qk_head_dim ** -0.5``, times ``mscale(factor, mscale_all_dim) ** 2`` under YaRN (DeepSeek)."""
    scale = qk_head_dim ** -0.5
    if rope_type(rope_scaling) != "default":
        mscale_all_dim = rope_scaling.get("mscale_all_dim", 0)
        if mscale_all_dim:
            scale *= yarn_mscale(_yarn_factor(rope_scaling, max_position_embeddings), mscale_all_dim) ** 2
    return scale
