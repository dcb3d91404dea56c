"""Token cross entropy over large vocabularies, with ``ignore_index`` and optional z-loss; and the output
head's matmul with its loss as one op (``linear_cross_entropy``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .opdef import OpDef, Sample, randn


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean", z_loss: float = 0.0, inplace_backward: bool = False) -> torch.Tensor:
    """Mean (over non-ignored rows) or sum of ``logsumexp(logits) - logits[target]``.

    ``inplace_backward=True`` lets a fast implementation write the logits' gradient into the
    logits' storage (training, where nothing reads the logits after the loss); it never changes
    the result, and the reference ignores it.

    With ``z_loss > 0`` each kept row adds ``z_loss * logsumexp(logits) ** 2`` (PaLM's z-loss).
    A mean over zero kept rows is 0, not NaN, so an all-padding batch does not poison training.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    acc = torch.promote_types(logits.dtype, torch.float32)
    x = logits.to(acc)
    keep = target != ignore_index
    safe_target = torch.where(keep, target, torch.zeros_like(target))
    lse = torch.logsumexp(x, dim=-1)
    loss = lse - x.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
    if z_loss:
        loss = loss + z_loss * lse.pow(2)
    total = torch.where(keep, loss, torch.zeros_like(loss)).sum()
    if reduction == "sum":
        return total
    return total / keep.sum().clamp(min=1).to(acc)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                         z_loss: float = 0.0) -> torch.Tensor:
    """``cross_entropy(x @ weight.T, target)``, the mean over non-ignored rows: an output head (``x[N, H]``,
    ``weight[V, H]``) and its loss in one op, so that an implementation may compute the logits' gradient
    while it computes the loss (the logits exist only for this loss) and never read the logits again.

    The logits are rounded to ``x``'s dtype, as a separate linear layer's output would be, before the loss
    (taken in float32 or wider).
    """
    return cross_entropy(F.linear(x, weight), target, ignore_index, "mean", z_loss)


def _samples(dtype, device, gen):
    for rows, vocab in [(8, 100), (1, 1), (5, 4099), (0, 16), (16, 32000)]:
        logits = randn(rows, vocab, dtype=dtype, device=device, generator=gen, scale=3.0)
        target = torch.randint(0, vocab, (rows,), generator=gen)
        if rows > 2:
            target[::3] = -100
        yield Sample((logits, target.to(device)), {}, f"{rows}x{vocab}", vocab)
    logits = randn(6, 500, dtype=dtype, device=device, generator=gen, scale=3.0)
    target = torch.randint(0, 500, (6,), generator=gen).to(device)
    yield Sample((logits, target), {"reduction": "sum", "z_loss": 1e-4}, "6x500:sum+z", 500)
    # the model's call: mean over kept rows, the gradient written into the logits' storage
    logits = randn(9, 777, dtype=dtype, device=device, generator=gen, scale=3.0)
    target = torch.randint(0, 777, (9,), generator=gen)
    target[[1, 5]] = -100
    yield Sample((logits, target.to(device)), {"inplace_backward": True}, "9x777:inplace", 777)
    # a z-loss that matters in bf16: z * lse**2 is about a tenth of the loss
    logits = randn(7, 300, dtype=dtype, device=device, generator=gen, scale=4.0)
    target = torch.randint(0, 300, (7,), generator=gen).to(device)
    yield Sample((logits, target), {"z_loss": 1e-2, "inplace_backward": True}, "7x300:z1e-2+inplace", 300)
    wide = randn(4, 2048, dtype=dtype, device=device, generator=gen)[:, :1000]
    target = torch.tensor([3, -100, 999, 0]).to(device)
    yield Sample((wide, target), {"ignore_index": -100}, "4x1000-strided", 1000)


def _linear_samples(dtype, device, gen):
    # 17000: three chunks of the widest launch (8192), the last partial, in the fused kernel's reversed order
    for rows, hidden, vocab in [(8, 32, 100), (1, 16, 1), (5, 64, 4099), (0, 16, 16), (33, 128, 1000),
                                (3, 16, 17000)]:
        x = randn(rows, hidden, dtype=dtype, device=device, generator=gen)
        weight = randn(vocab, hidden, dtype=dtype, device=device, generator=gen, scale=0.5)
        target = torch.randint(0, vocab, (rows,), generator=gen)
        if rows > 2:
            target[::3] = -100
        yield Sample((x, weight, target.to(device)), {}, f"{rows}x{hidden}->{vocab}", max(rows, hidden, vocab))
    x = randn(6, 48, dtype=dtype, device=device, generator=gen)
    weight = randn(500, 48, dtype=dtype, device=device, generator=gen, scale=0.5)
    target = torch.tensor([3, -100, 499, 0, 7, 7]).to(device)
    yield Sample((x, weight, target), {"z_loss": 1e-2}, "6x48->500:z1e-2", 500)
    # every row ignored: loss 0 and zero gradients
    x = randn(4, 32, dtype=dtype, device=device, generator=gen)
    weight = randn(64, 32, dtype=dtype, device=device, generator=gen)
    yield Sample((x, weight, torch.full((4,), -100).to(device)), {}, "4x32->64:all-ignored", 64)


OPDEFS = [OpDef(name="cross_entropy",
                signature="cross_entropy(logits[N, V], target[N], ignore_index=-100, reduction='mean', "
                          "z_loss=0.0, inplace_backward=False) -> loss",
                reference=cross_entropy, samples=_samples, grad_inputs=(0,)),
          OpDef(name="linear_cross_entropy",
                signature="linear_cross_entropy(x[N, H], weight[V, H], target[N], ignore_index=-100, "
                          "z_loss=0.0) -> loss",
                reference=linear_cross_entropy, samples=_linear_samples, grad_inputs=(0, 1))]
