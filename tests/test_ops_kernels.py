"""Every Triton kernel, forward and backward, against its OpDef's float64 reference (Triton interpreter, CPU).

The kernels are the `triton-interpret` backend's copy (see `openseek_hal.ops.kernel_loader`); the
inputs are the OpDef samples (edge shapes, non-contiguous views) in float32 and bfloat16.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils import _pytree as pytree

from openseek_hal import ops

pytest.importorskip("triton")

from openseek_hal.ops.kernel_loader import kernel_table  # noqa: E402

KERNELS = kernel_table(interpret=True)
DTYPES = [torch.float32, torch.bfloat16]


def _leaf(t, dtype=None):
    if not isinstance(t, torch.Tensor):
        return t
    t = t.detach().clone() if dtype is None or not t.is_floating_point() else t.detach().to(dtype)
    return t


def _grad_positions(opdef, args):
    floating = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    return floating if opdef.grad_inputs is None else [i for i in opdef.grad_inputs if i in floating]


def _close(actual, expected, rtol, atol, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.is_floating_point():
        torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what}: {m}")
    else:
        assert torch.equal(actual, expected), f"{what}: integer outputs differ"


def check_op(name: str, impl, dtype: torch.dtype, seed: int = 0) -> int:
    """Run every sample of op ``name`` through ``impl`` and the float64 reference; returns the count checked."""
    opdef = ops.get(name)
    gen = torch.Generator().manual_seed(seed)
    checked = 0
    for sample in opdef.samples(dtype, torch.device("cpu"), gen):
        rtol, atol = opdef.tol(dtype, sample.reduction_length)
        args = pytree.tree_map(_leaf, sample.args)
        kwargs = pytree.tree_map(_leaf, sample.kwargs)
        ref_args = pytree.tree_map(lambda t: _leaf(t, torch.float64), sample.args)
        ref_kwargs = pytree.tree_map(lambda t: _leaf(t, torch.float64), sample.kwargs)
        grad_pos = _grad_positions(opdef, args) if opdef.differentiable else []
        for i in grad_pos:
            args = (*args[:i], args[i].requires_grad_(), *args[i + 1:])
            ref_args = (*ref_args[:i], ref_args[i].requires_grad_(), *ref_args[i + 1:])
        out = pytree.tree_leaves(impl(*args, **kwargs))
        ref = pytree.tree_leaves(opdef.reference(*ref_args, **ref_kwargs))
        assert len(out) == len(ref), f"{name}[{sample.name}]: {len(out)} outputs, reference has {len(ref)}"
        for j, (o, r) in enumerate(zip(out, ref)):
            _close(o, r, rtol, atol, f"{name}[{sample.name}] output {j}")
        if grad_pos:
            pairs = [(o, r) for o, r in zip(out, ref) if o.is_floating_point() and o.requires_grad]
            cot = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o, _ in pairs]
            grads = torch.autograd.grad([o for o, _ in pairs], [args[i] for i in grad_pos], cot, allow_unused=True)
            ref_grads = torch.autograd.grad([r for _, r in pairs], [ref_args[i] for i in grad_pos],
                                            [c.double() for c in cot], allow_unused=True)
            for i, g, rg in zip(grad_pos, grads, ref_grads):
                g = torch.zeros_like(args[i]) if g is None else g
                rg = torch.zeros_like(ref_args[i]) if rg is None else rg
                _close(g, rg, rtol, atol, f"{name}[{sample.name}] grad of input {i}")
        checked += 1
    return checked


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_matches_reference(name, dtype):
    assert check_op(name, KERNELS[name], dtype) > 0
