"""Every way the model and the trainer call an op has a conformance sample that calls it that way.

A recording backend wraps each op the model resolves; a forward and backward of each preset's
architecture (shrunk to a few thousand parameters, its routing, attention and MTP settings kept) and
an optimizer step in each weight regime record every call. A call's *mode* is its arguments bound to
the reference's signature: each tensor argument present or None, each flag and string as it is,
each float as zero or not, each integer as 0, 1 or more. A mode no sample has is a path of a vendor's kernel that
conformance never checks, and fails this test.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch

from openseek_hal import ops
from openseek_hal.backends.cpu import CPUBackend
from openseek_hal.models import build_model
from openseek_hal.models.deepseek_v3.presets import PRESETS, preset
from openseek_hal.train.zero import DistributedOptimizer, named_spaces

SHRINK = dict(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
              qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=64)


def _class(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, torch.Tensor):
        return "tensor"
    if isinstance(value, (list, tuple)):
        return f"[{_class(value[0])}]" if value else "[]"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, float):  # a rate, an epsilon, a scale: only switching a term off is a mode
        return "0" if value == 0 else "nonzero"
    if isinstance(value, int):  # a count: one (top-1, one group, the first step) is a mode of its own
        return "0" if value == 0 else "1" if value == 1 else "other"
    return type(value).__name__


def mode(name: str, args: tuple, kwargs: dict) -> tuple[tuple[str, str], ...]:
    bound = inspect.signature(ops.get(name).reference).bind(*args, **kwargs)
    bound.apply_defaults()
    return tuple((k, _class(v)) for k, v in bound.arguments.items())


class Recording(CPUBackend):
    name = "recording-test"

    def __init__(self, without: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.calls: dict[tuple[str, tuple], int] = {}
        self.without = without  # ops this backend does not have natively (the model composes others instead)

    def native_ops(self):
        return {name: fn for name, fn in super().native_ops().items() if name not in self.without}

    def op(self, name: str) -> Callable[..., Any]:
        fn = super().op(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            key = (name, mode(name, args, kwargs))
            self.calls[key] = self.calls.get(key, 0) + 1
            return fn(*args, **kwargs)
        return call


def _sample_modes() -> set[tuple[str, tuple]]:
    out = set()
    for name in ops.REGISTRY:
        opdef = ops.get(name)
        for dtype in opdef.dtypes:
            for s in opdef.samples(dtype, torch.device("cpu"), torch.Generator().manual_seed(0)):
                out.add((name, mode(name, s.args, s.kwargs)))
    return out


def _record_model(backend: Recording, name: str, without: tuple[str, ...] = ()) -> None:
    """A forward and backward of preset ``name``, shrunk; ``without``: as on a backend lacking those ops."""
    if without:  # a backend's native table is fixed once resolved: record on another, keep its calls
        other = Recording(without)
        _record_model(other, name)
        for key, n in other.calls.items():
            backend.calls[key] = backend.calls.get(key, 0) + n
        return
    fields = dict(SHRINK)
    p = PRESETS[name]
    if p["q_lora_rank"] is not None:
        fields["q_lora_rank"] = 16
    # as many experts as keeps the preset's grouping (n_group, topk_group, top-k) valid
    fields["n_routed_experts"] = max(p["n_group"] * 2, p["num_experts_per_tok"] * 2)
    fields["first_k_dense_replace"] = min(p["first_k_dense_replace"], 1)
    torch.manual_seed(0)
    model = build_model(preset(name, **fields), backend, seed=0)
    model.train()
    ids = torch.randint(0, fields["vocab_size"], (2, 17))
    model.loss(ids[:, :-1], ids[:, 1:]).total.backward()
    model.update_expert_bias()


def _record_optimizer(backend: Recording, dtype: torch.dtype, master_remainder: bool = False) -> None:
    model = torch.nn.Linear(4, 3).to(dtype)
    opt = DistributedOptimizer(named_spaces(model, None, None, lambda p: False), backend, world=None, lr=1e-3,
                               betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, master_remainder=master_remainder)
    opt.start_step(1)
    model(torch.randn(2, 4).to(dtype)).sum().backward()
    opt.finish_gradients()
    opt.step(1e-3, 1.0)


@pytest.fixture(scope="module")
def recorded() -> dict[tuple[str, tuple], int]:
    backend = Recording()
    for name in PRESETS:
        _record_model(backend, name)
    _record_model(backend, "openseek-small", without=("linear_cross_entropy",))
    # the CPU regime, and the accelerators' (fp32 masters: whole, and as remainders of the weights)
    for dtype, remainder in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)):
        _record_optimizer(backend, dtype, remainder)
    return backend.calls


def test_every_mode_the_model_and_trainer_call_has_a_sample(recorded):
    samples = _sample_modes()
    missing = [f"{name}({', '.join(f'{k}={v}' for k, v in m)})" for name, m in recorded if (name, m) not in samples]
    assert not missing, "calls with no conformance sample:\n" + "\n".join(sorted(missing))


def test_the_recording_sees_the_modes_it_must():
    """The recording is real: the head's loss as one op and (on a backend without it) the in-place cross
    entropy, the interleaved rotation, routing with and without groups and the master-weight optimizer step
    (whole masters and remainders) all show up."""
    backend = Recording()
    for name in PRESETS:
        _record_model(backend, name)
    _record_model(backend, "openseek-small", without=("linear_cross_entropy",))
    _record_optimizer(backend, torch.bfloat16)
    _record_optimizer(backend, torch.bfloat16, master_remainder=True)
    seen = {(name, key, dict(m).get(key)) for name, m in backend.calls for key in
            ("inplace_backward", "interleaved", "n_group", "master_params", "param_remainders")}
    assert ("linear_cross_entropy", "ignore_index", "other") in {(name, k, v) for name, m in backend.calls
                                                                 for k, v in m}
    assert {("cross_entropy", "inplace_backward", "True"), ("mla_qkv", "interleaved", "True"),
            ("moe_route", "n_group", "1"), ("moe_route", "n_group", "other"), ("adamw", "master_params", "[tensor]"),
            ("adamw", "param_remainders", "[tensor]")} <= seen
