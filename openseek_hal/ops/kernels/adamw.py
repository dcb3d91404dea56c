"""Triton AdamW step over many tensors, updating parameters and moments in place.

One launch per tensor; with ``master_params`` the float32 master copy takes the update and the
(bf16) parameter is rewritten from it in the same pass, so the step reads and writes each byte once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._common import acc_type


@triton.jit
def _adamw_kernel(P, G, M, V, MASTER, HYPER, SCALE, n, HAS_MASTER: tl.constexpr, ACC: tl.constexpr,
                  BLOCK: tl.constexpr):
    # Hyperparameters come from a float64 tensor: a float argument would be rounded to float32.
    lr = tl.load(HYPER).to(ACC)
    beta1 = tl.load(HYPER + 1).to(ACC)
    beta2 = tl.load(HYPER + 2).to(ACC)
    eps = tl.load(HYPER + 3).to(ACC)
    weight_decay = tl.load(HYPER + 4).to(ACC)
    bias_c1 = tl.load(HYPER + 5).to(ACC)
    bias_c2_sqrt = tl.load(HYPER + 6).to(ACC)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if HAS_MASTER:
        p = tl.load(MASTER + offs, mask=mask).to(ACC)
    else:
        p = tl.load(P + offs, mask=mask).to(ACC)
    g = tl.load(G + offs, mask=mask).to(ACC) * tl.load(SCALE).to(ACC)
    m = tl.load(M + offs, mask=mask).to(ACC)
    v = tl.load(V + offs, mask=mask).to(ACC)
    p = p * (1.0 - lr * weight_decay)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    p = p - (lr / bias_c1) * m / (tl.sqrt(v) / bias_c2_sqrt + eps)
    tl.store(M + offs, m.to(M.dtype.element_ty), mask=mask)
    tl.store(V + offs, v.to(V.dtype.element_ty), mask=mask)
    if HAS_MASTER:
        tl.store(MASTER + offs, p.to(MASTER.dtype.element_ty), mask=mask)
    tl.store(P + offs, p.to(P.dtype.element_ty), mask=mask)


def adamw(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
          exp_avg_sqs: Sequence[torch.Tensor], *, lr: float, beta1: float = 0.9, beta2: float = 0.999,
          eps: float = 1e-8, weight_decay: float = 0.0, step: int,
          master_params: Sequence[torch.Tensor] | None = None, grad_scale: torch.Tensor | float | None = None):
    """In-place AdamW; returns ``(params, exp_avgs, exp_avg_sqs, master_params or [])``, the same tensors."""
    masters = list(master_params) if master_params is not None else []
    bias_c1 = 1.0 - beta1 ** step
    bias_c2_sqrt = (1.0 - beta2 ** step) ** 0.5
    block = 1024
    hyper = None
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)):
        for t in (p, g, m, v, *masters[i:i + 1]):
            if not t.is_contiguous():
                raise ValueError("adamw updates tensors in place and needs them contiguous")
        n = p.numel()
        if not n:
            continue
        master = masters[i] if masters else p
        if hyper is None:
            number = 1.0 if grad_scale is None or isinstance(grad_scale, torch.Tensor) else float(grad_scale)
            hyper = torch.tensor([lr, beta1, beta2, eps, weight_decay, bias_c1, bias_c2_sqrt, number],
                                 dtype=torch.float64)
            if p.device.type != "cpu":
                # from pinned memory the copy is asynchronous; from pageable memory it would make the host
                # wait for every kernel queued before it, leaving the device idle once per call
                hyper = hyper.pin_memory().to(p.device, non_blocking=True)
            scale = grad_scale.reshape(1) if isinstance(grad_scale, torch.Tensor) else hyper[7:]
        _adamw_kernel[(triton.cdiv(n, block),)](p, g, m, v, master, hyper, scale, n, HAS_MASTER=bool(masters),
                                                ACC=acc_type(master.dtype), BLOCK=block, num_warps=4)
    return list(params), list(exp_avgs), list(exp_avg_sqs), masters
