"""Grouped linear: one matrix per group of consecutive rows, the routed experts' matmul (reference, OpDef).

After `moe_permute` the rows of expert ``e`` are contiguous and ``counts[e]`` long; ``grouped_linear``
multiplies them by ``weight[e]`` (stored ``[out, in]`` as ``nn.Linear`` does). The reference loops
over experts (one host sync for the split sizes); a backend can run all groups in one grouped GEMM
(`torch._grouped_mm` on Hopper), which needs no host sync.

``x`` may have more rows than ``counts`` sums to: a buffer sized for the worst case, whose used
length is known only on the device (the expert-parallel ``allgather`` dispatch). Rows past the sum
belong to no group: they add nothing to ``weight``'s gradient, and their rows of ``y`` and of
``x``'s gradient are unspecified (zero in the reference; a grouped GEMM leaves them unwritten), so
a caller that passes such rows masks them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .opdef import OpDef, Sample, randn


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``x[N, K]`` (rows grouped by ``counts[E]``, which sums to at most N), ``weight[E, M, K]`` -> ``y[N, M]``."""
    sizes = counts.tolist()
    used = sum(sizes)
    if used > x.shape[0]:
        raise ValueError(f"grouped_linear: counts sum to {used}, more than the {x.shape[0]} rows of x")
    outs = [F.linear(rows, w) for rows, w in zip(x[:used].split(sizes), weight.unbind(0))]
    if used < x.shape[0]:  # rows of no group (see the module docstring)
        outs.append(torch.zeros(x.shape[0] - used, weight.shape[1], dtype=outs[0].dtype, device=x.device))
    return torch.cat(outs)


def grouped_mm_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """`grouped_linear` as one ``torch._grouped_mm`` (bf16, Hopper): no loop and no host sync.

    Falls back to the reference where the grouped GEMM does not apply (other dtypes, or dims that
    are not multiples of 8, which its TMA loads need). Under autocast it runs in the autocast dtype.
    """
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.shape[-1] % 8 or weight.shape[1] % 8:
        return grouped_linear(x, weight, counts)
    offsets = counts.cumsum(0, dtype=torch.int32)  # one kernel: the sum is made in int32
    # the grouped GEMM wants dense row-major operands (16-byte aligned strides); no copy when they are
    return torch._grouped_mm(x.contiguous(), weight.contiguous().transpose(-2, -1), offs=offsets)


def _samples(dtype, device, gen):
    cases = [([3, 0, 5, 8], 32, 16), ([1], 8, 8), ([0, 0, 4], 16, 24), ([7, 9, 2, 6, 1, 3], 64, 48)]
    for counts, k, m in cases:
        x = randn(sum(counts), k, dtype=dtype, device=device, generator=gen)
        w = randn(len(counts), m, k, dtype=dtype, device=device, generator=gen, scale=k ** -0.5)
        yield Sample((x, w, torch.tensor(counts, device=device)), {}, f"E{len(counts)}N{sum(counts)}K{k}M{m}", k)


OPDEFS = [OpDef(name="grouped_linear",
                signature="grouped_linear(x[N, K], weight[E, M, K], counts[E]) -> y[N, M]",
                reference=grouped_linear, samples=_samples, grad_inputs=(0, 1))]
