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
    assert {c.check for c in result.checks} == {"logits", "loss_curve", "grad_norm_curve", "ep2_vs_ep1"}
    ep = [c for c in result.checks if c.check == "ep2_vs_ep1"]
    assert [(c.status, c.sample) for c in ep] == [("pass", "ep2xdp1:torch")] and ep[0].err_ratio < 1
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


_WRONG_EXPERT_SCALE = """
import openseek_hal.train.expert_parallel as ep

_real = ep.average_gradients


def _wrong(model, comm, expert_dp_comm):
    _real(model, comm, expert_dp_comm)
    for p in model.parameters():
        if ep.is_expert_param(p) and p.grad is not None:
            p.grad.mul_(comm.world_size)  # a planted bug: expert gradients not divided by the world size


ep.average_gradients = _wrong
"""


def test_the_expert_parallel_check_fails_an_expert_gradient_scaled_wrong(tmp_path):
    """The fault lives in every rank process (a sitecustomize on PYTHONPATH), as a real bug would."""
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "sitecustomize.py").write_text(_WRONG_EXPERT_SCALE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "openseek_hal", "conform", "--backend", "cpu", "--level", "model",
                           "--quick", "--seed", "0", "--report", str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    checks = json.loads((tmp_path / "conform-cpu.json").read_text())["checks"]
    ep = [c for c in checks if c["check"] == "ep2_vs_ep1"]
    assert [c["status"] for c in ep] == ["fail"] and "grad" in ep[0]["message"]
    assert all(c["status"] == "pass" for c in checks if c["check"] != "ep2_vs_ep1")  # the fault is EP's alone
