"""RMSNorm and the fused residual-add + RMSNorm (references and OpDefs)."""

from __future__ import annotations

import torch

from .opdef import OpDef, Sample, randn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dimension, computed in float32 or wider."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(acc)).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(rms_norm(x + residual), x + residual)``; the sum is the next residual stream."""
    total = x + residual
    return rms_norm(total, weight, eps), total


def _norm_samples(dtype, device, gen, with_residual: bool):
    shapes = [(4, 64), (2, 3, 128), (1, 1), (7, 33), (0, 16), (3, 1000)]
    for shape in shapes:
        hidden = shape[-1]
        x = randn(*shape, dtype=dtype, device=device, generator=gen)
        w = randn(hidden, dtype=dtype, device=device, generator=gen, scale=0.1) + 1
        label = "x".join(map(str, shape))
        args = (x, randn(*shape, dtype=dtype, device=device, generator=gen), w) if with_residual else (x, w)
        yield Sample(args, {"eps": 1e-6}, label, hidden, ill_conditioned=hidden == 1)
    # activations far below 1: eps is a large part of the mean square, so a kernel that drops or
    # misreads it is caught
    x = randn(5, 96, dtype=dtype, device=device, generator=gen, scale=1e-3)
    w = randn(96, dtype=dtype, device=device, generator=gen, scale=0.1) + 1
    # (the residual equals x: their sum, 2x, is exact in every dtype, so no rounding of the sum is
    # amplified by the 1/rms of ~1e3 that these activations get)
    yield Sample((x, x.clone(), w) if with_residual else (x, w), {"eps": 1e-6}, "5x96:small", 96)
    # non-contiguous input: every other row of a wider matrix
    wide = randn(8, 256, dtype=dtype, device=device, generator=gen)[:, ::2]
    w = randn(128, dtype=dtype, device=device, generator=gen, scale=0.1) + 1
    if with_residual:
        r = randn(8, 128, dtype=dtype, device=device, generator=gen)
        yield Sample((wide, r, w), {"eps": 1e-5}, "8x128-strided", 128)
    else:
        yield Sample((wide, w), {"eps": 1e-5}, "8x128-strided", 128)


def _input_grad_scale(total: torch.Tensor, weight: torch.Tensor, eps: float, dy: torch.Tensor) -> torch.Tensor:
    """Rounding bound of ``rstd * (g - x_hat * mean(g * x_hat))``, ``g = dy * weight``, in roundoffs:
    about eight roundings of its two terms (at hidden size 1 they cancel to ~eps / x**2 of each)."""
    rstd = torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + eps)
    x_hat, g = total * rstd, dy * weight
    c = (g * x_hat).mean(-1, keepdim=True)
    return 8 * rstd * (g.abs() + x_hat.abs() * c.abs())


def _rms_norm_grad_scale(args, kwargs, upstreams):
    x, weight = args[:2]
    eps = args[2] if len(args) > 2 else kwargs.get("eps", 1e-6)
    return [_input_grad_scale(x, weight, eps, upstreams[0]), None, None][:len(args)]


def _add_rms_norm_grad_scale(args, kwargs, upstreams):
    x, residual, weight = args[:3]
    eps = args[3] if len(args) > 3 else kwargs.get("eps", 1e-6)
    scale = _input_grad_scale(x + residual, weight, eps, upstreams[0])
    if len(upstreams) > 1:  # the residual stream's own gradient is added to the input's
        scale = scale + upstreams[1].abs()
    return [scale, scale, None, None][:len(args)]


OPDEFS = [
    OpDef(name="rms_norm", signature="rms_norm(x, weight, eps=1e-6) -> y", reference=rms_norm,
          samples=lambda dt, dev, g: _norm_samples(dt, dev, g, False), grad_error_scale=_rms_norm_grad_scale),
    OpDef(name="add_rms_norm", signature="add_rms_norm(x, residual, weight, eps=1e-6) -> (y, x + residual)",
          reference=add_rms_norm, samples=lambda dt, dev, g: _norm_samples(dt, dev, g, True),
          grad_error_scale=_add_rms_norm_grad_scale),
]
