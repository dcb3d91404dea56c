"""Token embedding lookup, and its weight gradient added into a table (references and OpDefs).

A backend may simply use torch's lookup. ``embedding_add_rows`` is the lookup's backward into an existing
dense gradient: a weight shared by the embedding and the output head (tied) gets the head's dense gradient
first, and the lookup's rows are added into that table instead of a second, zero-filled one."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .opdef import OpDef, Sample, randn


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.embedding(ids, weight)


def check_add_rows_args(total: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor) -> None:
    """The argument contract of `embedding_add_rows`, shared by the reference and the kernels (ValueError)."""
    if total.dim() != 2:
        raise ValueError(f"embedding_add_rows: the table must be 2-D (rows, dim), got shape {tuple(total.shape)}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"embedding_add_rows: ids must be int32 or int64, got {ids.dtype}")
    if tuple(rows.shape) != (*ids.shape, total.shape[1]):
        raise ValueError(f"embedding_add_rows: rows of shape {tuple(rows.shape)} do not match ids of shape "
                         f"{tuple(ids.shape)} and a table of width {total.shape[1]}")
    if not rows.is_floating_point():
        raise ValueError(f"embedding_add_rows: rows must be floating point, got {rows.dtype}")


def embedding_add_rows(total: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``total`` with ``rows[i]`` added to its row ``ids[i]`` for every ``i`` (an id may repeat): the gradient
    of ``embedding(ids, weight)`` for upstream ``rows``, added to ``total``. Sums in float32 (float64 for a
    float64 table) and rounds once to the table's dtype; this reference returns a new table and walks the ids
    in order (`index_add`), so its result is the same on every run. Ids must lie in the table."""
    check_add_rows_args(total, ids, rows)
    acc = torch.promote_types(total.dtype, torch.float32)
    flat = rows.reshape(-1, total.shape[1]).to(acc)
    return total.to(acc).index_add(0, ids.reshape(-1), flat).to(total.dtype)


def _samples(dtype, device, gen):
    for vocab, dim, ids_shape in [(100, 32, (4, 7)), (1, 8, (3,)), (1000, 64, (2, 0)), (50, 16, (1, 1))]:
        weight = randn(vocab, dim, dtype=dtype, device=device, generator=gen)
        ids = torch.randint(0, vocab, ids_shape, generator=gen).to(device)
        yield Sample((ids, weight), name=f"V{vocab}xD{dim}:ids{'x'.join(map(str, ids_shape))}")


def _add_rows_samples(dtype, device, gen):
    # (label, table rows, width, ids' shape, ids drawn from [0, drawn), id dtype): repeated ids, runs longer than
    # a kernel's block of rows, table rows no id names, a one-row table, int32 ids, no ids
    cases = [("V50xD16:ids4x7", 50, 16, (4, 7), 50, torch.int64),
             ("V20xD300:ids200-long-runs", 20, 300, (200,), 4, torch.int64),
             ("V1xD8:ids40-one-row", 1, 8, (40,), 1, torch.int64),
             ("V64xD32:ids2x33-int32", 64, 32, (2, 33), 64, torch.int32),
             ("V10xD5:ids0", 10, 5, (0,), 10, torch.int64)]
    for name, vocab, dim, shape, drawn, id_dtype in cases:
        total = randn(vocab, dim, dtype=dtype, device=device, generator=gen)
        ids = torch.randint(0, drawn, shape, generator=gen).to(dtype=id_dtype, device=device)
        rows = randn(*shape, dim, dtype=dtype, device=device, generator=gen)
        # the longest sum is one id's run: at most every row
        yield Sample((total, ids, rows), name=name, reduction_length=max(1, ids.numel()))


# Backward scatters into the weight gradient by index: atomics on most chips, so not bitwise stable.
OPDEFS = [OpDef(name="embedding", signature="embedding(ids, weight) -> weight[ids]",
                reference=embedding, samples=_samples, deterministic=False, grad_inputs=(1,)),
          OpDef(name="embedding_add_rows",
                signature="embedding_add_rows(total, ids, rows) -> total with rows[i] added to row ids[i]",
                reference=embedding_add_rows, samples=_add_rows_samples, differentiable=False,
                doc="Fast implementations update total in place and return it; the reference returns a new "
                    "table. Repeated ids are summed; implementations sum in a fixed order (the same bits "
                    "on every call), in float32 or wider, and round once. Ids must lie in the table (the "
                    "lookup's forward checked them).")]
