"""A backend's manifest of declared exceptions, applied to check results.

A backend declares ``expected_failures`` (op, reason, optional dtype, check kind and sample) and
``unsupported_dtypes`` (dtype -> reason). A declared check still runs: when it fails or raises it is
reported as xfail with the reason; when it passes, as xpass, so a stale manifest is visible (and
fails the run in strict mode). A dtype missing from ``capabilities().dtypes`` is not run at all
(skip): the device does not claim it.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..backend import Backend
from .records import CheckResult


def dtype_name(dtype: torch.dtype | None) -> str:
    return "" if dtype is None else str(dtype).removeprefix("torch.")


class Manifest:
    def __init__(self, backend: Backend):
        self.failures = tuple(type(backend).expected_failures)
        self.unsupported = {dtype_name(d): r for d, r in type(backend).unsupported_dtypes.items()}
        self.supported = {dtype_name(d) for d in backend.capabilities().dtypes}

    def skip_reason(self, dtype: str) -> str | None:
        """Why checks in ``dtype`` are not run on this device, or None."""
        if dtype in self.supported or dtype in self.unsupported:
            return None
        return f"{dtype} is not in the backend's Capabilities.dtypes"

    def reason(self, op: str, dtype: str, check: str, sample: str = "") -> str | None:
        """Why this check is expected to fail, or None when it is required to pass."""
        if dtype in self.unsupported:
            return f"unsupported dtype {dtype}: {self.unsupported[dtype]}"
        for xf in self.failures:
            if xf.op == op and (xf.dtype is None or dtype_name(xf.dtype) == dtype) \
                    and (xf.check is None or xf.check == check) \
                    and (xf.sample is None or sample.startswith(xf.sample)):
                return xf.reason
        return None

    def apply(self, result: CheckResult) -> CheckResult:
        reason = self.reason(result.op, result.dtype, result.check, result.sample or "")
        if reason is None or result.status == "skip":
            return result
        if result.status in ("fail", "error"):
            return replace(result, status="xfail", message=f"expected: {reason} | {result.message}")
        return replace(result, status="xpass", message=f"passed although declared failing: {reason}")
