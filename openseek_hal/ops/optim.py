"""The AdamW step over many tensors (reference and OpDef); fp32 master weights for bf16 parameters optional.

This op has no backward (``differentiable=False``). The reference is functional: it returns new
tensors ``(params, exp_avgs, exp_avg_sqs, master_params)`` so that conformance can compare them;
fast implementations update the given tensors in place and return those same tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .opdef import OpDef, Sample, randn


def adamw(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
          exp_avg_sqs: Sequence[torch.Tensor], *, lr: float | torch.Tensor, beta1: float = 0.9, beta2: float = 0.999,
          eps: float = 1e-8, weight_decay: float = 0.0, step: int | torch.Tensor,
          master_params: Sequence[torch.Tensor] | None = None, grad_scale: torch.Tensor | float | None = None
          ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """One decoupled-weight-decay Adam step (``torch.optim.AdamW``'s update) with ``step`` >= 1.

    With ``master_params`` the update is applied to the master copies and each parameter becomes
    its master rounded to the parameter's dtype; the fourth result is then the new masters, else [].
    ``grad_scale`` (a number or a one-element tensor on the parameters' device) multiplies every
    gradient before it is used: the trainer passes the averaging and clipping factor as a device
    tensor, so the step needs no pass over the gradients and no wait for the host.

    ``lr`` and ``step`` may also be 0-d float64 tensors on the parameters' device (a step captured in a
    device graph reads each step's values from there); the bias corrections are then computed from
    ``step`` in float64 on the device.
    """
    bias_c1, bias_c2_sqrt = _bias_corrections(beta1, beta2, step)
    out_p, out_m, out_v, out_master = [], [], [], []
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)):
        base = master_params[i] if master_params is not None else p
        acc = torch.promote_types(base.dtype, torch.float32)
        gf = g.to(acc)
        if grad_scale is not None:
            gf = gf * (grad_scale.to(acc) if isinstance(grad_scale, torch.Tensor) else grad_scale)
        m_new = beta1 * m.to(acc) + (1 - beta1) * gf
        v_new = beta2 * v.to(acc) + (1 - beta2) * gf * gf
        x = base.to(acc) * (1 - lr * weight_decay)
        x = x - (lr / bias_c1) * m_new / (v_new.sqrt() / bias_c2_sqrt + eps)
        out_p.append(x.to(p.dtype))
        out_m.append(m_new.to(m.dtype))
        out_v.append(v_new.to(v.dtype))
        if master_params is not None:
            out_master.append(x.to(base.dtype))
    return out_p, out_m, out_v, out_master


def _bias_corrections(beta1: float, beta2: float, step: int | torch.Tensor) -> tuple[float | torch.Tensor, ...]:
    """``1 - beta1**step`` and ``sqrt(1 - beta2**step)``: floats for an int step, 0-d float64 tensors for a
    tensor step."""
    if isinstance(step, torch.Tensor):
        step = step.to(torch.float64)
        return 1.0 - torch.pow(beta1, step), (1.0 - torch.pow(beta2, step)).sqrt()
    return 1.0 - beta1 ** step, (1.0 - beta2 ** step) ** 0.5


def adamw_error_scale(params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                      weight_decay=0.0, step, master_params=None, grad_scale=None):
    """`OpDef.error_scale` of `adamw`: each output element's rounding-error bound in units of roundoff.

    The first moment ``b1*m + (1-b1)*g*s`` cancels when the two terms nearly cancel; its error is
    bounded by four roundings (the scale, two products, the sum) of ``b1*|m| + (1-b1)*|g*s|``. The
    second moment's terms are positive (five roundings of its value). The parameter's error: two
    roundings of the decayed weight, eight of the update term, the first moment's error carried
    through the update's division, and the final rounding.
    """
    s = 1.0 if grad_scale is None else abs(float(grad_scale))
    lr = float(lr)
    bias_c1, bias_c2_sqrt = _bias_corrections(beta1, beta2, int(step))
    out_p, out_m, out_v = [], [], []
    for i, (g, m, v) in enumerate(zip(grads, exp_avgs, exp_avg_sqs, strict=True)):
        base = (master_params[i] if master_params is not None else params[i]).double()
        g = g.double() * s
        m_terms = beta1 * m.double().abs() + (1 - beta1) * g.abs()
        m_new = beta1 * m.double() + (1 - beta1) * g
        v_new = beta2 * v.double() + (1 - beta2) * g * g
        denom = v_new.sqrt() / bias_c2_sqrt + eps
        decayed = base * (1 - lr * weight_decay)
        p_new = decayed - (lr / bias_c1) * m_new / denom
        out_m.append(4 * m_terms)
        out_v.append(5 * v_new)
        out_p.append(2 * decayed.abs() + (lr / bias_c1) * (8 * m_new.abs() + 4 * m_terms) / denom + p_new.abs())
    return out_p, out_m, out_v, (list(out_p) if master_params is not None else [])


def _samples(dtype, device, gen):
    shapes = [(64,), (7, 33), (1,), (0,), (3, 1000)]
    state = torch.float64 if dtype == torch.float64 else torch.float32

    def tensors(scale: float, dt: torch.dtype, positive: bool = False) -> list[torch.Tensor]:
        out = [randn(*s, dtype=dt, device=device, generator=gen, scale=scale) for s in shapes]
        return [t.abs() for t in out] if positive else out

    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    yield Sample((tensors(1.0, dtype), tensors(1.0, dtype), tensors(0.1, state), tensors(0.01, state, True)),
                 {**hyper, "step": 5}, "5-tensors:step5")
    yield Sample((tensors(1.0, dtype), tensors(1.0, dtype), tensors(0.0, state), tensors(0.0, state)),
                 {**hyper, "step": 1, "weight_decay": 0.0}, "5-tensors:step1-no-decay")
    masters = tensors(1.0, state)
    yield Sample(([m.to(dtype) for m in masters], tensors(1.0, dtype), tensors(0.1, state),
                  tensors(0.01, state, True)), {**hyper, "step": 3, "master_params": masters},
                 "5-tensors:step3-master")
    masters = tensors(1.0, state)
    yield Sample(([m.to(dtype) for m in masters], tensors(1.0, dtype), tensors(0.1, state),
                  tensors(0.01, state, True)),
                 {**hyper, "step": 7, "master_params": masters,
                  "grad_scale": torch.tensor([0.37], dtype=torch.float32, device=device)},
                 "5-tensors:step7-master-scaled")
    yield Sample((tensors(1.0, dtype), tensors(1.0, dtype), tensors(0.1, state), tensors(0.01, state, True)),
                 {**hyper, "step": 2, "grad_scale": 2.5}, "5-tensors:step2-scaled")
    # a decay strong enough to show in bf16 weights after one step (5%)
    yield Sample((tensors(1.0, dtype), tensors(1.0, dtype), tensors(0.1, state), tensors(0.01, state, True)),
                 {**hyper, "lr": 0.05, "weight_decay": 1.0, "step": 4}, "5-tensors:step4-strong-decay")
    # the trainer's calls: the first step (moments zero), with and without decay and masters, the
    # averaging-and-clipping factor as a device scalar
    for master in (False, True):
        for decay in (0.1, 0.0):
            masters = tensors(1.0, state)
            params = [m.to(dtype) for m in masters] if master else tensors(1.0, dtype)
            scale = torch.tensor([0.125], dtype=state, device=device)
            yield Sample((params, tensors(1.0, dtype), tensors(0.0, state), tensors(0.0, state)),
                         {**hyper, "step": 1, "weight_decay": decay, "grad_scale": scale,
                          **({"master_params": masters} if master else {})},
                         f"5-tensors:step1{'-master' if master else ''}-scaled{'' if decay else '-no-decay'}")
    # a step captured in a device graph: lr and the step number read from device tensors
    for master in (False, True):
        masters = tensors(1.0, state)
        params = [m.to(dtype) for m in masters] if master else tensors(1.0, dtype)
        schedule = {"lr": torch.tensor(2e-2, dtype=torch.float64, device=device),
                    "step": torch.tensor(6.0, dtype=torch.float64, device=device),
                    "grad_scale": torch.tensor([0.5], dtype=state, device=device)}
        yield Sample((params, tensors(1.0, dtype), tensors(0.1, state), tensors(0.01, state, True)),
                     {**hyper, **schedule, **({"master_params": masters} if master else {})},
                     f"5-tensors:step6{'-master' if master else ''}-device-schedule")


OPDEFS = [OpDef(name="adamw",
                signature="adamw(params[], grads[], exp_avgs[], exp_avg_sqs[], *, lr, beta1=0.9, beta2=0.999, "
                          "eps=1e-8, weight_decay=0.0, step, master_params[]=None, grad_scale=None) "
                          "-> (params[], exp_avgs[], exp_avg_sqs[], master_params[] or [])",
                reference=adamw, samples=_samples, differentiable=False, error_scale=adamw_error_scale,
                doc="Fast implementations update in place and return the same tensors; the reference returns "
                    "new ones. Lists of tensors are pytrees (torch.utils._pytree). grad_scale is a number "
                    "or a one-element tensor that multiplies every gradient (read on the device). lr and step are "
                    "numbers, or both 0-d float64 device tensors (a captured step's schedule).")]
