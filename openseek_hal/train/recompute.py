"""Per-block activation recomputation and per-block ``torch.compile``, applied to a built model.

Recomputation keeps only each transformer block's input in forward and runs the block again in
backward (non-reentrant ``torch.utils.checkpoint``), trading one more forward for the activations
of every block. While a block is re-run, `RECOMPUTE.active` is set so the MoE does not count its
tokens for the aux-loss-free balance twice. Compilation wraps each block in ``torch.compile``
when the backend declares that the compiler supports it (`Capabilities.compile`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from rich.console import Console
from torch.utils.checkpoint import checkpoint

from ..backend import Backend
from ..models import DeepseekV3
from ..models.deepseek_v3.model import RECOMPUTE


@contextlib.contextmanager
def _recomputing() -> Iterator[None]:
    previous, RECOMPUTE.active = RECOMPUTE.active, True
    try:
        yield
    finally:
        RECOMPUTE.active = previous


def _contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), _recomputing()


def wrap_blocks(model: DeepseekV3, *, recompute: bool, compile: bool, backend: Backend,
                console: Console | None = None) -> None:
    """Make every block (MTP blocks included) recompute its activations and/or run compiled."""
    if compile and not backend.capabilities().compile:
        if console is not None:
            console.print(f"[yellow]compile: the {backend.name} backend does not support torch.compile; "
                          "running eagerly[/]")
        compile = False
    for block in [*model.layers, *(m.block for m in model.mtp)]:
        forward = block.forward
        if compile:
            forward = torch.compile(forward)
        if recompute:
            forward = _recomputed(forward)
        block.forward = forward


def _recomputed(forward):
    def run(*args):
        if not torch.is_grad_enabled():
            return forward(*args)
        # the blocks draw no random numbers (no dropout; tests/test_recompute.py checks), so the re-run needs no
        # saved RNG state, and saving it would read the device generator's state, which a CUDA graph
        # capture (graph_step) refuses on the torch versions before 2.10
        return checkpoint(forward, *args, use_reentrant=False, context_fn=_contexts, preserve_rng_state=False)
    return run
