"""FP8 (e4m3) weights with 2-D block scales, as DeepSeek-V3's checkpoints store them, back to a float dtype.

A quantized weight ``w[out, in]`` comes with ``weight_scale_inv[ceil(out / bo), ceil(in / bi)]``
(float32; ``bo = bi = 128`` in DeepSeek's ``quantization_config.weight_block_size``): the real
weight is ``w * scale_inv`` with each scale covering one block (edge blocks may be partial).
"""

from __future__ import annotations

import torch

FP8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2")
                   if hasattr(torch, name))


def is_fp8(tensor: torch.Tensor) -> bool:
    return tensor.dtype in FP8_DTYPES


def dequantize_blockwise(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                         dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``weight * scale_inv`` expanded over ``block``-sized tiles, computed in float32, returned as ``dtype``."""
    rows, cols = weight.shape
    bo, bi = block
    expected = (-(-rows // bo), -(-cols // bi))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv of shape {tuple(scale_inv.shape)} does not tile a {rows}x{cols} weight "
                         f"in {bo}x{bi} blocks (expected {expected})")
    scale = scale_inv.float().repeat_interleave(bo, dim=0)[:rows].repeat_interleave(bi, dim=1)[:, :cols]
    return (weight.float() * scale).to(dtype)
