"""The suite must catch real bugs: backends with planted faults fail, and the report names the op."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from openseek_hal.backend import register_backend, unregister_backend
from openseek_hal.backends.cpu import CPUBackend
from openseek_hal.conformance import SuiteConfig, run_suite
from openseek_hal.ops import cross_entropy, mla, moe, norm, rope


def _wrong_eps(x, weight, eps=1e-6):
    return norm.rms_norm(x, weight, eps * 10)


def _rope_reversed(x, cos, sin, interleaved=False):
    return rope.rope(x, cos, -sin, interleaved)


def _mla_rope_reversed(q, kv, k_rope, cos, sin, interleaved=False):
    return mla.mla_qkv(q, kv, k_rope, cos, -sin, interleaved)


def _ignore_index_dropped(logits, target, ignore_index=-100, reduction="mean", z_loss=0.0):
    # padding rows counted as if their target were token 0
    return cross_entropy.cross_entropy(logits, target.clamp(min=0), ignore_index=ignore_index,
                                       reduction=reduction, z_loss=z_loss)


class _SiluMulWrongBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        gate, up = x.chunk(2, dim=-1)
        s = torch.sigmoid(gate)
        return torch.cat([grad * up * s, grad * F.silu(gate)], dim=-1)  # d silu = s * (1 + gate * (1 - s)); term lost


def _routing_off_by_one(logits, bias=None, *, top_k, **kwargs):
    indices, weights, _ = moe.moe_route(logits, bias, top_k=top_k + 1, **kwargs)
    indices, weights = indices[:, 1:], weights[:, 1:]  # skips the best expert, takes the (k+1)-th
    return indices, weights, torch.bincount(indices.flatten(), minlength=logits.shape[1])


def _nondeterministic_rms_norm(x, weight, eps=1e-6):
    # the mean of squares summed in a different order each call, as atomics would
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    order = torch.randperm(x.shape[-1]) if x.shape[-1] else torch.arange(0)
    ms = xf[..., order].pow(2).mean(-1, keepdim=True)
    return (xf * torch.rsqrt(ms + eps) * weight.to(acc)).to(x.dtype)


# fault -> (op, native implementation, checks that must fail, checks that must not)
FAULTS = {
    "wrong_eps": ("rms_norm", _wrong_eps, {"forward"}, set()),
    "rope_wrong_direction": ("rope", _rope_reversed, {"forward", "backward"}, set()),
    "ignore_index_dropped": ("cross_entropy", _ignore_index_dropped, {"forward", "backward"}, set()),
    "wrong_backward": ("silu_and_mul", _SiluMulWrongBackward.apply, {"backward"}, {"forward", "nan_inf"}),
    "routing_topk_off_by_one": ("moe_route", _routing_off_by_one, {"forward"}, set()),
    "nondeterministic": ("rms_norm", _nondeterministic_rms_norm, {"determinism"}, {"forward", "backward"}),
}
CONTROL_OP = "embedding"  # a correct op in the same run must not be blamed


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_suite_fails_each_planted_fault_and_names_the_op(fault):
    op, impl, must_fail, must_pass = FAULTS[fault]
    cls = type(f"Faulty_{fault}", (CPUBackend,), {
        "name": f"faulty-{fault}",
        "native_ops": lambda self, op=op, impl=impl: {**CPUBackend.native_ops(self), op: impl}})
    register_backend(cls)
    try:
        result = run_suite(SuiteConfig(backend=cls.name, levels=("ops",), ops=[op, CONTROL_OP], quick=True, seed=0))
    finally:
        unregister_backend(cls.name)
    assert not result.ok
    failures = result.failures()
    assert {c.op for c in failures} == {op}, f"{fault}: the failures must name {op} and only {op}"
    failed = {c.check for c in failures}
    assert must_fail <= failed and not must_pass & failed, failed
    assert all(f"--op {op}" in c.replay and c.message for c in failures)


def _route_ties_flipped(logits, bias=None, *, top_k, **kwargs):
    """The reference routing with the opposite tie-break: run on the experts in reverse order."""
    experts = logits.shape[1]
    indices, weights, _ = moe.moe_route(logits.flip(-1), None if bias is None else bias.flip(-1), top_k=top_k,
                                        **kwargs)
    indices = experts - 1 - indices
    return indices, weights, torch.bincount(indices.flatten(), minlength=experts)


def test_routing_that_breaks_ties_the_other_way_passes():
    """Which of exactly tied experts wins is not a numerical property: a backend that prefers the other
    one passes, on the samples built with ties in every dtype (while an off-by-one top-k fails above)."""
    route = next(d for d in moe.OPDEFS if d.name == "moe_route")
    samples = [s for s in route.samples(torch.bfloat16, torch.device("cpu"), torch.Generator().manual_seed(0))
               if s.name.endswith(":ties")]
    assert samples and any(not torch.equal(moe.moe_route(*s.args, **s.kwargs)[0],
                                           _route_ties_flipped(*s.args, **s.kwargs)[0]) for s in samples)
    cls = type("TieFlipped", (CPUBackend,), {
        "name": "tie-flipped",
        "native_ops": lambda self: {**CPUBackend.native_ops(self), "moe_route": _route_ties_flipped}})
    register_backend(cls)
    try:
        result = run_suite(SuiteConfig(backend=cls.name, levels=("ops",), ops=["moe_route"], seed=0))
    finally:
        unregister_backend(cls.name)
    assert result.ok, [(c.sample, c.dtype, c.message) for c in result.failures()][:3]


def test_model_level_catches_a_wrong_op():
    cls = type("FaultyModel", (CPUBackend,), {
        "name": "faulty-model-rope",
        "native_ops": lambda self: {**CPUBackend.native_ops(self), "mla_qkv": _mla_rope_reversed}})
    register_backend(cls)
    try:
        result = run_suite(SuiteConfig(backend=cls.name, levels=("model",), dtypes=[torch.float32], seed=0,
                                       model_steps=2))
    finally:
        unregister_backend(cls.name)
    failed = {c.check for c in result.failures()}
    assert {"logits", "loss_curve"} <= failed and all(c.level == "model" for c in result.failures())
    # the failure names the op: a captured forward on both backends, compared call by call
    curves = [c for c in result.failures() if c.check in ("logits", "loss_curve", "grad_norm_curve")]
    assert curves and all("first divergence: op mla_qkv in layers.0.self_attn" in c.message for c in curves)


_DOUBLE_RANK0 = """
import torch.distributed as dist

_all_reduce = dist.all_reduce


def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
    # planted fault: rank 0's contribution is added twice
    if dist.get_rank() == 0:
        tensor.mul_(2)
    return _all_reduce(tensor, op=op, group=group, async_op=async_op)


dist.all_reduce = all_reduce
"""


def _comm_installed() -> bool:
    def found(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except ImportError:
            return False
    return (found("openseek_hal.comm.launch") or found("openseek_hal.comm.launcher")) \
        and found("openseek_hal.conformance.collectives")


@pytest.mark.skipif(not _comm_installed(), reason="needs the comm adaptors (openseek_hal.comm.launch) and "
                                                  "conformance/collectives.py from the collectives issue")
def test_suite_fails_a_collective_that_adds_one_rank_twice(tmp_path):
    # The fault lives in every rank process: a sitecustomize on PYTHONPATH patches torch.distributed
    # before any adaptor imports it, whatever way the launcher starts the ranks.
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(_DOUBLE_RANK0))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "openseek_hal.cli", "conform", "--backend", "cpu", "--level", "comm",
                           "--quick", "--seed", "0", "--report", str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    checks = json.loads((tmp_path / "conform-cpu.json").read_text())["checks"]
    failed = {c["op"] for c in checks if c["status"] == "fail"}
    passed = {c["op"] for c in checks if c["status"] == "pass"}
    assert "all_reduce" in failed and {"all_gather", "broadcast", "all_to_all_single"} <= passed - failed
