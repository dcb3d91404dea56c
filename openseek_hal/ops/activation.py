"""SwiGLU's gate: ``silu_and_mul`` (reference and OpDef)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .opdef import OpDef, Sample, randn


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``x = cat([gate, up], -1)``; the output has half the last dim."""
    gate, up = x.chunk(2, dim=-1)
    acc = torch.promote_types(x.dtype, torch.float32)
    return (F.silu(gate.to(acc)) * up.to(acc)).to(x.dtype)


def _samples(dtype, device, gen):
    for shape in [(4, 128), (2, 5, 64), (1, 2), (3, 2 * 1000), (0, 32)]:
        yield Sample((randn(*shape, dtype=dtype, device=device, generator=gen, scale=2.0),),
                     name="x".join(map(str, shape)))
    wide = randn(6, 512, dtype=dtype, device=device, generator=gen)[:, 128:384]
    yield Sample((wide,), name="6x256-strided")


OPDEFS = [OpDef(name="silu_and_mul", signature="silu_and_mul(x[..., 2d]) -> y[..., d]",
                reference=silu_and_mul, samples=_samples)]
