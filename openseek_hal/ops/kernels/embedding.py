"""Triton ``embedding_add_rows``: an embedding's weight gradient added into a dense table, deterministically.

``total[ids[i]] += rows[i]`` for every token ``i``. The ids are sorted (torch's stable sort, as 32-bit keys
when the table allows) so that the tokens of one id lie side by side, and each position's run end is found
by one vectorized search (`torch.searchsorted`). A program covers a few sorted positions and a block of
columns; at each position that starts a run it sums the run's rows ``BLOCK_R`` at a time (a loop of known
length, whose loads can be issued ahead) in float32 and adds the sum to the table's row, rounding once.
No atomics: the same bits on every run, as ``index_put_(accumulate=True)`` gives, which this replaces (its
kernel walks a run one row at a time, and a frequent token of a text batch has hundreds of copies).
Nothing here reads the device from the host, so a captured step keeps it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..embedding import check_add_rows_args
from ._common import acc_type, as_rows


@triton.jit
def _add_sorted_rows(TOTAL, SORTED, ENDS, PERM, ROWS, n, n_rows_total, dim, stride_total, stride_rows,
                     ACC: tl.constexpr, POSITIONS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """For each run of ids that starts at one of this program's ``POSITIONS`` sorted positions:
    ``total[id] += sum of rows[perm[j]]`` over the run (``ENDS``: each position's run end), ``BLOCK_R`` rows
    a step, in order, for the ``BLOCK_D`` columns of this program."""
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < dim
    r = tl.arange(0, BLOCK_R)
    for q in range(POSITIONS):
        i = tl.program_id(0) * POSITIONS + q
        row_id = tl.load(SORTED + i, mask=i < n, other=-1)
        prev = tl.load(SORTED + tl.maximum(i - 1, 0), mask=i < n, other=-1)
        # ids out of the table's range were refused by the embedding's forward; they are never written here
        if (i < n) & ((i == 0) | (prev != row_id)) & (row_id >= 0) & (row_id < n_rows_total):
            end = tl.load(ENDS + i)
            acc = tl.zeros([BLOCK_D], dtype=ACC)
            for start in range(i, end, BLOCK_R):
                pos = start + r
                in_run = pos < end
                src = tl.load(PERM + pos, mask=in_run, other=0).to(tl.int64)
                tile = tl.load(ROWS + src[:, None] * stride_rows + cols[None, :],
                               mask=in_run[:, None] & col_mask[None, :], other=0.0)
                acc += tl.sum(tile.to(ACC), axis=0)
            dst = TOTAL + row_id.to(tl.int64) * stride_total + cols
            total = tl.load(dst, mask=col_mask, other=0.0).to(ACC)
            tl.store(dst, (total + acc).to(TOTAL.dtype.element_ty), mask=col_mask)


def embedding_add_rows(total: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``total[ids[i]] += rows[i]`` in place (repeated ids summed in float32, float64 for float64 tables, then
    added and rounded once); returns ``total``. ``ids`` any shape, ``rows`` ``ids.shape + (dim,)``."""
    check_add_rows_args(total, ids, rows)
    n, dim = ids.numel(), total.shape[1]
    if n == 0 or dim == 0 or total.shape[0] == 0:
        return total
    if total.stride(1) != 1:  # the kernel adds along unit-stride rows: work on a copy, then write it back
        return total.copy_(embedding_add_rows(total.contiguous(), ids, rows))
    flat = as_rows(rows)
    keys = ids.reshape(-1)
    if total.shape[0] <= torch.iinfo(torch.int32).max and keys.dtype != torch.int32:
        keys = keys.to(torch.int32)  # half the radix passes of 64-bit keys
    sorted_ids, perm = torch.sort(keys, stable=True)
    ends = torch.searchsorted(sorted_ids, sorted_ids, right=True, out_int32=True)
    block_d = min(128, triton.next_power_of_2(dim))
    positions = 4
    _add_sorted_rows[(triton.cdiv(n, positions), triton.cdiv(dim, block_d))](
        total, sorted_ids, ends, perm, flat, n, total.shape[0], dim, total.stride(0), flat.stride(0),
        ACC=acc_type(total.dtype), POSITIONS=positions, BLOCK_R=32, BLOCK_D=block_d, num_warps=4)
    return total
