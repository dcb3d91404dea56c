"""Rotary position embedding for MLA's decoupled rope part (reference and OpDef; tables in rope_scaling).

Two layouts: ``interleaved`` rotates pairs ``(x[2i], x[2i+1])`` (DeepSeek's ``rope_interleave``
checkpoints); the half layout rotates ``(x[i], x[i + d/2])`` (Llama style). Attention scores are
the same under either as long as queries and keys use the same one.
"""

from __future__ import annotations

import torch

from .opdef import OpDef, Sample, randn
from .rope_scaling import rope_tables


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate ``x`` of shape ``(..., seq, dim)`` by the ``(seq, dim // 2)`` tables."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xf, c, s = x.to(acc), cos.to(acc), sin.to(acc)
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return out.to(x.dtype)


def _samples(dtype, device, gen):
    for shape in [(2, 4, 16, 64), (1, 1, 1, 2), (3, 7, 32), (2, 3, 5, 24), (2, 0, 8)]:  # 24: halves padded
        seq, dim = shape[-2], shape[-1]
        cos, sin = rope_tables(dim, seq, device=device)
        for interleaved in (False, True):
            x = randn(*shape, dtype=dtype, device=device, generator=gen)
            label = "x".join(map(str, shape)) + (":interleaved" if interleaved else ":half")
            yield Sample((x, cos, sin), {"interleaved": interleaved}, label)
    # non-contiguous: the rope slice of a wider per-head vector, as MLA produces it
    full = randn(2, 4, 8, 96, dtype=dtype, device=device, generator=gen)
    cos, sin = rope_tables(64, 8, device=device)
    for interleaved in (False, True):
        yield Sample((full[..., 32:], cos, sin), {"interleaved": interleaved},
                     "2x4x8x64-strided:" + ("interleaved" if interleaved else "half"))


OPDEFS = [OpDef(name="rope", signature="rope(x[..., S, D], cos[S, D/2], sin[S, D/2], interleaved=False) -> y",
                reference=rope, samples=_samples, grad_inputs=(0,))]
