"""Triton sum of squares over many tensors (the gradient norm's reduction).

Each program squares and sums one ``BLOCK`` of one tensor in float32 (float64 for float64 inputs) and
writes its partial to its own slot of one buffer; the partials are then added by one device reduction.
No atomics: the partial layout and the final reduction are fixed functions of the tensors' sizes, so the
result is the same on every run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from openseek_hal.ops.optim import sum_of_squares_dtype

from ._common import acc_type

BLOCK = 8192  # elements a program (16 KB of bf16): a few hundred programs per 1M-element tensor


@triton.jit
def _square_partials(X, OUT, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n, other=0.0).to(ACC)
    tl.store(OUT + tl.program_id(0), tl.sum(x * x, axis=0))


def sum_of_squares(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum(t ** 2)`` over every element of every tensor: a 0-d tensor, float64 when any tensor is float64,
    else float32 (`openseek_hal.ops.optim.sum_of_squares`). A non-contiguous tensor is read from a copy."""
    acc = sum_of_squares_dtype(tensors)
    tensors = [t if t.is_contiguous() else t.contiguous() for t in tensors if t.numel()]
    if not tensors:
        return torch.zeros((), dtype=acc)
    counts = [triton.cdiv(t.numel(), BLOCK) for t in tensors]
    partials = torch.empty(sum(counts), dtype=acc, device=tensors[0].device)
    start = 0
    for t, count in zip(tensors, counts, strict=True):
        _square_partials[(count,)](t, partials[start:], t.numel(), ACC=acc_type(acc), BLOCK=BLOCK, num_warps=8)
        start += count
    return partials.sum()
