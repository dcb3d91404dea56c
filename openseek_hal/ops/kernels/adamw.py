"""Triton AdamW step over many tensors, updating parameters and moments in place.

One launch per tensor; with ``master_params`` the float32 master copy takes the update and the
(bf16) parameter is rewritten from it in the same pass, so the step reads and writes each byte once.
With ``param_remainders`` the master is the bf16 parameter's bits and an int16 remainder's (see
`openseek_hal.ops.optim`): 2 bytes of master read and written a parameter instead of 4, and no
separate rounded weight to write.

``lr`` and ``step`` given as device tensors are read by the kernel itself (the bias corrections computed
from ``step`` in float64 by squaring), and the constant hyperparameters come from a device tensor made
once per set of values: nothing is copied from the host per call, so the calls can be captured in a
device graph and replayed with new values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._common import acc_type


@triton.jit
def _power(base, exponent):
    """``base ** exponent`` for an int64 ``exponent`` >= 0, by squaring (float64)."""
    result = base * 0.0 + 1.0
    while exponent > 0:
        if exponent % 2 == 1:
            result = result * base
        base = base * base
        exponent = exponent // 2
    return result


@triton.jit
def _adamw_kernel(P, G, M, V, MASTER, HYPER, LR, STEP, SCALE, n, HAS_MASTER: tl.constexpr,
                  HAS_REMAINDER: tl.constexpr, DEVICE_SCHEDULE: tl.constexpr, ACC: tl.constexpr,
                  BLOCK: tl.constexpr):
    # Hyperparameters come from a float64 tensor: a float argument would be rounded to float32.
    beta1 = tl.load(HYPER + 1)
    beta2 = tl.load(HYPER + 2)
    eps = tl.load(HYPER + 3).to(ACC)
    weight_decay = tl.load(HYPER + 4).to(ACC)
    if DEVICE_SCHEDULE:
        lr = tl.load(LR).to(tl.float64).to(ACC)
        step = tl.load(STEP).to(tl.int64)
        bias_c1 = (1.0 - _power(beta1, step)).to(ACC)
        bias_c2_sqrt = tl.sqrt(1.0 - _power(beta2, step)).to(ACC)
    else:
        lr = tl.load(HYPER).to(ACC)
        bias_c1 = tl.load(HYPER + 5).to(ACC)
        bias_c2_sqrt = tl.load(HYPER + 6).to(ACC)
    beta1 = beta1.to(ACC)
    beta2 = beta2.to(ACC)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if HAS_REMAINDER:  # MASTER holds the int16 remainders of bf16 P: the fp32 master is the pair's bits
        high = tl.load(P + offs, mask=mask).to(tl.int16, bitcast=True).to(tl.int32)
        p = ((high << 16) + tl.load(MASTER + offs, mask=mask).to(tl.int32)).to(tl.float32, bitcast=True)
    elif HAS_MASTER:
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
    if HAS_REMAINDER:  # the upper half rounded (halves away from zero), and what it leaves
        bits = p.to(tl.float32).to(tl.int32, bitcast=True)
        high = (bits + 0x8000) >> 16
        tl.store(MASTER + offs, (bits - (high << 16)).to(tl.int16), mask=mask)
        tl.store(P + offs, high.to(tl.int16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        if HAS_MASTER:
            tl.store(MASTER + offs, p.to(MASTER.dtype.element_ty), mask=mask)
        tl.store(P + offs, p.to(P.dtype.element_ty), mask=mask)


def _float64_on(values: Sequence[float], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` as a float64 tensor on ``device``, with the host tensor it was copied from. From pinned
    memory the copy is asynchronous; from pageable memory it would make the host wait for every kernel
    queued before it, leaving the device idle once per call."""
    host = torch.tensor(values, dtype=torch.float64)
    if device.type == "cpu":
        return host, host
    host = host.pin_memory()
    return host, host.to(device, non_blocking=True)


_CONSTANTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (device, values) -> (pinned source, device copy)


def _constants(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """``values`` as a float64 device tensor, made once: its pinned source stays alive with it, so a copy
    recorded into a device graph reads the same values on every replay."""
    key = (str(device), values)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = _float64_on(values, device)
    return _CONSTANTS[key][1]


def adamw(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
          exp_avg_sqs: Sequence[torch.Tensor], *, lr: float | torch.Tensor, beta1: float = 0.9, beta2: float = 0.999,
          eps: float = 1e-8, weight_decay: float = 0.0, step: int | torch.Tensor,
          master_params: Sequence[torch.Tensor] | None = None, grad_scale: torch.Tensor | float | None = None,
          param_remainders: Sequence[torch.Tensor] | None = None):
    """In-place AdamW; returns ``(params, exp_avgs, exp_avg_sqs, master_params or param_remainders or [])``,
    the same tensors."""
    if master_params is not None and param_remainders is not None:
        raise ValueError("adamw: master_params and param_remainders are two forms of the master: give one")
    remainder = param_remainders is not None
    masters = list(param_remainders if remainder else master_params if master_params is not None else [])
    if remainder and any(p.dtype != torch.bfloat16 or r.dtype != torch.int16 or r.shape != p.shape
                         for p, r in zip(params, masters, strict=True)):
        raise ValueError("adamw: param_remainders are int16 tensors shaped like their bf16 params")
    device_schedule = isinstance(lr, torch.Tensor) or isinstance(step, torch.Tensor)
    if device_schedule and not (isinstance(lr, torch.Tensor) and isinstance(step, torch.Tensor)):
        raise ValueError("adamw: lr and step are both numbers or both device tensors")
    if not device_schedule:
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
            if device_schedule:
                hyper = _constants((0.0, beta1, beta2, eps, weight_decay, 0.0, 0.0, number), p.device)
                lr_ptr, step_ptr = lr.reshape(1), step.reshape(1)
            else:
                _, hyper = _float64_on([lr, beta1, beta2, eps, weight_decay, bias_c1, bias_c2_sqrt, number],
                                       p.device)
                lr_ptr = step_ptr = hyper
            scale = grad_scale.reshape(1) if isinstance(grad_scale, torch.Tensor) else hyper[7:]
        _adamw_kernel[(triton.cdiv(n, block),)](p, g, m, v, master, hyper, lr_ptr, step_ptr, scale, n,
                                                HAS_MASTER=bool(masters) and not remainder,
                                                HAS_REMAINDER=remainder, DEVICE_SCHEDULE=device_schedule,
                                                ACC=tl.float32 if remainder else acc_type(master.dtype), BLOCK=block,
                                                num_warps=4)
    return list(params), list(exp_avgs), list(exp_avg_sqs), masters
