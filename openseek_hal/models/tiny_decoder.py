"""A small decoder-only transformer built from HAL ops (RMSNorm, rope attention, SwiGLU).

It is the foundation's end-to-end model for `openseek-hal train`; every numeric op goes through
``backend.op(...)``, resolved once per module, so the same code runs on every backend.
"""

from __future__ import annotations

import torch
from torch import nn

from ..backend import Backend
from ..ops.rope import rope_frequencies
from ..train.config import TinyDecoderConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, backend: Backend):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self._rms_norm = backend.op("rms_norm")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: TinyDecoderConfig, backend: Backend):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self._rope = backend.op("rope")
        self._attention = backend.op("causal_attention")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        out = self._attention(q, k, v, self.head_dim ** -0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TinyDecoderConfig, backend: Backend):
        super().__init__()
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self._silu_and_mul = backend.op("silu_and_mul")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self._silu_and_mul(self.gate_up(x)))


class Block(nn.Module):
    def __init__(self, cfg: TinyDecoderConfig, backend: Backend):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend)
        self.attn = Attention(cfg, backend)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend)
        self.mlp = MLP(cfg, backend)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class TinyDecoder(nn.Module):
    def __init__(self, cfg: TinyDecoderConfig, backend: Backend):
        super().__init__()
        self.config = cfg
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(Block(cfg, backend) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._embedding = backend.op("embedding")
        self._cross_entropy = backend.op("cross_entropy")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        depth_scale = (2 * self.config.num_hidden_layers) ** -0.5
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                # residual-branch outputs scaled down with depth (GPT-2 / OpenSeek practice)
                residual_out = name.endswith(("o_proj.weight", "down.weight"))
                nn.init.normal_(p, std=std * (depth_scale if residual_out else 1.0))
            else:
                nn.init.ones_(p)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids[B, S]`` -> logits ``[B, S, vocab]``."""
        seq = input_ids.shape[1]
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        cos, sin = rope_frequencies(head_dim, seq, self.config.rope_theta, device=input_ids.device)
        x = self._embedding(input_ids, self.embed)
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.norm(x)
        weight = self.embed if self.lm_head is None else self.lm_head.weight
        return x @ weight.t()

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross entropy; ``labels`` are already shifted (``-100`` is ignored)."""
        logits = self(input_ids)
        return self._cross_entropy(logits.flatten(0, 1), labels.flatten())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x parameters in matmuls + attention scores (PaLM appendix B)."""
        cfg = self.config
        matmul_params = self.num_parameters() - sum(p.numel() for p in self.parameters() if p.dim() == 1)
        return 6 * matmul_params + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len
