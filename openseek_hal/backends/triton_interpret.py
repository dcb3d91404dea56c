"""Triton's interpreter on the host CPU: the GPU kernels of ``ops/kernels`` run as numpy, op by op.

For CI (every kernel's numerics checked without a GPU) and for vendors debugging a kernel without
hardware (``breakpoint()`` and ``print`` work inside an interpreted kernel). The kernels are a
separate, interpreter-mode copy of the package (see `openseek_hal.ops.kernel_loader`), so this
backend and ``cuda`` can be used in the same process. Slow: use small shapes.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ..backend import Backend, Capabilities
from ..ops.grouped import grouped_linear, grouped_mm_linear


class TritonInterpretBackend(Backend):
    name = "triton-interpret"
    device_type = "cpu"
    priority = -10  # never the default: it is a debugging and CI backend
    slow = True  # tests parametrized over every backend skip it unless `pytest --backend triton-interpret`
    dist_backend = "gloo"

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        if importlib.util.find_spec("triton") is None:
            return False, "triton is not installed (pip install 'openseek-hal[triton]')"
        return True, ""

    def native_ops(self) -> Mapping[str, Callable[..., Any]]:
        from ..ops.kernel_loader import kernel_table

        # Embedding and the grouped expert matmul are torch's, as on the cuda backend, whose op table this
        # one mirrors (torch's grouped GEMM only where the CPU has one). Attention is the Triton flash
        # kernel, so CI checks its numerics; the cuda backend picks per shape between it and torch's SDPA.
        grouped = grouped_mm_linear if hasattr(torch, "_grouped_mm") else grouped_linear
        return {**kernel_table(interpret=True), "embedding": F.embedding, "grouped_linear": grouped}

    def capabilities(self) -> Capabilities:
        return Capabilities(device_name=f"Triton interpreter on {self.device.name()}",
                            dtypes=(torch.float32, torch.bfloat16, torch.float64), fp8=True)
