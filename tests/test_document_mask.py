"""Document masking for packed training windows: boundaries from the end-of-text tokens, attention kept inside
each document (the model and the trainer's `document_mask`)."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

from openseek_hal.backend import get_backend
from openseek_hal.models import build_model
from openseek_hal.ops.attention import document_ids, eos_boundaries
from openseek_hal.train.config import load_config
from openseek_hal.train.trainer import train

EOS = 3


def _starts(ids: torch.Tensor, eos: int) -> torch.Tensor:
    """Each token's document start within its row, by a plain loop (the definition)."""
    out = torch.empty_like(ids)
    for b in range(ids.shape[0]):
        start = 0
        for s in range(ids.shape[1]):
            out[b, s] = start
            if int(ids[b, s]) == eos:
                start = s + 1
    return out


@pytest.mark.parametrize("seed", range(4))
def test_eos_boundaries_give_each_token_its_document(seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 6, (3, 17), generator=gen)  # EOS (3) at about 1 in 6 tokens
    ids[0, 0] = ids[0, -1] = ids[1, 5] = ids[1, 6] = EOS  # first token, row end, two in a row
    ids[2] = 1  # a row without any end-of-text token: one document
    cu = eos_boundaries(ids, EOS)
    assert cu.dtype == torch.int32 and cu.shape == (3 * 17 + 3 + 1,)  # fixed length whatever the data
    doc = document_ids(cu, 3, 17)
    flat = doc.reshape(-1)
    # tokens share a document exactly where they share a row and a start
    starts = _starts(ids, EOS) + torch.arange(3)[:, None] * 17
    same = starts.reshape(-1)[:, None] == starts.reshape(-1)[None, :]
    assert torch.equal(flat[:, None] == flat[None, :], same)


def _bounds_kernel():
    from openseek_hal.ops.kernel_loader import load_kernels

    return load_kernels(interpret=True).attention.document_bounds


def test_the_flash_kernels_bounds_follow_the_same_boundaries():
    ids = torch.tensor([[5, EOS, 2, EOS, 4, 4], [EOS, 7, 7, 8, EOS, EOS]])
    start, end = _bounds_kernel()(eos_boundaries(ids, EOS), 2, 6)
    assert start.tolist() == [[0, 0, 2, 2, 4, 4], [0, 1, 1, 1, 1, 5]]
    assert end.tolist() == [[2, 2, 4, 4, 6, 6], [1, 5, 5, 5, 5, 6]]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_the_bounds_kernel_matches_a_loop_over_any_boundaries(seed, dtype):
    """Boundaries as flash-attn's varlen callers give them (documents straddling rows, empty documents,
    one whole-batch document) against each token's document start and end by a plain loop."""
    gen = torch.Generator().manual_seed(seed)
    batch, seq = 3, 37
    total = batch * seq
    inner = torch.randint(0, total + 1, (int(torch.randint(0, 40, (1,), generator=gen)),), generator=gen)
    cu = torch.cat([torch.tensor([0]), inner.sort().values, torch.tensor([total])]).to(dtype)
    start, end = _bounds_kernel()(cu, batch, seq)
    bounds = cu.tolist()
    for t in range(total):
        doc = max(i for i in range(len(bounds) - 1) if bounds[i] <= t)
        row = t // seq
        want_start = max(bounds[doc], row * seq) - row * seq
        want_end = min(bounds[doc + 1], (row + 1) * seq) - row * seq
        assert (int(start[row, t % seq]), int(end[row, t % seq])) == (want_start, want_end), (t, bounds)


def test_a_masked_document_ignores_the_documents_before_it():
    """With the boundaries, changing the first document's tokens leaves every logit of the second document
    (main and MTP) as it was, up to float64 rounding (the routed experts' matmuls take other row counts when
    the first document's tokens route elsewhere, so their sums may be ordered differently); without them the
    second document's logits move by far more."""
    model = build_model("tiny", get_backend("cpu"), seed=0, dtype=torch.float64)
    model.eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 200, (2, 24), generator=gen)
    ids[:, 9] = EOS  # document 1: tokens 0-9, document 2: 10-23
    other = ids.clone()
    other[:, :9] = torch.randint(4, 200, (2, 9), generator=gen)
    with torch.no_grad():
        a, (a_mtp,) = model.forward_with_mtp(ids, eos_boundaries(ids, EOS))
        b, (b_mtp,) = model.forward_with_mtp(other, eos_boundaries(other, EOS))
        rounding = 1e-10  # float64: ~1e-16 relative a rounding, a few hundred terms a sum
        assert (a[:, 10:] - b[:, 10:]).abs().max() < rounding and (a_mtp[:, 10:] - b_mtp[:, 10:]).abs().max() < rounding
        assert (a[:, :9] - b[:, :9]).abs().max() > 1e-3
        assert (model(ids)[:, 10:] - model(other)[:, 10:]).abs().max() > 1e-4  # unmasked: across the separator
        # the same masking through the loss (the trainer's path): a different loss than unmasked
        labels = torch.roll(ids, -1, 1)
        masked = model.loss(ids, labels, cu_seqlens=eos_boundaries(ids, EOS)).total
        assert torch.isfinite(masked) and masked != model.loss(ids, labels).total


def test_the_triton_kernels_mask_as_the_reference_does():
    """The flash kernel (interpreted) with the boundaries of packed rows against the reference attention."""
    pytest.importorskip("triton")
    from openseek_hal.ops import get
    from openseek_hal.ops.kernel_loader import kernel_table

    flash = kernel_table(interpret=True)["causal_attention"]
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(4, 50, (2, 40), generator=gen)
    ids[0, [6, 7, 30]] = EOS
    ids[1, [0, 39]] = EOS
    q, k = (torch.randn(2, 2, 40, 48, generator=gen) for _ in range(2))
    v = torch.randn(2, 2, 40, 32, generator=gen)
    cu = eos_boundaries(ids, EOS)
    expected = get("causal_attention").reference(q.double(), k.double(), v.double(), None, cu)
    assert torch.allclose(flash(q, k, v, None, cu_seqlens=cu).double(), expected, atol=1e-5, rtol=1e-4)


def test_training_with_document_mask(tmp_path, monkeypatch):
    """`document_mask: true` trains the tiny model on short documents (several in every window): finite losses
    that fall, and a first loss (and held-out loss) other than the unmasked run's on the same batches."""
    import json

    monkeypatch.setenv("OPENSEEK_HAL_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "docs.jsonl"
    words = "the quick brown fox jumps over a lazy dog while seven bakers sell warm bread".split()
    data.write_text("".join(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(5 + i % 7))})
                            + "\n" for i in range(400)))
    base = {"global_batch_size": 4, "seq_len": 64, "lr": 1e-2, "warmup_steps": 2, "tokenizer_vocab_size": 300,
            "sample_tokens": 4, "eval_batches": 1, "log_every": 5, "steps": 12, "model.num_hidden_layers": 2,
            "data": str(data)}
    quiet = Console(file=open("/dev/null", "w"))  # noqa: SIM115
    masked = train(load_config(None, {**base, "out": str(tmp_path / "m"), "document_mask": True}), console=quiet)
    plain = train(load_config(None, {**base, "out": str(tmp_path / "p")}), console=quiet)
    assert all(torch.isfinite(torch.tensor(masked.losses)))
    assert masked.losses[0] != plain.losses[0] and masked.val_loss != plain.val_loss
    assert sum(masked.losses[-3:]) / 3 < masked.losses[0] - 0.3


def test_recomputed_blocks_keep_the_documents():
    """Per-block recomputation passes the boundaries to the re-run: the same loss and gradients as stored
    activations (float64), and other ones than without the boundaries."""
    import copy

    from openseek_hal.train.recompute import wrap_blocks

    backend = get_backend("cpu")
    stored = build_model("tiny", backend, seed=0, dtype=torch.float64)
    recomputed = copy.deepcopy(stored)
    wrap_blocks(recomputed, recompute=True, compile=False, backend=backend)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 200, (2, 20), generator=gen)
    ids[0, 6] = ids[1, 12] = EOS
    labels = torch.roll(ids, -1, 1)
    cu = eos_boundaries(ids, EOS)
    losses, grads = [], []
    for model, boundaries in ((stored, cu), (recomputed, cu), (stored, None)):
        model.zero_grad()
        loss = model.loss(ids, labels, cu_seqlens=boundaries).total
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]))
    assert abs(losses[0] - losses[1]) <= 1e-12 * abs(losses[0])
    assert torch.allclose(grads[0], grads[1], rtol=1e-10, atol=1e-14)
    assert abs(losses[0] - losses[2]) > 1e-6
