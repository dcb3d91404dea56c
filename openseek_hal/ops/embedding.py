"""Token embedding lookup (reference and OpDef). A backend may simply use torch's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .opdef import OpDef, Sample, randn


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.embedding(ids, weight)


def _samples(dtype, device, gen):
    for vocab, dim, ids_shape in [(100, 32, (4, 7)), (1, 8, (3,)), (1000, 64, (2, 0)), (50, 16, (1, 1))]:
        weight = randn(vocab, dim, dtype=dtype, device=device, generator=gen)
        ids = torch.randint(0, vocab, ids_shape, generator=gen).to(device)
        yield Sample((ids, weight), name=f"V{vocab}xD{dim}:ids{'x'.join(map(str, ids_shape))}")


# Backward scatters into the weight gradient by index: atomics on most chips, so not bitwise stable.
OPDEFS = [OpDef(name="embedding", signature="embedding(ids, weight) -> weight[ids]",
                reference=embedding, samples=_samples, deterministic=False, grad_inputs=(1,))]
