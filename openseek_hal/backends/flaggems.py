"""NVIDIA GPUs through FlagGems (BAAI's Triton op library) where it has the op, our Triton kernels elsewhere.

FlagGems-native here: ``rms_norm`` and ``silu_and_mul`` (FlagGems' forward and backward; both
compute in float32, so their float64 results are declared expected failures). Not taken from
FlagGems, with the reason:

* ``cross_entropy``: flag-gems 5.0.2's ``cross_entropy_loss`` loads ``logits[row, target]`` before it
  masks ignored targets, so a row with ``target == ignore_index`` (-100) reads out of bounds; on an
  H100 the conformance samples ended in "illegal memory access", which kills the CUDA context.
* ``add_rms_norm``, ``rope``, ``moe_route``: FlagGems' ``fused_add_rms_norm`` (in place),
  ``apply_rotary_pos_emb`` and ``grouped_topk`` have no backward.

Those ops and the ones FlagGems lacks run the ``cuda`` backend's kernels. `op_origins` says which
is which (``openseek-hal backends --ops`` prints it).

``flag_gems`` is imported only when this backend is used. flag-gems 5.0.2 pins numpy 1.26.4, so it
is no extra of this package; install it beside torch with
``pip install --no-deps flag-gems==5.0.2 sqlalchemy greenlet``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..backend import ExpectedFailure
from .cuda import CUDABackend

INSTALL_HINT = "pip install --no-deps flag-gems==5.0.2 sqlalchemy greenlet"


@functools.cache
def _import_flag_gems() -> tuple[Any, str]:
    """``(module, "")`` or ``(None, why it cannot be imported)``; imported once per process."""
    try:
        return importlib.import_module("flag_gems"), ""
    except Exception as e:  # any import-time failure makes the backend unavailable, with its reason
        return None, f"import flag_gems failed: {type(e).__name__}: {e}"


def _flaggems_ops(fg: Any) -> dict[str, Callable[..., Any]]:
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        return fg.rms_norm(x, [x.shape[-1]], weight, eps)

    def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return fg.silu_and_mul(gate, up)

    return {"rms_norm": rms_norm, "silu_and_mul": silu_and_mul}


_FP32_MATH = "FlagGems computes in float32: float64 results are off by up to ~4e-6 relative (H200, flag-gems 5.0.2)"


class FlagGemsBackend(CUDABackend):
    name = "flaggems"
    priority = 50  # below cuda: a user picks FlagGems explicitly
    # cuda's attention (flag-gems' own is not used; SDPA where it is timed faster), hence its declared
    # nondeterminism; then what flag-gems 5.0.2 computes in float32 for float64 inputs, by check, as
    # measured on an H200 and again on an H100 (docs/conformance/h100/conform-flaggems.json):
    # everything else passes; the samples that pass anyway are empty or of two elements (xpass in the report)
    expected_failures = tuple(f for f in CUDABackend.expected_failures if f.op == "causal_attention") + tuple(
        ExpectedFailure(op, _FP32_MATH, torch.float64, check)
        for op, check in (("rms_norm", "backward"), ("silu_and_mul", "forward"), ("silu_and_mul", "backward"),
                          ("silu_and_mul", "nan_inf")))

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        ok, reason = super().is_available()
        if not ok:
            return ok, reason
        if importlib.util.find_spec("flag_gems") is None:
            return False, f"flag_gems is not installed ({INSTALL_HINT})"
        module, reason = _import_flag_gems()
        return module is not None, reason

    def native_ops(self) -> Mapping[str, Callable[..., Any]]:
        ours = dict(super().native_ops())
        fg, reason = _import_flag_gems()
        if fg is None:
            raise RuntimeError(reason)
        return {**ours, **_flaggems_ops(fg)}

    def op_origins(self) -> dict[str, str]:
        """``{op: "flaggems" | "openseek-hal" | "torch"}`` for every native op of this backend."""
        torch_ops = {"embedding", "sum_of_squares"}
        flaggems = {"rms_norm", "silu_and_mul"}
        # causal_attention: cuda's choice per shape between our flash kernel and torch's SDPA
        return {op: "flaggems" if op in flaggems else "torch" if op in torch_ops
                else "openseek-hal or torch (fastest per shape)" if op == "causal_attention" else "openseek-hal"
                for op in self._native_table()}
