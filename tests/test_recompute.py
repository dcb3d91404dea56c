"""Per-block recomputation (`recompute: true`): the same losses as storing the activations, and the blocks
draw no random numbers, which is what lets `torch.utils.checkpoint` run without saving RNG state (saving it
reads the device generator, which a CUDA graph capture refuses on older torch)."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console
from torch.utils._python_dispatch import TorchDispatchMode

from openseek_hal.models import build_model
from openseek_hal.train.config import load_config
from openseek_hal.train.trainer import train

RANDOM = ("rand", "normal", "bernoulli", "dropout", "uniform", "multinomial", "exponential", "cauchy",
          "geometric", "log_normal", "random_")


class _RandomOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(word in str(func) for word in RANDOM):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_blocks_draw_no_random_numbers():
    model = build_model("tiny", "cpu", seed=0)
    model.train()
    gen = torch.Generator().manual_seed(0)
    ids, labels = (torch.randint(0, model.config.vocab_size, (2, 16), generator=gen) for _ in range(2))
    with _RandomOps() as ops:
        model.loss(ids, labels).total.backward()
    assert ops.seen == []
    with _RandomOps() as ops:  # the recorder is not blind
        torch.nn.functional.dropout(torch.ones(4), 0.5, training=True)
    assert ops.seen


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENSEEK_HAL_CACHE", str(tmp_path / "cache"))


def test_recomputed_blocks_train_as_stored_ones(tmp_path):
    """fp64, MTP on: recomputation re-runs the same operators on the same inputs, so the losses agree to
    float64 rounding (the MoE's balance counts are not doubled by the re-run: the aux-free bias moves the
    same way)."""
    runs = {}
    for recompute in (False, True):
        cfg = load_config(None, {"global_batch_size": 4, "seq_len": 16, "lr": 2e-2, "warmup_steps": 2,
                                 "tokenizer_vocab_size": 300, "sample_tokens": 1, "eval_batches": 1, "steps": 5,
                                 "model.num_hidden_layers": 2, "dtype": "fp64", "save": False,
                                 "recompute": recompute, "out": str(tmp_path / str(recompute))})
        runs[recompute] = train(cfg, console=Console(file=open(tmp_path / f"{recompute}.log", "w"))).losses  # noqa: SIM115
    assert len(set(runs[False])) == len(runs[False])
    assert all(abs(a - b) <= 1e-12 * abs(b) for a, b in zip(runs[True], runs[False], strict=True)), runs
