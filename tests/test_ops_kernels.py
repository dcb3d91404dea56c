"""Every Triton kernel, forward and backward, against its OpDef's float64 reference (Triton interpreter, CPU).

The kernels are the `triton-interpret` backend's copy (see `openseek_hal.ops.kernel_loader`); the
inputs are the OpDef samples (edge shapes, non-contiguous views) in float32 and bfloat16.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from openseek_hal.ops.kernel_loader import kernel_table  # noqa: E402
from openseek_hal.ops.selfcheck import check_op  # noqa: E402

KERNELS = kernel_table(interpret=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_matches_reference(name, dtype):
    assert check_op(name, KERNELS[name], dtype) > 0


@pytest.mark.parametrize("name", ["rms_norm", "rope", "cross_entropy", "moe_unpermute"])
def test_kernel_float64_accumulates_in_float64(name):
    assert check_op(name, KERNELS[name], torch.float64) > 0


def test_norm_kernel_takes_eps_exactly_in_float64():
    """At a mean square ~eps, eps rounded to float32 (a kernel's float scalar) moves rstd by ~1e-9,
    which the backward's cancellation turns into ~1e-5 relative errors; the halves keep it exact."""
    from openseek_hal.ops.kernels._common import split_float

    for value in (1e-6, 1e-5, 0.1, 1 / 3):
        hi, lo = split_float(value)
        assert torch.tensor(hi, dtype=torch.float32).item() == hi and torch.tensor(lo, dtype=torch.float32).item() == lo
        assert abs(hi + lo - value) <= 2 ** -48 * value
    x = torch.full((2, 8), 1e-3, dtype=torch.float64)  # mean square 1e-6 = eps
    y = KERNELS["rms_norm"](x, torch.ones(8, dtype=torch.float64), eps=1e-6)
    expected = 1e-3 / (2e-6) ** 0.5
    assert torch.allclose(y, torch.full_like(y, expected), rtol=1e-14, atol=0), float((y / expected - 1).abs().max())
