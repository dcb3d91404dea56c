"""Triton RMSNorm and fused residual-add + RMSNorm, forward and backward (`torch.autograd.Function`s).

Forward: a program per ``ROWS`` rows (a ``ROWS x next_pow2(hidden)`` tile in registers); it keeps
``1/rms`` per row for the backward. Backward: a persistent grid; each program walks a stride of
``ROWS``-row blocks, writes their input gradient and accumulates its share of the weight gradient
(float32); a second kernel sums those partials over programs in a fixed order and writes the
weight's dtype (bitwise reproducible, unlike atomics). Launch parameters (rows per program, warps,
partials, pipelining stages) come from `launch.config`, a fixed function of the hidden size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from ._common import acc_dtype, acc_type, as_rows, block_for, persistent_programs, split_float


@triton.jit
def _rms_norm_fwd(X, R, W, Y, S, RSTD, stride_x, stride_r, stride_y, stride_s, n_rows, n_cols, eps_hi, eps_lo,
                  HAS_RESIDUAL: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
    if HAS_RESIDUAL:
        x = x + tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(ACC)
        # The sum is rounded to the stream's dtype first: the normalized output must be the norm
        # of exactly the residual stream that is handed on.
        s = x.to(S.dtype.element_ty)
        tl.store(S + rows[:, None] * stride_s + cols[None, :], s, mask=mask)
        x = s.to(ACC)
    # eps arrives as two float32 halves (a float scalar argument is float32): in float64, eps rounded
    # to float32 moves rstd by ~1e-9 where the mean square is ~eps, and the backward's cancellation
    # turns that into ~1e-5 relative errors (found on H100 by the small-activation sample)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps_hi + eps_lo)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], (x * rstd[:, None] * w[None, :]).to(Y.dtype.element_ty),
             mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd(DY, DS, X, W, RSTD, DX, DW_PART, stride_dy, stride_ds, stride_x, stride_dx,
                  n_rows, n_cols, HAS_DS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """Program ``pid`` takes the blocks of ``ROWS`` rows ``pid, pid + P, ...`` (P programs) and writes
    its weight-gradient partial, the sum over its rows in a fixed order, to ``DW_PART[pid]``."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)
    dw = tl.zeros([ROWS, BLOCK], dtype=ACC)
    for b in range(pid, tl.cdiv(n_rows, ROWS), tl.num_programs(0)):
        rows = tl.cast(b, tl.int64) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(ACC)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        x_hat = x * rstd[:, None]
        g = dy * w[None, :]
        dx = rstd[:, None] * (g - x_hat * (tl.sum(g * x_hat, axis=1) / n_cols)[:, None])
        if HAS_DS:
            dx += tl.load(DS + rows[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0).to(ACC)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat  # rows past the end loaded as zeros and add nothing
    tl.store(DW_PART + pid * n_cols + cols, tl.sum(dw, axis=0), mask=col_ok)


@triton.jit
def _sum_partials(PART, OUT, n_part, n_cols, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """``OUT[c] = sum_p PART[p, c]`` in a fixed order, cast to OUT's dtype (one launch, no torch sum + cast)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=ACC)
    for start in range(0, n_part, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        acc += tl.load(PART + p[:, None] * n_cols + cols[None, :], mask=(p < n_part)[:, None] & col_ok[None, :],
                       other=0.0)
    tl.store(OUT + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=col_ok)


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
        cfg = launch.config("add_rms_norm_fwd" if residual is not None else "rms_norm_fwd", n)
        _rms_norm_fwd[(triton.cdiv(rows, cfg["ROWS"]),)](
            x2, r2, weight, y, s, rstd, x2.stride(0), r2.stride(0), y.stride(0), s.stride(0), rows, n,
            *split_float(eps), HAS_RESIDUAL=residual is not None, ACC=acc_type(x.dtype), BLOCK=block,
            ROWS=cfg["ROWS"], num_warps=cfg["num_warps"])
    return y, (s if residual is not None else x2), rstd, weight


def _backward(dy: torch.Tensor, ds: torch.Tensor | None, x2: torch.Tensor, weight: torch.Tensor,
              rstd: torch.Tensor):
    rows, n = x2.shape
    dy2 = as_rows(dy)
    ds2 = as_rows(ds) if ds is not None else dy2
    dx = torch.empty((rows, n), dtype=x2.dtype, device=x2.device)
    if not rows:
        return dx, torch.zeros_like(weight)
    cfg = launch.config("add_rms_norm_bwd" if ds is not None else "rms_norm_bwd", n)
    programs = persistent_programs(x2.device, triton.cdiv(rows, cfg["ROWS"]), cfg["per_sm"])
    dw_part = torch.empty((programs, n), dtype=acc_dtype(x2.dtype), device=x2.device)
    block = block_for(n)
    _rms_norm_bwd[(programs,)](dy2, ds2, x2, weight, rstd, dx, dw_part, dy2.stride(0), ds2.stride(0),
                               x2.stride(0), dx.stride(0), rows, n, HAS_DS=ds is not None,
                               ACC=acc_type(x2.dtype), BLOCK=block, ROWS=cfg["ROWS"], num_warps=cfg["num_warps"],
                               num_stages=cfg["num_stages"])
    dw = torch.empty_like(weight)
    _sum_partials[(triton.cdiv(n, _SUM_COLS),)](dw_part, dw, programs, n, ACC=acc_type(x2.dtype), BLOCK_P=64,
                                                BLOCK_N=_SUM_COLS, num_warps=4)
    return dx, dw


_SUM_COLS = 32  # columns per program of the partials' sum: n / 32 programs, 128-byte rows of float32


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
