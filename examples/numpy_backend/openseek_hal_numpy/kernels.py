"""NumPy kernels with hand-written backward passes, wrapped as ``torch.autograd.Function``s.

Each kernel computes in float64 (NumPy's native precision; it has no bfloat16) and returns a tensor
of the input's dtype, as the op contract says. Computing wide matters for the backward: rms_norm's
input gradient is a difference of two nearly equal terms when the hidden size is small.
NaN and Inf propagate as IEEE arithmetic says; NumPy's warnings about them are silenced.
"""

from __future__ import annotations

import numpy as np
import torch

_quiet = np.errstate(over="ignore", invalid="ignore")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()


def _torch(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype=like.dtype, device=like.device)


def _sigmoid(a: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-a))  # exp(-a) overflows to inf for very negative a: sigmoid is then 0


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    @_quiet
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xa, wa = _np(x), _np(weight)
        rstd = 1.0 / np.sqrt(np.mean(xa * xa, axis=-1, keepdims=True) + eps)
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return _torch(xa * rstd * wa, x)

    @staticmethod
    @_quiet
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        xa = _np(x)
        wa, g = _np(weight), _np(grad)
        rstd = 1.0 / np.sqrt(np.mean(xa * xa, axis=-1, keepdims=True) + ctx.eps)
        gw = g * wa
        # d/dx of x * rstd: the direct term, minus the part through rstd's dependence on every x_j
        dx = rstd * gw - xa * rstd ** 3 * np.mean(gw * xa, axis=-1, keepdims=True)
        dw = (g * xa * rstd).reshape(-1, xa.shape[-1]).sum(axis=0)
        return _torch(dx, x), _torch(dw, weight), None


class _SiluAndMul(torch.autograd.Function):
    @staticmethod
    @_quiet
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        gate, up = np.split(_np(x), 2, axis=-1)
        ctx.save_for_backward(x)
        return _torch(gate * _sigmoid(gate) * up, x)

    @staticmethod
    @_quiet
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        gate, up = np.split(_np(x), 2, axis=-1)
        g = _np(grad)
        s = _sigmoid(gate)
        d_gate = g * up * s * (1.0 + gate * (1.0 - s))
        d_up = g * gate * s
        return _torch(np.concatenate([d_gate, d_up], axis=-1), x)


def _rotate(xa: np.ndarray, cos: np.ndarray, sin: np.ndarray, interleaved: bool) -> np.ndarray:
    if interleaved:
        x1, x2 = xa[..., 0::2], xa[..., 1::2]
        out = np.empty_like(xa)
        out[..., 0::2], out[..., 1::2] = x1 * cos - x2 * sin, x1 * sin + x2 * cos
        return out
    x1, x2 = np.split(xa, 2, axis=-1)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class _Rope(torch.autograd.Function):
    @staticmethod
    @_quiet
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
        xa = _np(x)
        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        return _torch(_rotate(xa, _np(cos), _np(sin), interleaved), x)

    @staticmethod
    @_quiet
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        g = _np(grad)
        # a rotation's transpose is the rotation by the opposite angle
        dx = _rotate(g, _np(cos), -_np(sin), ctx.interleaved)
        return _torch(dx, grad), None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _SiluAndMul.apply(x)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    return _Rope.apply(x, cos, sin, interleaved)
