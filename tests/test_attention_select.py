"""The cuda backend's per-shape choice between attention implementations, on the CPU with injected timings."""

from __future__ import annotations

import json

import pytest
import torch

from openseek_hal import ops
from openseek_hal.ops.attention_select import FastestAttention

REF = ops.get("causal_attention").reference


def _qkv(b=1, h=2, s=8, dqk=24, dv=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, h, s, dqk, generator=g, dtype=dtype), torch.randn(b, h, s, dqk, generator=g, dtype=dtype),
            torch.randn(b, h, s, dv, generator=g, dtype=dtype))


def _tagged(tag, calls):
    def impl(q, k, v, scale=None, cu_seqlens=None):
        calls.append(tag)
        return REF(q, k, v, scale, cu_seqlens)
    return impl


def _selector(ms, calls, timed, **kwargs):
    def timer(fn, q, k, v, scale, cu_seqlens):
        name = next(n for n, f in sel.candidates.items() if f is fn)
        timed.append((name, tuple(q.shape), q.dtype))
        if isinstance(ms[name], Exception):
            raise ms[name]
        return ms[name]

    sel = FastestAttention({"triton": _tagged("triton", calls), "sdpa": _tagged("sdpa", calls)}, timer=timer, **kwargs)
    return sel


def test_the_faster_candidate_is_chosen_once_per_shape_and_recorded():
    calls, timed = [], []
    sel = _selector({"triton": 2.0, "sdpa": 1.0}, calls, timed)
    q, k, v = _qkv()
    for _ in range(3):
        torch.testing.assert_close(sel(q, k, v, 0.3), REF(q, k, v, 0.3))
    assert calls == ["sdpa"] * 3
    assert sorted(n for n, *_ in timed) == ["sdpa", "triton"]  # timed once, on the first call only
    key = (1, 2, 8, 24, 16, "float32", False)
    assert sel.decisions[key] == {"choice": "sdpa", "ms": {"triton": 2.0, "sdpa": 1.0}, "errors": {}}
    assert sel.report() == [{"B": 1, "H": 2, "S": 8, "Dqk": 24, "Dv": 16, "dtype": "float32", "cu_seqlens": False,
                             "choice": "sdpa", "fwd_bwd_ms": {"triton": 2.0, "sdpa": 1.0}, "errors": {}}]


def test_each_shape_and_dtype_gets_its_own_decision():
    ms = {"triton": 1.0, "sdpa": 3.0}
    calls, timed = [], []
    sel = _selector(ms, calls, timed)
    sel(*_qkv())
    ms.update(triton=5.0)  # a different shape where SDPA is faster
    sel(*_qkv(s=12))
    sel(*_qkv(dtype=torch.bfloat16))
    assert calls == ["triton", "sdpa", "sdpa"]
    assert len(timed) == 6 and len(sel.decisions) == 3
    assert {d["choice"] for d in sel.decisions.values()} == {"triton", "sdpa"}


def test_a_failing_candidate_is_skipped_and_its_error_recorded():
    calls, timed = [], []
    sel = _selector({"triton": 4.0, "sdpa": RuntimeError("no kernel for head dim 192\nmore")}, calls, timed)
    sel(*_qkv())
    (decision,) = sel.decisions.values()
    assert decision["choice"] == "triton" and decision["errors"] == {"sdpa": "RuntimeError: no kernel for head dim 192"}


def test_packed_sequences_take_the_varlen_candidate_without_timing():
    calls, timed = [], []
    sel = _selector({"triton": 9.0, "sdpa": 1.0}, calls, timed, varlen=("triton",))
    q, k, v = _qkv(b=2, s=6)
    cu = torch.tensor([0, 4, 12], dtype=torch.int32)
    torch.testing.assert_close(sel(q, k, v, None, cu_seqlens=cu), REF(q, k, v, None, cu))
    assert calls == ["triton"] and timed == []
    assert sel.decisions[(2, 2, 6, 24, 16, "float32", True)]["choice"] == "triton"


def test_untimeable_calls_use_the_default_and_record_nothing(monkeypatch):
    from openseek_hal.ops import attention_select

    calls, timed = [], []
    sel = _selector({"triton": 9.0, "sdpa": 1.0}, calls, timed)
    monkeypatch.setattr(attention_select, "_untimeable", lambda: True)  # torch.compile tracing, graph capture
    sel(*_qkv())
    assert calls == ["triton"] and timed == [] and sel.decisions == {}
    monkeypatch.undo()
    sel(*_qkv(b=0))  # an empty batch has nothing to time
    assert calls == ["triton", "triton"] and sel.decisions == {}
    # a selector told which candidate to use untimed (the cuda backend: SDPA, the faster on the H100)
    # uses it for dense calls, and the varlen candidate for packed ones
    calls.clear()
    sel = _selector({"triton": 9.0, "sdpa": 1.0}, calls, timed, untimed="sdpa")
    monkeypatch.setattr(attention_select, "_untimeable", lambda: True)
    sel(*_qkv())
    sel(*_qkv(), cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32))
    assert calls == ["sdpa", "triton"] and timed == [] and sel.decisions == {}
    with pytest.raises(ValueError, match="untimed"):
        FastestAttention({"triton": None}, untimed="sdpa")


def test_cuda_backend_wraps_attention_in_the_selector():
    pytest.importorskip("triton")
    from openseek_hal.backends.cuda import CUDABackend

    table = CUDABackend.native_ops(CUDABackend.__new__(CUDABackend))  # the op table needs no device
    sel = table["causal_attention"]
    assert isinstance(sel, FastestAttention) and list(sel.candidates) == ["triton", "sdpa"] and sel.varlen == {"triton"}
    assert sel.untimed == "sdpa"


def test_the_default_timer_runs_forward_and_backward_without_touching_the_global_rng(monkeypatch):
    """`cuda_time_fwd_bwd` on the CPU, CUDA events replaced by a counter: inputs of the call's shape and
    strides, a backward per step, and the global RNG left where it was."""
    from openseek_hal.ops import attention_select

    class FakeEvent:
        clock = 0.0

        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            FakeEvent.clock += 1.0
            self.t = FakeEvent.clock

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return end.t - self.t

    monkeypatch.setattr(attention_select.torch.cuda, "Event", FakeEvent)
    seen = []

    def impl(q, k, v, scale=None):
        seen.append((q.shape, q.stride(), v.stride(), q.requires_grad))
        return REF(q, k, v, scale)

    q, k, v = (t.transpose(1, 2) for t in _qkv(b=1, h=5, s=3))  # non-contiguous views keep their strides
    state = torch.get_rng_state()
    with torch.no_grad():  # as a model called under no_grad: the timer still runs the backward
        ms = attention_select.cuda_time_fwd_bwd(impl, q, k, v, 0.5, None, warmup=1, reps=3)
    assert ms == 1.0 and len(seen) == 4
    assert all(s == (q.shape, q.stride(), v.stride(), True) for s in seen)
    assert torch.equal(torch.get_rng_state(), state)


def test_sdpa_hands_its_backward_the_gradient_in_the_outputs_layout():
    """cuDNN's attention backward (torch 2.11) caches its plan per shape without the upstream gradient's
    strides and returned wrong gradients for a second layout: the SDPA candidate re-lays the gradient
    out like the output (values unchanged) before SDPA's backward sees it."""
    from openseek_hal.ops.attention import _GradInOutputLayout

    seen = {}

    class Record(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            seen["stride"], seen["grad"] = grad.stride(), grad.clone()
            return grad

    x = torch.randn(2, 5, 3, 4, requires_grad=True)
    out = Record.apply(x.transpose(1, 2))  # a (B,H,S,D) view of (B,S,H,D) storage, as SDPA returns it
    y = _GradInOutputLayout.apply(out)
    g = torch.randn(2, 3, 5, 4)  # contiguous: another layout than the output's
    y.backward(g)
    assert seen["stride"] == out.stride() != g.stride()
    assert torch.equal(seen["grad"], g)
    assert torch.equal(x.grad, g.transpose(1, 2))

    # end to end on the CPU: the SDPA candidate's gradients equal the float64 reference's
    from openseek_hal.ops.attention import causal_attention, sdpa_causal_attention

    q, k, v = (torch.randn(2, 7, 3, d, dtype=torch.float64).transpose(1, 2).requires_grad_() for d in (8, 8, 6))
    up = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    out = sdpa_causal_attention(q, k, v, 0.3)
    assert type(out.grad_fn).__name__ == "_GradInOutputLayoutBackward"  # the candidate goes through it
    got = torch.autograd.grad(out, (q, k, v), up)
    want = torch.autograd.grad(causal_attention(q, k, v, 0.3), (q, k, v), up)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_the_selector_traces_with_fullgraph_compile():
    """Under torch.compile(fullgraph=True) the cuda backend's selector traces without a graph break:
    a dense call without a recorded decision takes SDPA, a packed call and a dense shape recorded for
    the flash kernel take its custom op (the interpreted copy here), and the compiled graphs give the
    eager values."""
    pytest.importorskip("triton")
    from openseek_hal.ops.attention import sdpa_causal_attention
    from openseek_hal.ops.kernel_loader import load_kernels

    flash = load_kernels(interpret=True).KERNELS["causal_attention"]
    sel = FastestAttention({"triton": flash, "sdpa": sdpa_causal_attention}, varlen=("triton",), untimed="sdpa",
                           timer=lambda *args: 1.0)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    def ops_in(graph):
        return ("flash_attention_fwd" in graph, "scaled_dot_product_attention" in graph)

    q, k, v = (t.transpose(1, 2) for t in _qkv(b=2, h=20, s=3))  # (B,H=3,S=20,D) views of (B,S,H,D)
    cu = torch.tensor([0, 9, 25, 40], dtype=torch.int32)
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v, cu: sel(q, k, v, 0.3, cu_seqlens=cu), fullgraph=True, backend=backend)
    torch.testing.assert_close(fn(q, k, v, None), REF(q, k, v, 0.3))
    torch.testing.assert_close(fn(q, k, v, cu), REF(q, k, v, 0.3, cu))
    assert [ops_in(g) for g in graphs] == [(False, True), (True, False)] and sel.decisions == {}
    sel.decisions[sel.key(q, v, None)] = {"choice": "triton", "ms": {}, "errors": {}}  # as an eager call records
    torch.testing.assert_close(fn(q, k, v, None), REF(q, k, v, 0.3))  # the decision is guarded: a new graph
    assert ops_in(graphs[-1]) == (True, False) and len(graphs) == 3
    torch._dynamo.reset()


def test_decisions_round_trip_through_the_backend_without_timing():
    """`Backend.op_choices` / `preset_op_choices` (what a checkpoint carries): a fresh backend takes the
    decisions of another without timing; rows naming a candidate it lacks are timed again when met."""
    from openseek_hal.backends.cpu import CPUBackend

    class Timed(CPUBackend):
        name = "cpu-timed-attention"

        def __init__(self, ms, calls, timed):
            super().__init__()
            self.sel = _selector(ms, calls, timed)

        def native_ops(self):
            return {**super().native_ops(), "causal_attention": self.sel}

    calls, timed = [], []
    first = Timed({"triton": 2.0, "sdpa": 1.0}, calls, timed)
    first.op("causal_attention")(*_qkv())
    first.op("causal_attention")(*_qkv(s=12))
    choices = first.op_choices()
    assert list(choices) == ["causal_attention"] and len(choices["causal_attention"]) == 2
    assert json.loads(json.dumps(choices)) == choices  # JSON-ready (the checkpoint's state.json)
    # a second run where the timings would come out the other way keeps the first run's kernels
    calls2, timed2 = [], []
    second = Timed({"triton": 1.0, "sdpa": 2.0}, calls2, timed2)
    second.preset_op_choices(choices)
    second.op("causal_attention")(*_qkv())
    second.op("causal_attention")(*_qkv(s=12))
    assert calls2 == ["sdpa", "sdpa"] and timed2 == []
    assert second.op_choices() == choices
    # an unknown candidate, and an op this backend does not time, are ignored
    third = Timed({"triton": 1.0, "sdpa": 2.0}, [], [])
    rows = [dict(choices["causal_attention"][0], choice="flash9")]
    third.preset_op_choices({"causal_attention": rows, "rms_norm": rows})
    assert third.op_choices() == {"causal_attention": []}
