"""Triton rotary embedding for both layouts (interleaved pairs and rotated halves), forward and backward.

``x`` is ``(..., S, D)`` with any strides over the leading dims (up to two leading dims are walked
by stride, so a transposed ``(B, S, H, D) -> (B, H, S, D)`` view is read in place, not copied).
The backward is the same kernel rotating by the opposite angle. The cos/sin tables may hold any
scaling (plain rope, YaRN with mscale): the kernel only reads them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from ._common import acc_type


@triton.jit
def _rotate_rows(x, c, sn, INTERLEAVED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate rows ``x`` ([BLOCK_T, 2 * BLOCK_HALF], as stored) by the angles of ``c``, ``sn``: the pairs are
    split in registers, so a row is read and written as one contiguous block in either layout."""
    if INTERLEAVED:
        x1, x2 = tl.split(tl.reshape(x, [BLOCK_T, BLOCK_HALF, 2]))
        return tl.reshape(tl.join(x1 * c - x2 * sn, x2 * c + x1 * sn), [BLOCK_T, 2 * BLOCK_HALF])
    x1, x2 = tl.split(tl.permute(tl.reshape(x, [BLOCK_T, 2, BLOCK_HALF]), [0, 2, 1]))
    return tl.reshape(tl.permute(tl.join(x1 * c - x2 * sn, x2 * c + x1 * sn), [0, 2, 1]), [BLOCK_T, 2 * BLOCK_HALF])


@triton.jit
def _rope_offsets(d, half, INTERLEAVED: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Where lane ``d`` of a [2 * BLOCK_HALF] row block lies in a stored rotary part of ``2 * half``, and
    whether it exists (the block is padded to powers of two per half)."""
    if INTERLEAVED:
        return d, d < 2 * half
    j = d % BLOCK_HALF
    return (d // BLOCK_HALF) * half + j, j < half


@triton.jit
def _rope_kernel(X, COS, SIN, Y, n_mid, seq, half, n_seq_blocks, n_head_blocks, stride_xa, stride_xb, stride_xs,
                 stride_cs, stride_ya, stride_yb, stride_ys, SIGN: tl.constexpr, INTERLEAVED: tl.constexpr,
                 ACC: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr, HEADS: tl.constexpr):
    """A program rotates ``BLOCK_ROWS`` positions of ``HEADS`` consecutive heads (the middle dim of
    ``(A, B, S, D)``): the angles of its positions are read once and reused for each head."""
    pid = tl.program_id(0)
    s_block = pid % n_seq_blocks
    head_block = ((pid // n_seq_blocks) % n_head_blocks).to(tl.int64)
    a = (pid // (n_seq_blocks * n_head_blocks)).to(tl.int64)
    s = s_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = s < seq
    s = tl.where(row_mask, s, 0).to(tl.int64)
    x_pos = X + a * stride_xa + s * stride_xs
    y_pos = Y + a * stride_ya + s * stride_ys
    i = tl.arange(0, BLOCK_HALF)
    mask = row_mask[:, None] & (i < half)[None, :]
    c = tl.load(COS + s[:, None] * stride_cs + i[None, :], mask=mask, other=0.0).to(ACC)
    sn = tl.load(SIN + s[:, None] * stride_cs + i[None, :], mask=mask, other=0.0).to(ACC) * SIGN
    if INTERLEAVED:
        d, d_ok = _rope_offsets(tl.arange(0, 2 * BLOCK_HALF), half, True, BLOCK_HALF)
        d_mask = row_mask[:, None] & d_ok[None, :]
    for h in tl.static_range(HEADS):
        b = head_block * HEADS + h
        x_row = x_pos + b * stride_xb
        y_row = y_pos + b * stride_yb
        head_ok = row_mask & (b + 0 * s < n_mid)  # as a vector: the interpreter's masks reject scalar & vector
        if INTERLEAVED:
            # One contiguous row split into its pairs in registers: two stride-2 loads ran an order of
            # magnitude slower on an H100.
            m = d_mask & head_ok[:, None]
            x = tl.load(x_row[:, None] + d[None, :], mask=m, other=0.0).to(ACC)
            y = _rotate_rows(x, c, sn, True, BLOCK_ROWS, BLOCK_HALF)
            tl.store(y_row[:, None] + d[None, :], y.to(Y.dtype.element_ty), mask=m)
        else:
            # Two half-row loads. One row split by a register permute (as `mla_qkv` does on its few tokens)
            # compiled for sm_90 to 255 registers and a 728-byte spill at 64 rows x 4 warps
            # (memops_sm90_resources.py); lanes loading their pair's lane as well were no faster (docs/ops.md).
            m = mask & head_ok[:, None]
            x1 = tl.load(x_row[:, None] + i[None, :], mask=m, other=0.0).to(ACC)
            x2 = tl.load(x_row[:, None] + half + i[None, :], mask=m, other=0.0).to(ACC)
            tl.store(y_row[:, None] + i[None, :], (x1 * c - x2 * sn).to(Y.dtype.element_ty), mask=m)
            tl.store(y_row[:, None] + half + i[None, :], (x2 * c + x1 * sn).to(Y.dtype.element_ty), mask=m)


def _as_4d(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``(A, B, S, D)`` with a unit stride on D, viewing (not copying) whenever possible."""
    if x.dim() < 2:
        raise ValueError(f"rope needs x of shape (..., seq, dim), got {tuple(x.shape)}")
    if x.dim() > 4:
        x = x.reshape(-1, *x.shape[-3:])
    while x.dim() < 4:
        x = x.unsqueeze(0)
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, sign: int) -> torch.Tensor:
    seq, dim = x.shape[-2], x.shape[-1]
    if dim % 2:
        raise ValueError(f"rope needs an even head dim, got {dim}")
    if cos.shape != (seq, dim // 2) or sin.shape != cos.shape:
        raise ValueError(f"rope tables must be ({seq}, {dim // 2}), got {tuple(cos.shape)} and {tuple(sin.shape)}")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if not x.numel():
        return y
    x4, y4 = _as_4d(x), _as_4d(y)
    cos, sin = cos.contiguous(), sin.contiguous()
    block_half = triton.next_power_of_2(dim // 2)
    cfg = launch.config("rope", dim)
    # a program's rows are positions of one head: at most the sequence (a short one would leave most masked)
    block_rows = min(cfg["ROWS"], triton.next_power_of_2(seq))
    heads = min(cfg.get("HEADS", 1), triton.next_power_of_2(x4.shape[1]))
    seq_blocks, head_blocks = triton.cdiv(seq, block_rows), triton.cdiv(x4.shape[1], heads)
    _rope_kernel[(x4.shape[0] * head_blocks * seq_blocks,)](
        x4, cos, sin, y4, x4.shape[1], seq, dim // 2, seq_blocks, head_blocks, x4.stride(0), x4.stride(1),
        x4.stride(2), cos.stride(0), y4.stride(0), y4.stride(1), y4.stride(2), SIGN=sign, INTERLEAVED=interleaved,
        ACC=acc_type(x.dtype), BLOCK_ROWS=block_rows, BLOCK_HALF=block_half, HEADS=heads,
        num_warps=cfg["num_warps"])
    return y


class Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, interleaved):
        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        return _rotate(x, cos, sin, interleaved, 1)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        # A rotation's transpose is the rotation by the opposite angle.
        return _rotate(dy, cos, sin, ctx.interleaved, -1), None, None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    return Rope.apply(x, cos, sin, interleaved)
