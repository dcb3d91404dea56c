"""The reference backend: the host CPU running every op's pure-torch reference implementation."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .. import ops
from ..backend import Backend, Capabilities


class CPUBackend(Backend):
    name = "cpu"
    device_type = "cpu"
    priority = 0
    dist_backend = "gloo"

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        return True, ""

    def native_ops(self) -> Mapping[str, Callable[..., Any]]:
        # The references *are* this backend's implementations, so nothing here is a fallback.
        return {name: opdef.reference for name, opdef in ops.REGISTRY.items()}

    def capabilities(self) -> Capabilities:
        # fp8=False: the fp8 ops' references run here (float64 emulation, for conformance), but training
        # with `fp8: true` would be slower than without and is refused; triton-interpret runs the kernels
        return Capabilities(device_name=self.device.name(),
                            dtypes=(torch.float64, torch.float32, torch.bfloat16))
