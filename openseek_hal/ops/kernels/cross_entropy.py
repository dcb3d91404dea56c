"""Triton cross entropy over large vocabularies (chunked online softmax), forward and backward.

The forward reads each row of logits once in chunks, keeping a running max and sum of exponentials
in registers: no float32 copy of the logits is ever made. It saves only ``logsumexp`` per row. The
backward reads the logits again and writes the gradient chunk by chunk; with
``inplace_backward=True`` it writes into the logits' own storage, so the whole loss adds almost no
memory (use it when nothing else needs the logits after the loss, as in training).

``linear_cross_entropy`` (an output head and its loss) needs no second pass at all: its forward kernel
writes the gradient of the mean loss over the logits right after their ``logsumexp`` (``GRAD``; it walks
the row back from its end, whose chunks were read last and are the likeliest still in L2, though with
hundreds of 300 KB rows in flight most are not), and the backward only runs the two matmuls, folding the
upstream gradient into the small operands (the input and its gradient, ``N x H``) instead of the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import acc_dtype, acc_type, as_rows


@triton.jit
def _grad_scales(SCALE, keep, lse, z_loss, ACC: tl.constexpr):
    """A row's factors of d(SCALE * loss)/d(logits): on the target (``scale``) and on the softmax, where the
    z-loss adds ``2 z lse`` (``p_scale``); both 0 for an ignored row."""
    scale = tl.where(keep, tl.load(SCALE).to(ACC), 0.0)
    return scale, scale * (1.0 + tl.where(z_loss != 0, 2.0 * z_loss * lse, 0.0))


@triton.jit
def _dlogits(x, offs, target, lse, scale, p_scale):
    """The gradient over a chunk of a row's logits ``x`` (columns ``offs``)."""
    return tl.exp(x - lse) * p_scale - tl.where(offs == target, scale, 0.0)


@triton.jit
def _ce_fwd(X, T, LOSS, LSE, SCALE, stride_x, n_cols, ignore_index, z_loss, ACC: tl.constexpr, BLOCK: tl.constexpr,
            GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    cols = tl.arange(0, BLOCK)
    m = tl.full([], float("-inf"), ACC)
    total = tl.zeros([], ACC)
    for start in range(0, n_cols, BLOCK):
        offs = start + cols
        x = tl.load(x_row + offs, mask=offs < n_cols, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    # a +inf logit makes logsumexp +inf (as torch's); the online sum itself would be inf - inf = NaN
    lse = tl.where(m == float("inf"), m, m + tl.log(total))
    target = tl.load(T + row)
    keep = target != ignore_index
    x_t = tl.load(x_row + tl.where(keep, target, 0)).to(ACC)
    loss = lse - x_t + tl.where(z_loss != 0, z_loss * lse * lse, 0.0)  # 0 * inf would be NaN
    tl.store(LOSS + row, tl.where(keep, loss, 0.0))
    tl.store(LSE + row, lse)
    if GRAD:  # the gradient of SCALE * loss, written over the logits, last chunk first (read last)
        scale, p_scale = _grad_scales(SCALE, keep, lse, z_loss, ACC)
        last = ((n_cols - 1) // BLOCK) * BLOCK
        for i in range(0, n_cols, BLOCK):
            offs = last - i + cols
            mask = offs < n_cols
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(ACC)
            dx = _dlogits(x, offs, target, lse, scale, p_scale)
            tl.store(x_row + offs, dx.to(X.dtype.element_ty), mask=mask)


@triton.jit
def _ce_bwd(X, T, LSE, SCALE, DX, stride_x, stride_dx, n_cols, ignore_index, z_loss,
            ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    target = tl.load(T + row)
    lse = tl.load(LSE + row)
    scale, p_scale = _grad_scales(SCALE, target != ignore_index, lse, z_loss, ACC)
    for start in range(0, n_cols, BLOCK):
        offs = start + cols
        mask = offs < n_cols
        x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(ACC)
        dx = _dlogits(x, offs, target, lse, scale, p_scale)
        tl.store(DX + row * stride_dx + offs, dx.to(DX.dtype.element_ty), mask=mask)


def _block(n_cols: int, kind: str) -> tuple[int, int]:
    """(BLOCK, num_warps) of a row's chunks. Measured on an H100 at 8192 x 151872 bf16
    (benchmarks/ops/ce_sweep.py): the forward is bound by its per-chunk reductions, so wide chunks on few
    warps (more rows in flight) win: 8192 x 4 warps 0.80 ms against 1.03 at 4096 x 16 (103% and 79% of
    copy); the backward is at 92% of copy with 4096 x 16; the fused loss-and-gradient 2.42 ms at 8192 x 16
    against 2.54 at 4096 x 16."""
    block = triton.next_power_of_2(max(n_cols, 1))
    if kind == "fwd":
        block = min(block, 8192)
        return block, max(1, min(4, block // 256))
    if kind == "fused":
        block = min(block, 8192)
        return block, max(1, min(16, block // 512))
    block = min(block, 4096)
    return block, max(1, min(16, block // 256))


def _row_losses(x2: torch.Tensor, target: torch.Tensor, ignore_index: int, z_loss: float,
                grad_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's loss and ``logsumexp`` of the logits ``x2`` (rows x vocab, unit column stride; ``target``
    a dense vector); with ``grad_scale`` (a 1-element tensor) the gradient of ``grad_scale * sum(losses)``
    is also written over ``x2`` (the fused kernel)."""
    rows, n_cols = x2.shape
    acc = acc_dtype(x2.dtype)
    losses = torch.empty(rows, dtype=acc, device=x2.device)
    lse = torch.empty(rows, dtype=acc, device=x2.device)
    if rows:
        fused = grad_scale is not None
        block, warps = _block(n_cols, "fused" if fused else "fwd")
        _ce_fwd[(rows,)](x2, target, losses, lse, grad_scale if fused else lse, x2.stride(0), n_cols, ignore_index,
                         z_loss, ACC=acc_type(x2.dtype), BLOCK=block, GRAD=fused, num_warps=warps)
    return losses, lse


class CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index, reduction, z_loss, inplace_backward):
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        x2 = as_rows(logits)
        acc = acc_dtype(logits.dtype)
        target = target.reshape(-1).contiguous()  # read as a dense vector by the kernels
        losses, lse = _row_losses(x2, target, ignore_index, z_loss)
        total = losses.sum()
        if reduction == "mean":
            kept = (target != ignore_index).sum().clamp(min=1).to(acc)
            total = total / kept
        else:
            kept = torch.ones((), dtype=acc, device=logits.device)
        ctx.save_for_backward(x2, target, lse, kept)
        ctx.config = (ignore_index, z_loss, inplace_backward, logits.shape)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        x2, target, lse, kept = ctx.saved_tensors
        ignore_index, z_loss, inplace, shape = ctx.config
        rows, n_cols = x2.shape
        dx = x2 if inplace else torch.empty((rows, n_cols), dtype=x2.dtype, device=x2.device)
        if rows:
            scale = (grad_out.to(kept.dtype) / kept).reshape(1)
            block, warps = _block(n_cols, "bwd")
            _ce_bwd[(rows,)](x2, target, lse, scale, dx, x2.stride(0), dx.stride(0), n_cols, ignore_index, z_loss,
                             ACC=acc_type(x2.dtype), BLOCK=block, num_warps=warps)
        return dx.view(shape), None, None, None, None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100, reduction: str = "mean",
                  z_loss: float = 0.0, inplace_backward: bool = False) -> torch.Tensor:
    return CrossEntropy.apply(logits, target, ignore_index, reduction, z_loss, inplace_backward)


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, target, ignore_index, z_loss):
        x2 = x.reshape(-1, x.shape[-1])
        logits = F.linear(x2, weight)  # [N, V], x's dtype: overwritten below by the loss's gradient
        target = target.reshape(-1).contiguous()
        scale = 1.0 / (target != ignore_index).sum().clamp(min=1).to(acc_dtype(logits.dtype)).reshape(1)
        losses, _ = _row_losses(logits, target, ignore_index, z_loss, grad_scale=scale)
        ctx.save_for_backward(x2, weight, logits)
        ctx.shape = x.shape
        return losses.sum() * scale[0]

    @staticmethod
    def backward(ctx, grad_out):
        x2, weight, dlogits = ctx.saved_tensors  # dlogits: d(mean loss)/d(logits), upstream gradient 1
        g = grad_out.to(acc_dtype(x2.dtype))
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(dlogits, weight).mul_(g).view(ctx.shape)
        if ctx.needs_input_grad[1]:
            dw = torch.mm(dlogits.t(), x2 * g)  # x2 * g is x2 itself (no rounding) when g == 1
        return dx, dw, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                         z_loss: float = 0.0) -> torch.Tensor:
    return LinearCrossEntropy.apply(x, weight, target, ignore_index, z_loss)
