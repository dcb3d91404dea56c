"""Causal scaled-dot-product attention whose query/key head dim may differ from the value's (MLA)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .opdef import OpDef, Sample, randn


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale + causal_mask) v`` on ``(batch, heads, seq, dim)`` tensors."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    s_q, s_k = q.shape[-2], k.shape[-2]
    mask = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril(diagonal=s_k - s_q)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v.to(acc)).to(q.dtype)


def sdpa_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          scale: float | None = None) -> torch.Tensor:
    """`causal_attention` through torch's fused ``scaled_dot_product_attention`` (what GPU backends use)."""
    if q.numel() == 0 or k.numel() == 0:
        # the CUDA flash kernel returns None for an empty bf16 batch (torch 2.11, found by conformance)
        return causal_attention(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def _samples(dtype, device, gen):
    for b, h, s, dqk, dv in [(2, 4, 16, 24, 16), (1, 1, 1, 8, 8), (1, 2, 33, 64, 32)]:
        q, k = (randn(b, h, s, dqk, dtype=dtype, device=device, generator=gen) for _ in range(2))
        v = randn(b, h, s, dv, dtype=dtype, device=device, generator=gen)
        # the longest reduction: over the keys (P v), the head dims (q k^T; dO v^T in the backward)
        yield Sample((q, k, v), {"scale": dqk ** -0.5}, f"B{b}H{h}S{s}Dqk{dqk}Dv{dv}", max(s, dqk, dv))
    # MLA's shapes (qk 192 = 128 nope + 64 rope, v 128) and its own softmax scale (not 1/sqrt(d): YaRN
    # scales it), over a sequence that leaves a partial last tile for 64- and 128-wide kernels
    q, k = (randn(1, 2, 130, 192, dtype=dtype, device=device, generator=gen) for _ in range(2))
    v = randn(1, 2, 130, 128, dtype=dtype, device=device, generator=gen)
    yield Sample((q, k, v), {"scale": 0.11}, "B1H2S130Dqk192Dv128:mla-scale", 192)
    # the default scale (no argument)
    q, k, v = (randn(2, 2, 20, 16, dtype=dtype, device=device, generator=gen) for _ in range(3))
    yield Sample((q, k, v), {}, "B2H2S20D16:default-scale", 20)


OPDEFS = [OpDef(name="causal_attention",
                signature="causal_attention(q[B,H,S,Dqk], k[B,H,S,Dqk], v[B,H,S,Dv], scale=None) -> o[B,H,S,Dv]",
                reference=causal_attention, samples=_samples)]
