"""Triton `mla_qkv`: MLA's attention query and key built from the projections in one pass, and the
projections' gradients in one pass back.

A program takes ``BLOCK_T`` tokens and walks the heads. Forward: the query head's part without position
is copied and its rotary part rotated into ``q_out``; the key head's part without position is copied and
the shared rotary key, rotated once per token, is written into every head of ``k_out``. ``v`` is a view
of ``kv`` (no copy). Backward: ``dq`` gets ``dq_out``'s first part as it is and its rotary part rotated
back; ``dkv`` gets ``[dk_out[..., :Dn], dv]`` in one write (torch would zero-pad and add two
gradients); the shared key's gradient is summed over the heads in float32 in registers, in head order,
and rotated back once (rotations are linear).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_type
from .rope import _rope_offsets, _rotate_rows

BLOCK_T = 8  # tokens a program


@triton.jit
def _tokens(COS, SIN, n_tok, seq, nope, half, s_cs, ACC: tl.constexpr, INTERLEAVED: tl.constexpr,
            BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """This program's tokens (flat index, mask, batch and position), the lanes and masks of a head's part
    without position and of its rotary part, and the rotation tables of the tokens' positions (lane pairs,
    interleaved, or halves share an angle)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < n_tok
    t = tl.where(t_mask, t, 0).to(tl.int64)
    b, s = t // seq, t % seq
    n = tl.arange(0, BLOCK_N)
    n_mask = t_mask[:, None] & (n < nope)[None, :]
    r_off, r_ok = _rope_offsets(tl.arange(0, 2 * BLOCK_HALF), half, INTERLEAVED, BLOCK_HALF)
    r_mask = t_mask[:, None] & r_ok[None, :]
    i = tl.arange(0, BLOCK_HALF)
    i_mask = t_mask[:, None] & (i < half)[None, :]
    c = tl.load(COS + s[:, None] * s_cs + i[None, :], mask=i_mask, other=0.0).to(ACC)
    sn = tl.load(SIN + s[:, None] * s_cs + i[None, :], mask=i_mask, other=0.0).to(ACC)
    return t, t_mask, b, s, n, n_mask, r_off, r_mask, c, sn


@triton.jit
def _mla_qkv_fwd(Q, KV, KR, COS, SIN, QO, KO, n_tok, seq, heads, nope, half,
                 sq_b, sq_s, sq_h, skv_b, skv_s, skv_h, skr_b, skr_s, s_cs,
                 INTERLEAVED: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_HALF: tl.constexpr):
    t, t_mask, b, s, n, n_mask, r_off, r_mask, c, sn = _tokens(COS, SIN, n_tok, seq, nope, half, s_cs, ACC,
                                                               INTERLEAVED, BLOCK_T, BLOCK_N, BLOCK_HALF)
    kr = tl.load(KR + (b * skr_b + s * skr_s)[:, None] + r_off[None, :], mask=r_mask, other=0.0).to(ACC)
    kr = _rotate_rows(kr, c, sn, INTERLEAVED, BLOCK_T, BLOCK_HALF).to(KO.dtype.element_ty)
    width = nope + 2 * half  # q_out's and k_out's head size; both are contiguous (B, S, H, width)
    for h in range(0, heads):
        q_row = Q + b * sq_b + s * sq_s + h * sq_h
        out_row = (t * heads + h) * width
        x = tl.load(q_row[:, None] + n[None, :], mask=n_mask, other=0.0)
        tl.store(QO + out_row[:, None] + n[None, :], x, mask=n_mask)
        x = tl.load(q_row[:, None] + nope + r_off[None, :], mask=r_mask, other=0.0).to(ACC)
        x = _rotate_rows(x, c, sn, INTERLEAVED, BLOCK_T, BLOCK_HALF)
        tl.store(QO + out_row[:, None] + nope + r_off[None, :], x.to(QO.dtype.element_ty), mask=r_mask)
        kv_row = KV + b * skv_b + s * skv_s + h * skv_h
        x = tl.load(kv_row[:, None] + n[None, :], mask=n_mask, other=0.0)
        tl.store(KO + out_row[:, None] + n[None, :], x, mask=n_mask)
        tl.store(KO + out_row[:, None] + nope + r_off[None, :], kr, mask=r_mask)


@triton.jit
def _mla_qkv_bwd(DQO, DKO, DV, COS, SIN, DQ, DKV, DKR, n_tok, seq, heads, nope, half, v_dim,
                 sdq_b, sdq_s, sdq_h, sdk_b, sdk_s, sdk_h, sdv_b, sdv_s, sdv_h, s_cs,
                 INTERLEAVED: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_HALF: tl.constexpr):
    t, t_mask, b, s, n, n_mask, r_off, r_mask, c, sn = _tokens(COS, SIN, n_tok, seq, nope, half, s_cs, ACC,
                                                               INTERLEAVED, BLOCK_T, BLOCK_N, BLOCK_HALF)
    sn = -sn  # back: the opposite angle
    e = tl.arange(0, BLOCK_V)
    e_mask = t_mask[:, None] & (e < v_dim)[None, :]
    q_width = nope + 2 * half
    kv_width = nope + v_dim
    k_sum = tl.zeros([BLOCK_T, 2 * BLOCK_HALF], dtype=ACC)
    for h in range(0, heads):
        dq_row = DQO + b * sdq_b + s * sdq_s + h * sdq_h
        q_out = (t * heads + h) * q_width
        x = tl.load(dq_row[:, None] + n[None, :], mask=n_mask, other=0.0)
        tl.store(DQ + q_out[:, None] + n[None, :], x, mask=n_mask)
        x = tl.load(dq_row[:, None] + nope + r_off[None, :], mask=r_mask, other=0.0).to(ACC)
        x = _rotate_rows(x, c, sn, INTERLEAVED, BLOCK_T, BLOCK_HALF)
        tl.store(DQ + q_out[:, None] + nope + r_off[None, :], x.to(DQ.dtype.element_ty), mask=r_mask)
        dk_row = DKO + b * sdk_b + s * sdk_s + h * sdk_h
        kv_out = (t * heads + h) * kv_width
        x = tl.load(dk_row[:, None] + n[None, :], mask=n_mask, other=0.0)
        tl.store(DKV + kv_out[:, None] + n[None, :], x, mask=n_mask)
        k_sum += tl.load(dk_row[:, None] + nope + r_off[None, :], mask=r_mask, other=0.0).to(ACC)
        x = tl.load((DV + b * sdv_b + s * sdv_s + h * sdv_h)[:, None] + e[None, :], mask=e_mask, other=0.0)
        tl.store(DKV + kv_out[:, None] + nope + e[None, :], x, mask=e_mask)
    k_sum = _rotate_rows(k_sum, c, sn, INTERLEAVED, BLOCK_T, BLOCK_HALF)
    tl.store(DKR + (t * (2 * half))[:, None] + r_off[None, :], k_sum.to(DKR.dtype.element_ty), mask=r_mask)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _blocks(nope: int, rope_dim: int, v_dim: int) -> dict[str, int]:
    return dict(BLOCK_N=triton.next_power_of_2(max(nope, 1)), BLOCK_V=triton.next_power_of_2(max(v_dim, 1)),
                BLOCK_HALF=triton.next_power_of_2(max(rope_dim // 2, 1)))


class MlaQkv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, k_rope, cos, sin, interleaved):
        b, s, h, width = q.shape
        rope_dim = k_rope.shape[-1]
        nope = width - rope_dim
        v_dim = kv.shape[-1] - nope
        if rope_dim % 2 or cos.shape != (s, rope_dim // 2) or sin.shape != cos.shape:
            raise ValueError(f"mla_qkv: the rotary size {rope_dim} must be even and the tables ({s}, {rope_dim // 2}), "
                             f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
        q, kv, k_rope = _unit_last(q), _unit_last(kv), _unit_last(k_rope)
        cos, sin = cos.contiguous(), sin.contiguous()
        q_out = torch.empty((b, s, h, width), dtype=q.dtype, device=q.device)
        k_out = torch.empty((b, s, h, width), dtype=kv.dtype, device=kv.device)
        n_tok = b * s
        if n_tok and h:
            blocks = _blocks(nope, rope_dim, v_dim)
            del blocks["BLOCK_V"]
            _mla_qkv_fwd[(triton.cdiv(n_tok, BLOCK_T),)](
                q, kv, k_rope, cos, sin, q_out, k_out, n_tok, s, h, nope, rope_dim // 2,
                q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), kv.stride(2),
                k_rope.stride(0), k_rope.stride(1), cos.stride(0), INTERLEAVED=interleaved, ACC=acc_type(q.dtype),
                BLOCK_T=BLOCK_T, **blocks, num_warps=4)
        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        ctx.dims = (nope, rope_dim, v_dim)
        ctx.kinds = (q.dtype, kv.dtype, k_rope.dtype)
        return q_out, k_out, kv[..., nope:]

    @staticmethod
    def backward(ctx, dq_out, dk_out, dv):
        cos, sin = ctx.saved_tensors
        nope, rope_dim, v_dim = ctx.dims
        shape = dq_out.shape if dq_out is not None else dk_out.shape if dk_out is not None else dv.shape
        b, s, h = shape[:3]
        like = next(g for g in (dq_out, dk_out, dv) if g is not None)
        zeros = lambda d: torch.zeros((b, s, h, d), dtype=like.dtype, device=like.device)  # noqa: E731
        dq_out = _unit_last(dq_out) if dq_out is not None else zeros(nope + rope_dim)
        dk_out = _unit_last(dk_out) if dk_out is not None else zeros(nope + rope_dim)
        dv = _unit_last(dv) if dv is not None else zeros(v_dim)
        q_dtype, kv_dtype, kr_dtype = ctx.kinds
        dq = torch.empty((b, s, h, nope + rope_dim), dtype=q_dtype, device=like.device)
        dkv = torch.empty((b, s, h, nope + v_dim), dtype=kv_dtype, device=like.device)
        dkr = torch.empty((b, s, rope_dim), dtype=kr_dtype, device=like.device)
        n_tok = b * s
        if n_tok and h:
            _mla_qkv_bwd[(triton.cdiv(n_tok, BLOCK_T),)](
                dq_out, dk_out, dv, cos, sin, dq, dkv, dkr, n_tok, s, h, nope, rope_dim // 2, v_dim,
                dq_out.stride(0), dq_out.stride(1), dq_out.stride(2), dk_out.stride(0), dk_out.stride(1),
                dk_out.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), cos.stride(0),
                INTERLEAVED=ctx.interleaved, ACC=acc_type(like.dtype), BLOCK_T=BLOCK_T,
                **_blocks(nope, rope_dim, v_dim), num_warps=4)
        elif n_tok:
            dkr.zero_()
        return dq, dkv, dkr, None, None, None


def mla_qkv(q: torch.Tensor, kv: torch.Tensor, k_rope: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return MlaQkv.apply(q, kv, k_rope, cos, sin, interleaved)
