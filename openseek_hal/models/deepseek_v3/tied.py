"""One gradient for a weight shared by the token embedding and the output head (``tie_word_embeddings``).

The shared weight is read at both ends of a forward: gathered by the embedding first, multiplied by the
head last. Left to autograd, each use makes its own dense vocab x hidden gradient and the engine adds them
before the weight's gradient is ready: the embedding's is a zero-filled table with a few thousand rows
scattered into it, and the add reads two tables and writes a third (OpenSeek-Small: 389 MB each, about
0.5 ms of an H100 step). Here every head use hands its dense gradient to a `TiedGradient` and gives autograd
none; every embedding use adds its rows to it (the backend's `embedding_add_rows` op: repeated tokens
summed in float32, the same bits on every run), and the *first* embedding lookup of the forward, which
autograd runs last (every other use of the weight lies downstream of it), returns the whole gradient to
the weight.

The order rests on autograd's: a node runs once its inputs are ready, and among ready nodes the one made
later runs first, so a head's hand-over (made after the lookup, ready as soon as the head's backward ran)
always precedes the first lookup's backward. A use whose gradient arrives after the collection (which that
order rules out) raises instead of being dropped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...ops.embedding import embedding_add_rows

AddRows = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class TiedGradient:
    """The collector of one forward's uses of the shared weight. ``add_rows`` is the backend's
    ``embedding_add_rows`` (``total[ids] += rows``; it may update ``total`` in place, and returns it)."""

    def __init__(self, weight: torch.Tensor, add_rows: AddRows = embedding_add_rows):
        self.weight = weight
        self._add_rows = add_rows
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
        if self.dense is None:
            self.dense = grad
        else:  # the first head's gradient is ours alone (autograd keeps none): add in place, no third table
            self.dense.add_(grad)

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
            total = self._add_rows(total, more_ids, rows)
        self.dense, self.rows = None, []
        return total


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
