"""NVIDIA GPUs through FlagGems (BAAI's Triton op library) where it has the op, our Triton kernels elsewhere.

FlagGems-native here: ``rms_norm`` and ``silu_and_mul`` (FlagGems' forward and backward) and
``cross_entropy`` without z-loss (FlagGems' ``cross_entropy_loss``; with ``z_loss`` our kernel runs).
FlagGems' ``fused_add_rms_norm``, ``apply_rotary_pos_emb`` and ``grouped_topk`` are forward-only
(and the first works in place), so ``add_rms_norm``, ``rope`` and ``moe_route`` use the ``cuda``
backend's kernels, as do the ops FlagGems lacks. `op_origins` says which is which
(``openseek-hal backends --ops`` prints it).

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

from .cuda import CUDABackend

INSTALL_HINT = "pip install --no-deps flag-gems==5.0.2 sqlalchemy greenlet"


@functools.cache
def _import_flag_gems() -> tuple[Any, str]:
    """``(module, "")`` or ``(None, why it cannot be imported)``; imported once per process."""
    try:
        return importlib.import_module("flag_gems"), ""
    except Exception as e:  # any import-time failure makes the backend unavailable, with its reason
        return None, f"import flag_gems failed: {type(e).__name__}: {e}"


def _flaggems_ops(fg: Any, ours: Mapping[str, Callable[..., Any]]) -> dict[str, Callable[..., Any]]:
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        return fg.rms_norm(x, [x.shape[-1]], weight, eps)

    def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return fg.silu_and_mul(gate, up)

    def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                      reduction: str = "mean", z_loss: float = 0.0, inplace_backward: bool = False) -> torch.Tensor:
        if z_loss:  # FlagGems has no z-loss
            return ours["cross_entropy"](logits, target, ignore_index, reduction, z_loss, inplace_backward)
        return fg.cross_entropy_loss(logits, target, None, reduction, ignore_index, 0.0)

    return {"rms_norm": rms_norm, "silu_and_mul": silu_and_mul, "cross_entropy": cross_entropy}


class FlagGemsBackend(CUDABackend):
    name = "flaggems"
    priority = 50  # below cuda: a user picks FlagGems explicitly

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
        return {**ours, **_flaggems_ops(fg, ours)}

    def op_origins(self) -> dict[str, str]:
        """``{op: "flaggems" | "openseek-hal" | "torch"}`` for every native op of this backend."""
        torch_ops = {"embedding", "causal_attention"}
        flaggems = {"rms_norm", "silu_and_mul", "cross_entropy"}
        return {op: "flaggems" if op in flaggems else "torch" if op in torch_ops else "openseek-hal"
                for op in self._native_table()}
