"""Check one op implementation against its OpDef's float64 CPU reference, forward and backward.

A small, strict harness for kernel authors (our tests on the Triton interpreter, and the GPU check
in ``benchmarks/ops``); the full vendor-facing suite with reports is `openseek_hal.conformance`.
Raises ``AssertionError`` naming the op, sample and output on the first mismatch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from . import get
from .opdef import roundoff


def _detach(t: Any) -> Any:
    return t.detach() if isinstance(t, torch.Tensor) else t  # keeps the sample's strides


def _reference_copy(t: Any) -> Any:
    if not isinstance(t, torch.Tensor):
        return t
    return t.detach().to("cpu", torch.float64 if t.is_floating_point() else t.dtype, copy=True)


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, what: str,
           bound: torch.Tensor | None = None) -> None:
    """``actual`` within ``atol + rtol * |expected|`` of ``expected``, or within ``bound`` (the op's own
    rounding-error bound, `OpDef.error_scale` times the roundoff) where that is larger."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.detach().cpu()
    if actual.is_floating_point() and bound is not None:
        a, e = actual.double(), expected.detach().double()
        allowed = torch.maximum(atol + rtol * e.abs(), bound.double().abs())
        assert bool(((a - e).abs() <= allowed).all()), f"{what}: {a} vs {e}, allowed {allowed}"
    elif actual.is_floating_point():
        torch.testing.assert_close(actual.double(), expected.detach().double(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what}: {m}")
    else:
        assert torch.equal(actual, expected), f"{what}: integer outputs differ"


def _with_grad(args: tuple, positions: list[int]) -> tuple:
    return tuple(a.requires_grad_() if i in positions else a for i, a in enumerate(args))


def check_op(name: str, impl: Callable[..., Any], dtype: torch.dtype, device: torch.device | str = "cpu",
             seed: int = 0) -> int:
    """Run every sample of op ``name`` through ``impl`` on ``device``; returns how many were checked."""
    opdef = get(name)
    gen = torch.Generator().manual_seed(seed)
    checked = 0
    for sample in opdef.samples(dtype, torch.device(device), gen):
        rtol, atol = opdef.tol(sample.tolerance_dtype or dtype, sample.reduction_length)
        # Inputs go to the implementation as the sample made them (non-contiguous views stay views).
        args, kwargs = pytree.tree_map(_detach, sample.args), pytree.tree_map(_detach, sample.kwargs)
        ref_args = pytree.tree_map(_reference_copy, sample.args)
        ref_kwargs = pytree.tree_map(_reference_copy, sample.kwargs)
        floating = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]
        grad_pos = [] if not opdef.differentiable else (
            floating if opdef.grad_inputs is None else [i for i in opdef.grad_inputs if i in floating])
        args, ref_args = _with_grad(args, grad_pos), _with_grad(ref_args, grad_pos)
        label = f"{name}[{sample.name}, {dtype}]"
        ref = pytree.tree_leaves(opdef.reference(*ref_args, **ref_kwargs))  # first: impl may work in place
        out = pytree.tree_leaves(impl(*args, **kwargs))
        if opdef.choice is not None:  # a top-k that ties may flip: the reference on the kernel's choice
            chosen = opdef.choice(pytree.tree_map(_detach, ref_args), ref_kwargs,
                                  [o.detach().cpu() for o in out], dtype)
            assert chosen is not None, f"{label}: the kernel's choice is not a top-k of the reference's scores"
            ref = pytree.tree_leaves(chosen(*ref_args, **ref_kwargs))
        assert len(out) == len(ref), f"{label}: {len(out)} outputs, the reference has {len(ref)}"
        # values stored encoded (adamw's master remainders) are compared decoded
        shown_out, shown_ref = (opdef.decoded(ref_args, ref_kwargs, outs) for outs in (out, ref))
        # the op's own rounding-error bound per output, where it gives one (as conformance uses it)
        scales = [] if opdef.error_scale is None else pytree.tree_leaves(
            opdef.error_scale(*pytree.tree_map(_detach, ref_args), **ref_kwargs))
        for j, (o, r) in enumerate(zip(shown_out, shown_ref)):
            scale = scales[j] if j < len(scales) else None
            bound = scale.double() * roundoff(o.dtype) if isinstance(scale, torch.Tensor) and scale.shape == o.shape \
                else None
            _close(o, r, rtol, atol, f"{label} output {j}", bound)
        if grad_pos:
            pairs = [(o, r) for o, r in zip(out, ref) if o.is_floating_point() and o.requires_grad]
            cot = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o, _ in pairs]
            grads = torch.autograd.grad([o for o, _ in pairs], [args[i] for i in grad_pos],
                                        [c.to(o.device) for c, (o, _) in zip(cot, pairs)], allow_unused=True)
            ref_grads = torch.autograd.grad([r for _, r in pairs], [ref_args[i] for i in grad_pos],
                                            [c.double() for c in cot], allow_unused=True)
            for i, g, rg in zip(grad_pos, grads, ref_grads):
                g = torch.zeros_like(args[i]) if g is None else g
                rg = torch.zeros_like(ref_args[i]) if rg is None else rg
                _close(g, rg, rtol, atol, f"{label} grad of input {i}")
        checked += 1
    return checked
