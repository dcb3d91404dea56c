"""Triton RMSNorm and fused residual-add + RMSNorm, forward and backward (`torch.autograd.Function`s).

Forward: one program per row, the row in registers; it keeps ``1/rms`` per row for the backward.
Backward: a persistent grid; each program walks a stride of rows, writes their input gradient and
accumulates its share of the weight gradient, which torch then sums over programs (a fixed order,
so the result is bitwise reproducible, unlike atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, acc_type, as_rows, block_for, persistent_programs, split_float, warps_for


@triton.jit
def _rms_norm_fwd(X, R, W, Y, S, RSTD, stride_x, stride_r, stride_y, stride_s, n_cols, eps_hi, eps_lo,
                  HAS_RESIDUAL: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(ACC)
    if HAS_RESIDUAL:
        x = x + tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(ACC)
        # The sum is rounded to the stream's dtype first: the normalized output must be the norm
        # of exactly the residual stream that is handed on.
        s = x.to(S.dtype.element_ty)
        tl.store(S + row * stride_s + cols, s, mask=mask)
        x = s.to(ACC)
    # eps arrives as two float32 halves (a float scalar argument is float32): in float64, eps rounded
    # to float32 moves rstd by ~1e-9 where the mean square is ~eps, and the backward's cancellation
    # turns that into ~1e-5 relative errors (found on H100 by the small-activation sample)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps_hi + eps_lo)
    w = tl.load(W + cols, mask=mask, other=0.0).to(ACC)
    tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd(DY, DS, X, W, RSTD, DX, DW_PART, stride_dy, stride_ds, stride_x, stride_dx,
                  n_rows, n_cols, HAS_DS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK], dtype=ACC)
    for r in range(pid, n_rows, tl.num_programs(0)):
        row = tl.cast(r, tl.int64)
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(ACC)
        rstd = tl.load(RSTD + row)
        x_hat = x * rstd
        g = dy * w
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / n_cols))
        if HAS_DS:
            dx += tl.load(DS + row * stride_ds + cols, mask=mask, other=0.0).to(ACC)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(DW_PART + pid * n_cols + cols, dw, mask=mask)


def _forward(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    # the kernels index the weight as a dense vector (a strided one would be read out of bounds)
    weight = weight.contiguous()
    x2 = as_rows(x)
    rows, n = x2.shape
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    rstd = torch.empty(rows, dtype=acc_dtype(x.dtype), device=x.device)
    if residual is not None:
        r2 = as_rows(residual)
        s = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    else:
        r2 = s = x2
    if rows:
        block = block_for(n)
        _rms_norm_fwd[(rows,)](x2, r2, weight, y, s, rstd, x2.stride(0), r2.stride(0), y.stride(0), s.stride(0),
                               n, *split_float(eps), HAS_RESIDUAL=residual is not None, ACC=acc_type(x.dtype),
                               BLOCK=block, num_warps=warps_for(block))
    return y, (s if residual is not None else x2), rstd, weight


def _backward(dy: torch.Tensor, ds: torch.Tensor | None, x2: torch.Tensor, weight: torch.Tensor,
              rstd: torch.Tensor):
    rows, n = x2.shape
    dy2 = as_rows(dy)
    ds2 = as_rows(ds) if ds is not None else dy2
    dx = torch.empty((rows, n), dtype=x2.dtype, device=x2.device)
    if not rows:
        return dx, torch.zeros_like(weight)
    programs = persistent_programs(x2.device, rows)
    dw_part = torch.empty((programs, n), dtype=acc_dtype(x2.dtype), device=x2.device)
    block = block_for(n)
    _rms_norm_bwd[(programs,)](dy2, ds2, x2, weight, rstd, dx, dw_part, dy2.stride(0), ds2.stride(0),
                               x2.stride(0), dx.stride(0), rows, n, HAS_DS=ds is not None,
                               ACC=acc_type(x2.dtype), BLOCK=block, num_warps=warps_for(block))
    return dx, dw_part.sum(0).to(weight.dtype)


class RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, x2, rstd, weight = _forward(x, None, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(dy, None, x2, weight, rstd)
        return dx.view(ctx.x_shape), dw, None


class AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        y, total, rstd, weight = _forward(x, residual, weight, eps)
        ctx.save_for_backward(total, weight, rstd)
        ctx.x_shape = x.shape
        ctx.set_materialize_grads(False)
        return y.view(x.shape), total.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dtotal):
        total, weight, rstd = ctx.saved_tensors
        if dy is None:
            return dtotal, dtotal, None, None
        dx, dw = _backward(dy, dtotal, total, weight, rstd)
        dx = dx.view(ctx.x_shape)
        # x and residual enter only through their sum, so they share one gradient (as torch's add does).
        return dx, dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return RMSNorm.apply(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    return AddRMSNorm.apply(x, residual, weight, eps)
