"""The model level: the same training steps on a backend and on the float64 reference."""

from __future__ import annotations

import torch
from torch import nn

from openseek_hal.conformance import SuiteConfig, run_suite
from openseek_hal.conformance.model_level import ModelSpec


def test_every_backend_passes_the_model_level(backend_name):
    result = run_suite(SuiteConfig(backend=backend_name, levels=("model",), dtypes=[torch.float32], seed=0,
                                   model_steps=3))
    assert result.ok, [(c.check, c.message) for c in result.failures()]
    assert {c.check for c in result.checks} == {"logits", "loss_curve", "grad_norm_curve"}
    curve = result.curves[0]
    assert len(curve["loss"]) == 3 and curve["loss_ref"][2] < curve["loss_ref"][0]  # it learns
    assert all(abs(a - b) <= 1e-5 * b for a, b in zip(curve["loss"], curve["loss_ref"]))


class _Bigram(nn.Module):
    def __init__(self, backend, vocab: int = 32):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, ids):
        return {"logits": self.table(ids)}  # the model level accepts tensors, tuples, dicts and objects


def test_model_level_takes_any_model_factory():
    spec = ModelSpec(name="bigram", factory=_Bigram, vocab_size=32, seq=8)
    result = run_suite(SuiteConfig(backend="cpu", levels=("model",), seed=1, model_steps=2, model_spec=spec))
    assert result.ok and {c.sample for c in result.checks} == {"bigram"}
    assert [c["dtype"] for c in result.curves] == ["float32", "bfloat16"]


def test_a_model_that_cannot_be_built_is_an_error_not_a_crash():
    def broken(backend):
        raise RuntimeError("no such preset")

    spec = ModelSpec(name="broken", factory=broken, vocab_size=8)
    result = run_suite(SuiteConfig(backend="cpu", levels=("model",), seed=0, model_steps=1, model_spec=spec))
    assert not result.ok and [c.status for c in result.checks] == ["error"]
    assert "no such preset" in result.checks[0].message
