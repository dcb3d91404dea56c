"""Causal scaled-dot-product attention whose query/key head dim may differ from the value's (MLA)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .opdef import OpDef, Sample, randn


def document_ids(cu_seqlens: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """``[batch, seq]``: the document of every token, from ``cu_seqlens``, the int32 (or int64)
    boundaries ``0 = cu[0] <= cu[1] <= ... <= cu[-1] = batch * seq`` over the *flattened* tokens
    (flash-attn's varlen convention; a document that straddles two rows is cut at the row end, as the
    rows never attend to each other). Raises ``ValueError`` on boundaries that break that rule."""
    if cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point() or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be a 1-d integer tensor of boundaries, got {tuple(cu_seqlens.shape)} "
                         f"{cu_seqlens.dtype}")
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    if int(cu[0]) != 0 or int(cu[-1]) != batch * seq or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to batch*seq = {batch * seq}, got {cu.tolist()[:8]}...")
    return unchecked_document_ids(cu, batch, seq)


def unchecked_document_ids(cu_seqlens: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """`document_ids` without its checks: device ops only, so no host read (a captured step may call it)."""
    cu = cu_seqlens.to(torch.int64)
    flat = torch.arange(batch * seq, dtype=torch.int64, device=cu.device)
    return (torch.searchsorted(cu, flat, right=True) - 1).view(batch, seq)


def eos_boundaries(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """``cu_seqlens`` for packed rows ``input_ids[B, S]`` whose documents each end with ``eos_id``: a document
    starts at every row start and after every end-of-text token (which belongs to the document it ends).

    Device ops only, and a fixed length whatever the data (``B * S + B + 1`` boundaries, repeated ones
    standing for empty documents, which `document_ids` and the kernels allow): a captured training step
    replays it on every batch."""
    b, s = input_ids.shape
    n = b * s
    flat = torch.arange(n, device=input_ids.device, dtype=torch.int64)
    # after an end-of-text token, unless it ends its row (the next row's start is a boundary anyway)
    after_eos = torch.where((input_ids.reshape(-1) == eos_id) & ((flat + 1) % max(s, 1) != 0), flat + 1, n)
    rows = torch.arange(0, n, max(s, 1), device=input_ids.device, dtype=torch.int64)[:b]
    last = torch.full((1,), n, device=input_ids.device, dtype=torch.int64)
    return torch.cat([rows, after_eos, last]).sort().values.to(torch.int32)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale + causal_mask) v`` on ``(batch, heads, seq, dim)`` tensors.

    With ``cu_seqlens`` (see `document_ids`; needs as many keys as queries) the mask is also
    block-diagonal: a token attends only to the earlier tokens of its own document (packed sequences).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    s_q, s_k = q.shape[-2], k.shape[-2]
    mask = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril(diagonal=s_k - s_q)
    if cu_seqlens is not None:
        if s_q != s_k:
            raise ValueError(f"cu_seqlens needs as many keys as queries, got {s_q} and {s_k}")
        doc = document_ids(cu_seqlens, q.shape[0], s_q).to(q.device)
        mask = mask & (doc[:, :, None] == doc[:, None, :])[:, None]  # [B, 1, S, S]
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v.to(acc)).to(q.dtype)


class _GradInOutputLayout(torch.autograd.Function):
    """Identity whose backward hands on the gradient in the output's own strides.

    PyTorch's cuDNN attention backward (torch 2.11, H100/H200) caches its execution plan per shape
    without the upstream gradient's strides: after a first backward with the gradient laid out like
    the output (the attention selector's timing does that), a later one at the same shape with another
    layout (a contiguous gradient of a ``(B,S,H,D)``-strided output) returned wrong dq, dk and dv
    (relative error ~1; found by `conform --backend cuda`). One layout per output rules that out."""

    @staticmethod
    def forward(ctx, out: torch.Tensor) -> torch.Tensor:
        ctx.layout = (out.size(), out.stride())
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        size, stride = ctx.layout
        if grad.stride() == stride:
            return grad
        return torch.empty_strided(size, stride, dtype=grad.dtype, device=grad.device).copy_(grad)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    if out.requires_grad:
        out = _GradInOutputLayout.apply(out)
    return out


def sdpa_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          scale: float | None = None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """`causal_attention` through torch's fused ``scaled_dot_product_attention``.

    With ``cu_seqlens`` it passes an explicit ``[B, 1, S, S]`` boolean mask (torch's flash kernel
    takes none, so a slower one runs, and the mask is ``S x S`` memory): the Triton kernel of
    ``ops/kernels/attention.py`` handles packed documents without it."""
    if cu_seqlens is not None:
        if q.numel() == 0 or k.numel() == 0:
            return causal_attention(q, k, v, scale, cu_seqlens)
        s = q.shape[-2]
        doc = document_ids(cu_seqlens, q.shape[0], s).to(q.device)
        mask = torch.ones(s, s, dtype=torch.bool, device=q.device).tril() & (doc[:, :, None] == doc[:, None, :])
        return _sdpa(q, k, v, attn_mask=mask[:, None], scale=scale)
    if q.numel() == 0 or k.numel() == 0:
        # the CUDA flash kernel returns None for an empty bf16 batch (torch 2.11, found by conformance)
        return causal_attention(q, k, v, scale)
    return _sdpa(q, k, v, is_causal=True, scale=scale)


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
    # packed documents (cu_seqlens over the flattened B*S tokens): documents of 1 token, one that
    # straddles the two rows (cut there), boundaries inside and across the 16/32-wide blocks
    for b, s, dqk, dv, cu in [(2, 40, 24, 16, [0, 1, 7, 30, 47, 48, 80]),
                              (1, 130, 192, 128, [0, 5, 64, 65, 100, 130])]:
        q, k = (randn(b, 2, s, dqk, dtype=dtype, device=device, generator=gen) for _ in range(2))
        v = randn(b, 2, s, dv, dtype=dtype, device=device, generator=gen)
        cu_seqlens = torch.tensor(cu, dtype=torch.int32, device=device)
        yield Sample((q, k, v), {"scale": dqk ** -0.5, "cu_seqlens": cu_seqlens},
                     f"B{b}H2S{s}Dqk{dqk}Dv{dv}:cu_seqlens{len(cu) - 1}", max(s, dqk, dv))
    # the model's layout: (B, H, S, D) views of (B, S, H, D) projections; v a slice of a wider k|v tensor
    kv = randn(2, 24, 3, 48 + 32, dtype=dtype, device=device, generator=gen)
    q = randn(2, 24, 3, 48, dtype=dtype, device=device, generator=gen).transpose(1, 2)
    k, v = (t.transpose(1, 2) for t in kv.split([48, 32], dim=-1))
    yield Sample((q, k, v), {"scale": 0.2}, "B2H3S24Dqk48Dv32-bshd-views", 48)


OPDEFS = [OpDef(name="causal_attention",
                signature="causal_attention(q[B,H,S,Dqk], k[B,H,S,Dqk], v[B,H,S,Dv], scale=None, cu_seqlens=None) "
                          "-> o[B,H,S,Dv]",
                reference=causal_attention, samples=_samples)]
