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
