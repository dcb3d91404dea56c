"""The optimizer's ops (references and OpDefs): the AdamW step over many tensors, fp32 master weights for bf16
parameters optional; and the sum of squares over many tensors that the gradient norm is made of.

This op has no backward (``differentiable=False``). The reference is functional: it returns new
tensors ``(params, exp_avgs, exp_avg_sqs, master_params)`` so that conformance can compare them;
fast implementations update the given tensors in place and return those same tensors.

An fp32 master can be kept whole (``master_params``: 4 more bytes a parameter) or as its *remainder*
(``param_remainders``: 2 bytes). A bf16 number is the upper half of an fp32 one, so the bf16 weight
already holds the master's sign, exponent and top 7 mantissa bits; an int16 remainder holds the rest.
The master's bits are ``(weight_bits << 16) + remainder`` (int32 arithmetic), with the remainder in
[-2**15, 2**15): the weight is the master rounded to the nearest bf16 (exact halves away from zero,
where round-to-even would go to the even neighbour), and every fp32 value has exactly one such pair.
The step then moves 8 bytes of weight and master a parameter (the pair read and written) where a whole
master moves 10 (the master read and written, the rounded weight written), and the masters take half
the memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .opdef import OpDef, Sample, randn


def join_master(params: torch.Tensor, remainders: torch.Tensor) -> torch.Tensor:
    """The fp32 masters that bf16 ``params`` and their int16 ``remainders`` stand for (see the module)."""
    bits = (params.to(torch.bfloat16).view(torch.int16).to(torch.int32) << 16) + remainders.to(torch.int32)
    return bits.view(torch.float32)


def split_master(masters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``masters`` as (bf16 weights, int16 remainders); `join_master` gives them back exactly."""
    bits = masters.to(torch.float32).view(torch.int32)
    high = (bits + 0x8000) >> 16  # arithmetic shift: the upper half, rounded
    return high.to(torch.int16).view(torch.bfloat16), (bits - (high << 16)).to(torch.int16)


def adamw(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
          exp_avg_sqs: Sequence[torch.Tensor], *, lr: float | torch.Tensor, beta1: float = 0.9, beta2: float = 0.999,
          eps: float = 1e-8, weight_decay: float = 0.0, step: int | torch.Tensor,
          master_params: Sequence[torch.Tensor] | None = None, grad_scale: torch.Tensor | float | None = None,
          param_remainders: Sequence[torch.Tensor] | None = None
          ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """One decoupled-weight-decay Adam step (``torch.optim.AdamW``'s update) with ``step`` >= 1.

    With ``master_params`` the update is applied to the master copies and each parameter becomes
    its master rounded to the parameter's dtype; the fourth result is then the new masters, else [].
    With ``param_remainders`` (bf16 ``params``, int16 remainders; not with ``master_params``) the
    master is the fp32 number the two stand for (module docstring), updated and split again; the
    fourth result is then the new remainders.
    ``grad_scale`` (a number or a one-element tensor on the parameters' device) multiplies every
    gradient before it is used: the trainer passes the averaging and clipping factor as a device
    tensor, so the step needs no pass over the gradients and no wait for the host.

    ``lr`` and ``step`` may also be 0-d float64 tensors on the parameters' device (a step captured in a
    device graph reads each step's values from there); the bias corrections are then computed from
    ``step`` in float64 on the device.
    """
    if master_params is not None and param_remainders is not None:
        raise ValueError("adamw: master_params and param_remainders are two forms of the master: give one")
    bias_c1, bias_c2_sqrt = _bias_corrections(beta1, beta2, step)
    out_p, out_m, out_v, out_master = [], [], [], []
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)):
        base = master_params[i] if master_params is not None else p
        acc = torch.promote_types(base.dtype, torch.float32)
        if param_remainders is not None:
            base = join_master(p, param_remainders[i])
        gf = g.to(acc)
        if grad_scale is not None:
            gf = gf * (grad_scale.to(acc) if isinstance(grad_scale, torch.Tensor) else grad_scale)
        m_new = beta1 * m.to(acc) + (1 - beta1) * gf
        v_new = beta2 * v.to(acc) + (1 - beta2) * gf * gf
        x = base.to(acc) * (1 - lr * weight_decay)
        x = x - (lr / bias_c1) * m_new / (v_new.sqrt() / bias_c2_sqrt + eps)
        out_m.append(m_new.to(m.dtype))
        out_v.append(v_new.to(v.dtype))
        if param_remainders is not None:
            weight, remainder = split_master(x)
            out_p.append(weight.to(p.dtype))
            out_master.append(remainder)
            continue
        out_p.append(x.to(p.dtype))
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
                      weight_decay=0.0, step, master_params=None, grad_scale=None, param_remainders=None):
    """`OpDef.error_scale` of `adamw`: each output element's rounding-error bound in units of roundoff.

    The first moment ``b1*m + (1-b1)*g*s`` cancels when the two terms nearly cancel; its error is
    bounded by four roundings (the scale, two products, the sum) of ``b1*|m| + (1-b1)*|g*s|``. The
    second moment's terms are positive (five roundings of its value). The parameter's error: two
    roundings of the decayed weight, eight of the update term, the first moment's error carried
    through the update's division, and the final rounding. Masters kept as remainders are compared
    decoded (`adamw_decode`): the reference's own rounding to fp32 is one more.
    """
    s = 1.0 if grad_scale is None else abs(float(grad_scale))
    lr = float(lr)
    bias_c1, bias_c2_sqrt = _bias_corrections(beta1, beta2, int(step))
    out_p, out_m, out_v, new_masters = [], [], [], []
    for i, (g, m, v) in enumerate(zip(grads, exp_avgs, exp_avg_sqs, strict=True)):
        base = (master_params[i] if master_params is not None else params[i]).double()
        if param_remainders is not None:
            base = join_master(params[i], param_remainders[i]).double()
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
        new_masters.append(p_new.abs())
    if param_remainders is not None:
        out_p = [bound + p for bound, p in zip(out_p, new_masters)]
        return out_p, out_m, out_v, list(out_p)
    return out_p, out_m, out_v, (list(out_p) if master_params is not None else [])


def adamw_decode(args, kwargs, outputs: list) -> list:
    """`OpDef.decode` of `adamw`: with ``param_remainders`` the weights (first group of outputs) and the
    remainders (fourth group) both become the fp32 masters that each pair stands for. The pair and the
    master are one-to-one (the weight is the master rounded), so comparing masters, at the tolerance of
    the fp32 they are, checks both."""
    if kwargs.get("param_remainders") is None:
        return outputs
    n = len(args[0])
    out = list(outputs)
    for i in range(n):
        out[i] = out[3 * n + i] = join_master(out[i], out[3 * n + i])
    return out


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
    if dtype == torch.float64:
        return
    # masters kept as remainders of the bf16 weights (bf16 whatever the dtype under test, which sets the
    # gradients' dtype; the decoded masters and the moments are float32 and held to float32's bounds):
    # random masters, and masters at the encoding's edges
    # (exact halves between two bf16 numbers, powers of two and just below them, zeros, a subnormal)
    edges = torch.tensor([1.0 + 2**-8, -(1.0 + 3 * 2**-8), 1.0 - 2**-24, -(2.0 - 2**-23), 0.0, 2**-130,
                          0.5 + 2**-9 + 2**-24, 3.0, -65504.0, 2.0 + 2**-7, -(4.0 + 3 * 2**-6)], dtype=torch.float32)
    # lr 0 keeps every master as it was: the exact halves among them (bf16 upper halves of both parities,
    # both signs) must come back split as they went in, halves away from zero
    for label, extra in (("step2-remainder-lr0", {"step": 2, "lr": 0.0}),
                         ("step3-remainder", {"step": 3}),
                         ("step1-remainder-scaled", {"step": 1, "grad_scale": torch.tensor([0.125], device=device)}),
                         ("step1-remainder-scaled-no-decay", {"step": 1, "weight_decay": 0.0,
                                                              "grad_scale": torch.tensor([0.125], device=device)}),
                         ("step6-remainder-device-schedule",
                          {"lr": torch.tensor(2e-2, dtype=torch.float64, device=device),
                           "step": torch.tensor(6.0, dtype=torch.float64, device=device)})):
        masters = [t.float().cpu() for t in tensors(1.0, torch.float32)] + [edges]
        weights, remainders = zip(*(split_master(t) for t in masters))
        moments = tensors(0.1, state) + [torch.full((len(edges),), 0.05, dtype=state, device=device)]
        squares = tensors(0.01, state, True) + [torch.full((len(edges),), 0.01, dtype=state, device=device)]
        grads = tensors(1.0, dtype) + [randn(len(edges), dtype=dtype, device=device, generator=gen)]
        yield Sample(([w.to(device) for w in weights], grads, moments, squares),
                     {**hyper, **extra, "param_remainders": [r.to(device) for r in remainders]},
                     f"6-tensors:{label}", tolerance_dtype=torch.float32)


def sum_of_squares_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype `sum_of_squares` returns (and accumulates in): float64 when any tensor is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def sum_of_squares(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum(t ** 2)`` over every element of every tensor, as a 0-d tensor on their device: float64 when any
    tensor is float64, else float32 (the gradient norm's sum). The reference adds in float64 and rounds once."""
    acc = sum_of_squares_dtype(tensors)
    if not tensors:
        return torch.zeros((), dtype=acc)
    return torch.stack([t.to(torch.float64).square().sum() for t in tensors]).sum().to(acc)


def sum_of_squares_error_scale(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`OpDef.error_scale` of `sum_of_squares`: ``(n + 1) * sum(x ** 2)`` for ``n`` elements in all, the textbook
    bound, in units of roundoff, of any order of summing ``n`` non-negative terms (``n - 1`` additions) that were
    each rounded once (a float32 square) and rounded once more to the output; so a backend may add in any order,
    sequentially included (whose error grows with ``n``; a tree's with ``log2 n``)."""
    n = sum(t.numel() for t in tensors)
    return ((n + 1) * sum_of_squares([t.to(torch.float64) for t in tensors])).reshape(())


def foreach_sum_of_squares(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`sum_of_squares` from torch's multi-tensor norm (one kernel for many tensors; each tensor's norm is
    squared again, so one more rounding than the sum itself): the `cuda` backend's implementation until the
    Triton kernel's (`kernels/reduce.py`) is timed against it on a GPU (`benchmarks/ops/grad_norm_bench.py`)."""
    acc = sum_of_squares_dtype(tensors)
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return torch.zeros((), dtype=acc)
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=acc)).square().sum()


def _square_samples(dtype, device, gen):
    def tensors(*shapes):
        return [randn(*s, dtype=dtype, device=device, generator=gen) for s in shapes]

    # sizes around a kernel's block (8192 elements a program in the Triton kernel), an empty tensor, 2-d
    for label, shapes in (("one-tensor", [(1000,)]), ("4-tensors", [(3, 7), (0,), (8192,), (8193,)]),
                          ("6-tensors:blocks", [(40, 1280), (1,), (16385,), (64, 65), (5000,), (2, 3, 4)])):
        ts = tensors(*shapes)
        # the sum is float32 for bf16 and float32 tensors alike (float64 for float64): held to its own bounds
        yield Sample((ts,), {}, label, reduction_length=sum(t.numel() for t in ts),
                     tolerance_dtype=torch.float64 if dtype == torch.float64 else torch.float32)


OPDEFS = [OpDef(name="adamw",
                signature="adamw(params[], grads[], exp_avgs[], exp_avg_sqs[], *, lr, beta1=0.9, beta2=0.999, "
                          "eps=1e-8, weight_decay=0.0, step, master_params[]=None, grad_scale=None, "
                          "param_remainders[]=None) "
                          "-> (params[], exp_avgs[], exp_avg_sqs[], master_params[] or param_remainders[] or [])",
                reference=adamw, samples=_samples, differentiable=False, error_scale=adamw_error_scale,
                decode=adamw_decode,
                doc="Fast implementations update in place and return the same tensors; the reference returns "
                    "new ones. Lists of tensors are pytrees (torch.utils._pytree). grad_scale is a number "
                    "or a one-element tensor that multiplies every gradient (read on the device). lr and step are "
                    "numbers, or both 0-d float64 device tensors (a captured step's schedule). param_remainders: "
                    "int16 low halves of fp32 masters whose upper halves are the bf16 params (split_master, "
                    "join_master); compared decoded."),
          OpDef(name="sum_of_squares", signature="sum_of_squares(tensors[]) -> Tensor", reference=sum_of_squares,
                samples=_square_samples, differentiable=False, error_scale=sum_of_squares_error_scale,
                doc="The sum of the squares of every element of every tensor (the global gradient norm is its "
                    "square root): float64 when any tensor is float64, else float32. Implementations may add in any "
                    "fixed order, but the same inputs give the same bits on every call.")]
