"""Triton SwiGLU gate ``silu(gate) * up``, forward and backward (a `torch.autograd.Function`).

A 2-D grid: rows on the first axis, blocks of columns on the second, so both short and wide rows
fill the device. The backward recomputes ``silu`` from the saved input instead of storing it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_type, as_rows, warps_for


@triton.jit
def _silu_and_mul_fwd(X, Y, stride_x, stride_y, d, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(ACC)
    up = tl.load(X + row * stride_x + d + cols, mask=mask, other=0.0).to(ACC)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _silu_and_mul_bwd(DY, X, DX, stride_dy, stride_x, stride_dx, d, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(ACC)
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(ACC)
    up = tl.load(X + row * stride_x + d + cols, mask=mask, other=0.0).to(ACC)
    sig = 1.0 / (1.0 + tl.exp(-gate))
    silu = gate * sig
    dgate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(DX + row * stride_dx + cols, dgate.to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + row * stride_dx + d + cols, (dy * silu).to(DX.dtype.element_ty), mask=mask)


def _grid(rows: int, d: int) -> tuple[tuple[int, int], int]:
    block = min(triton.next_power_of_2(max(d, 1)), 2048)
    return (rows, triton.cdiv(d, block)), block


class SiluAndMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        if x.shape[-1] % 2:
            raise ValueError(f"silu_and_mul needs an even last dimension, got {x.shape[-1]}")
        x2 = as_rows(x)
        rows, d = x2.shape[0], x2.shape[1] // 2
        y = torch.empty((rows, d), dtype=x.dtype, device=x.device)
        if rows and d:
            grid, block = _grid(rows, d)
            _silu_and_mul_fwd[grid](x2, y, x2.stride(0), y.stride(0), d, ACC=acc_type(x.dtype), BLOCK=block,
                                    num_warps=warps_for(block * 4))
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
            grid, block = _grid(rows, d)
            _silu_and_mul_bwd[grid](dy2, x2, dx, dy2.stride(0), x2.stride(0), dx.stride(0), d,
                                    ACC=acc_type(x2.dtype), BLOCK=block, num_warps=warps_for(block * 4))
        return dx.view(ctx.x_shape)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return SiluAndMul.apply(x)
