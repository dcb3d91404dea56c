"""Triton SwiGLU gate ``silu(gate) * up``, forward and backward (a `torch.autograd.Function`).

A 2-D grid of ``ROWS x BLOCK`` tiles: blocks of rows on the first axis, blocks of columns on the
second, so both short and wide rows fill the device; ``BLOCK``, ``ROWS`` and the warps come from
`launch.config` (column blocks that divide ``d`` where they can, so no block is mostly masked).
The backward recomputes ``silu`` from the saved input instead of storing it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from ._common import acc_type, as_rows


@triton.jit
def _silu_and_mul_fwd(X, Y, stride_x, stride_y, n_rows, d, ACC: tl.constexpr, BLOCK: tl.constexpr,
                      ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < d)[None, :]
    x = X + rows[:, None] * stride_x + cols[None, :]
    gate = tl.load(x, mask=mask, other=0.0).to(ACC)
    up = tl.load(x + d, mask=mask, other=0.0).to(ACC)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _silu_and_mul_bwd(DY, X, DX, stride_dy, stride_x, stride_dx, n_rows, d, ACC: tl.constexpr,
                      BLOCK: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < d)[None, :]
    x = X + rows[:, None] * stride_x + cols[None, :]
    dx = DX + rows[:, None] * stride_dx + cols[None, :]
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(ACC)
    gate = tl.load(x, mask=mask, other=0.0).to(ACC)
    up = tl.load(x + d, mask=mask, other=0.0).to(ACC)
    sig = 1.0 / (1.0 + tl.exp(-gate))
    silu = gate * sig
    dgate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(dx, dgate.to(DX.dtype.element_ty), mask=mask)
    tl.store(dx + d, (dy * silu).to(DX.dtype.element_ty), mask=mask)


def _launch(kernel: str, rows: int, d: int) -> tuple[tuple[int, int], dict[str, int]]:
    """Grid and launch parameters from `launch.config` (BLOCK capped at the row's next power of two)."""
    cfg = launch.config(kernel, d)
    block = min(cfg["BLOCK"], triton.next_power_of_2(d))
    return ((triton.cdiv(rows, cfg["ROWS"]), triton.cdiv(d, block)),
            dict(BLOCK=block, ROWS=cfg["ROWS"], num_warps=cfg["num_warps"]))


class SiluAndMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        if x.shape[-1] % 2:
            raise ValueError(f"silu_and_mul needs an even last dimension, got {x.shape[-1]}")
        x2 = as_rows(x)
        rows, d = x2.shape[0], x2.shape[1] // 2
        y = torch.empty((rows, d), dtype=x.dtype, device=x.device)
        if rows and d:
            grid, params = _launch("silu_and_mul_fwd", rows, d)
            _silu_and_mul_fwd[grid](x2, y, x2.stride(0), y.stride(0), rows, d, ACC=acc_type(x.dtype), **params)
        ctx.save_for_backward(x2)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], d)

    @staticmethod
    def backward(ctx, dy):
        (x2,) = ctx.saved_tensors
        rows, d = x2.shape[0], x2.shape[1] // 2
        dy2 = as_rows(dy)
        dx = torch.empty_like(x2, memory_format=torch.contiguous_format)
        if rows and d:
            grid, params = _launch("silu_and_mul_bwd", rows, d)
            _silu_and_mul_bwd[grid](dy2, x2, dx, dy2.stride(0), x2.stride(0), dx.stride(0), rows, d,
                                    ACC=acc_type(x2.dtype), **params)
        return dx.view(ctx.x_shape)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return SiluAndMul.apply(x)
