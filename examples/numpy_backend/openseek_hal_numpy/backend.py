"""The ``numpy`` backend: the host CPU, with rms_norm, silu_and_mul and rope as NumPy kernels.

It shows the vendor path end to end: a `Backend` subclass, native kernels with their own backward,
the remaining ops falling back to the reference, and an entry point in ``pyproject.toml``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from openseek_hal import Backend, Capabilities

from . import kernels


class NumpyBackend(Backend):
    name = "numpy"
    device_type = "cpu"  # NumPy computes on the host; tensors stay torch CPU tensors in between
    priority = -10  # never the default over the in-tree backends
    dist_backend = "gloo"

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        return True, ""  # numpy is a dependency of this package, so importing it here cannot fail

    def native_ops(self) -> Mapping[str, Callable[..., Any]]:
        return {"rms_norm": kernels.rms_norm, "silu_and_mul": kernels.silu_and_mul, "rope": kernels.rope}

    def capabilities(self) -> Capabilities:
        # the kernels compute in float64 (NumPy has no bfloat16) and round back to the input dtype
        return Capabilities(device_name=f"numpy on {self.device.name()}",
                            dtypes=(torch.float64, torch.float32, torch.bfloat16))
