"""A small decoder built only from HAL ops, for the model level when no model preset is installed.

It exercises the same op set as DeepSeek-V3 (embedding, rms_norm / add_rms_norm, rope, causal
attention, silu_and_mul, MoE routing with permute/unpermute, cross entropy) in two layers (one dense,
one MoE), small enough to train a few steps on a CPU in seconds. The model level prefers the real
``tiny`` DeepSeek-V3 preset from ``openseek_hal.models.build_model`` when it is importable.
"""

from __future__ import annotations

import torch
from torch import nn

from ..backend import Backend
from ..ops.rope import rope_frequencies


class _Layer(nn.Module):
    def __init__(self, backend: Backend, dim: int, heads: int, ffn: int, experts: int, top_k: int):
        super().__init__()
        self.heads, self.experts, self.top_k = heads, experts, top_k
        self.attn_norm = nn.Parameter(torch.ones(dim))
        self.ffn_norm = nn.Parameter(torch.ones(dim))
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        if experts:
            self.router = nn.Linear(dim, experts, bias=False)
            self.gate_up = nn.Parameter(torch.randn(experts, dim, 2 * ffn) * dim ** -0.5)
            self.down = nn.Parameter(torch.randn(experts, ffn, dim) * ffn ** -0.5)
        else:
            self.gate_up_dense = nn.Linear(dim, 2 * ffn, bias=False)
            self.down_dense = nn.Linear(ffn, dim, bias=False)
        self.rms_norm, self.add_rms_norm = backend.op("rms_norm"), backend.op("add_rms_norm")
        self.rope, self.attention = backend.op("rope"), backend.op("causal_attention")
        self.silu_and_mul = backend.op("silu_and_mul")
        if experts:
            self.route, self.permute = backend.op("moe_route"), backend.op("moe_permute")
            self.unpermute = backend.op("moe_unpermute")

    def _ffn(self, h: torch.Tensor) -> torch.Tensor:
        if not self.experts:
            return self.down_dense(self.silu_and_mul(self.gate_up_dense(h)))
        flat = h.reshape(-1, h.shape[-1])
        # the router runs in float32 at least, as DeepSeek-V3's gate does: bf16 scores flip near-ties
        acc = torch.promote_types(flat.dtype, torch.float32)
        router_logits = nn.functional.linear(flat.to(acc), self.router.weight.to(acc))
        indices, weights, _ = self.route(router_logits, None, top_k=self.top_k, score_func="softmax")
        x_sorted, order, counts = self.permute(flat, indices, self.experts)
        outs = [self.silu_and_mul(chunk @ self.gate_up[e]) @ self.down[e]
                for e, chunk in enumerate(x_sorted.split(counts.tolist()))]
        return self.unpermute(torch.cat(outs), order, weights.to(h.dtype)).view_as(h)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.rms_norm(x, self.attn_norm)).view(b, s, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        attn = self.out(self.attention(q, k, v).transpose(1, 2).reshape(b, s, d))
        h, x = self.add_rms_norm(attn, x, self.ffn_norm)
        return x + self._ffn(h)


class TinyDecoder(nn.Module):
    """``TinyDecoder(backend)(ids[B, S]) -> logits[B, S, vocab]``."""

    def __init__(self, backend: Backend, *, vocab_size: int = 256, dim: int = 64, heads: int = 4, ffn: int = 96,
                 experts: int = 4, top_k: int = 2, max_seq: int = 64):
        super().__init__()
        self.vocab_size = vocab_size
        self.embed = nn.Parameter(torch.randn(vocab_size, dim) * 0.5)
        self.layers = nn.ModuleList([_Layer(backend, dim, heads, ffn, 0, top_k),
                                     _Layer(backend, dim, heads, ffn, experts, top_k)])
        self.final_norm = nn.Parameter(torch.ones(dim))
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        cos, sin = rope_frequencies(dim // heads, max_seq)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.embedding, self.rms_norm = backend.op("embedding"), backend.op("rms_norm")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        s = ids.shape[1]
        x = self.embedding(ids, self.embed)
        for layer in self.layers:
            x = layer(x, self.cos[:s], self.sin[:s])
        return self.lm_head(self.rms_norm(x, self.final_norm))
