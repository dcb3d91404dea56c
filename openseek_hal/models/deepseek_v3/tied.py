"""One gradient for a weight shared by the token embedding and the output head (``tie_word_embeddings``).

The shared weight is read at both ends of a forward: gathered by the embedding first, multiplied by the
head last. Left to autograd, each use makes its own dense vocab x hidden gradient and the engine adds them
before the weight's gradient is ready: the embedding's is a zero-filled table with a few thousand rows
scattered into it, and the add reads two tables and writes a third (OpenSeek-Small: 389 MB each, about
0.5 ms of an H100 step). Here every head use hands its dense gradient to a `TiedGradient` and gives autograd
none; every embedding use adds its rows to it (`_add_rows`: repeated tokens summed in float32, the same bits
on every run), and the *first* embedding lookup of the forward, which autograd runs last (every other use of
the weight lies downstream of it), returns the whole gradient to the weight.

The order rests on autograd's: a node runs once its inputs are ready, and among ready nodes the one made
later runs first, so a head's hand-over (made after the lookup, ready as soon as the head's backward ran)
always precedes the first lookup's backward. A use whose gradient arrives after the collection (which that
order rules out) raises instead of being dropped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class TiedGradient:
    """The collector of one forward's uses of the shared weight."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.dense: torch.Tensor | None = None  # the heads' gradients, summed
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []  # later lookups' (ids, gradient rows)
        self.collected = False
        self._looked_up = False

    def lookup(self, embed: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        """``embed(ids, weight)``; the first lookup of a forward returns the weight's whole gradient."""
        first, self._looked_up = not self._looked_up, True
        return _Lookup.apply(ids, self.weight, self, embed, first)

    def head_weight(self) -> torch.Tensor:
        """The weight for a head: its gradient goes to this collector, not to autograd."""
        return _HeadUse.apply(self.weight, self)

    def _deposit_dense(self, grad: torch.Tensor) -> None:
        self._check_open()
        self.dense = grad if self.dense is None else self.dense + grad

    def _deposit_rows(self, ids: torch.Tensor, grad: torch.Tensor) -> None:
        self._check_open()
        self.rows.append((ids, grad))

    def _check_open(self) -> None:
        if self.collected:
            raise RuntimeError("a use of the tied embedding / head weight reached backward after its gradient was "
                               "returned; its contribution would be lost")

    def _collect(self, ids: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        self._check_open()
        self.collected = True
        total = self.dense if self.dense is not None else torch.zeros_like(self.weight)
        for more_ids, rows in [*self.rows, (ids, grad)]:
            _add_rows(total, more_ids.reshape(-1), rows.reshape(-1, rows.shape[-1]))
        self.dense, self.rows = None, []
        return total


def _add_rows(total: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor) -> None:
    """``total[ids[i]] += rows[i]``, the same bits on every run. On CUDA ``index_put_(accumulate=True)`` sorts
    the ids and sums each id's rows in float32 before one add (deterministic); on the CPU that call adds with
    atomics across threads (run-to-run differences in the last bits), so the CPU takes ``index_add_``, which
    walks the ids in order (in float32 for narrower dtypes)."""
    if total.device.type != "cpu":
        total.index_put_((ids,), rows.to(total.dtype), accumulate=True)
    elif total.dtype in (torch.float32, torch.float64):
        total.index_add_(0, ids, rows.to(total.dtype))
    else:
        total.copy_(total.float().index_add_(0, ids, rows.float()))


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, tied, embed, first):
        ctx.tied, ctx.first = tied, first
        ctx.save_for_backward(ids)
        return embed(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        tied = ctx.tied
        if not ctx.first:
            tied._deposit_rows(ids, grad)
            return None, None, None, None, None
        return None, tied._collect(ids, grad), None, None, None


class _HeadUse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, tied):
        ctx.tied = tied
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        ctx.tied._deposit_dense(grad)
        return None, None
