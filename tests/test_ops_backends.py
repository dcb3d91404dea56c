"""The Triton-capable backends: discovery, availability reasons, op tables, and the interpreter copy.

Also pins behaviours the OpDef samples do not reach: cross entropy's in-place backward, and that
`check_op` (the kernel harness) fails a wrong kernel.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from openseek_hal import ops
from openseek_hal.backend import get_backend, list_backends
from openseek_hal.backends.cuda import CUDABackend
from openseek_hal.backends.flaggems import FlagGemsBackend
from openseek_hal.cli import main

pytest.importorskip("triton")

from openseek_hal.ops import kernel_loader  # noqa: E402
from openseek_hal.ops.selfcheck import check_op  # noqa: E402

KERNEL_OPS = {"rms_norm", "add_rms_norm", "silu_and_mul", "rope", "mla_qkv", "cross_entropy", "linear_cross_entropy",
              "moe_route", "moe_permute", "moe_unpermute", "moe_seq_aux_loss", "embedding_add_rows", "adamw",
              "causal_attention", "fp8_quantize", "fp8_gemm", "fp8_grouped_gemm", "fp8_linear", "fp8_grouped_linear"}


def test_triton_interpret_backend_runs_every_op_natively():
    backend = get_backend("triton-interpret")
    assert backend.device.type == "cpu"
    assert set(backend.coverage().values()) == {"native"}
    interpreted = kernel_loader.kernel_table(interpret=True)
    for name in KERNEL_OPS:
        assert backend.op(name) is interpreted[name]


def test_interpreted_copy_leaves_compiled_kernels_alone():
    """The cuda backend's kernels stay compiled-mode JITFunctions after the interpreter copy loads and runs."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    if kernel_loader.interpreter_enabled():
        pytest.skip("the whole process runs under TRITON_INTERPRET=1: every kernel is interpreted")
    interpreted = kernel_loader.load_kernels(interpret=True)
    compiled = kernel_loader.load_kernels(interpret=False)
    assert interpreted.__name__ == "openseek_hal.ops._kernels_interpreted"
    assert isinstance(compiled.norm._rms_norm_fwd, JITFunction)
    assert isinstance(interpreted.norm._rms_norm_fwd, kernel_loader._InterpretedKernel)
    x = torch.randn(3, 8)
    torch.testing.assert_close(interpreted.KERNELS["rms_norm"](x, torch.ones(8)), ops.get("rms_norm").reference(
        x, torch.ones(8)))
    assert isinstance(tl.sum, JITFunction)  # the launch swapped Triton's library back
    assert "TRITON_INTERPRET" not in __import__("os").environ


def test_interpreted_launches_leave_triton_language_unpatched():
    """Triton 3.9's interpreter patches ``tl.core``'s builtins again for every @jit function called
    inside a kernel and never restores them; the loader does, or a kernel compiled for the GPU later
    in the same process is built with the interpreter's semantics."""
    import triton.language as tl
    import triton.language.core as core

    if kernel_loader.interpreter_enabled():
        pytest.skip("the whole process runs under TRITON_INTERPRET=1: every kernel is interpreted")
    interpreted = kernel_loader.load_kernels(interpret=True)
    namespaces = (tl, core, tl.math, core.tensor)
    before = [dict(vars(ns)) for ns in namespaces]
    q = torch.randn(1, 1, 20, 24)
    interpreted.KERNELS["causal_attention"](q, q, q)  # nested @jit helpers (_fwd_block, _mm, _cast)
    interpreted.KERNELS["rms_norm"](q, torch.ones(24))
    for ns, old in zip(namespaces, before):
        changed = [n for n, v in vars(ns).items() if n in old and old[n] is not v and n != "__annotations__"]
        assert not changed, (ns, changed[:5])


def test_cuda_and_flaggems_report_why_they_are_unavailable():
    infos = {info.name: info for info in list_backends()}
    for name in ("cuda", "flaggems", "triton-interpret"):
        assert name in infos, f"{name} is not registered as an entry point"
    if not torch.cuda.is_available():
        assert not infos["flaggems"].available and "CUDA" in infos["flaggems"].reason


def test_flaggems_unavailable_names_flag_gems(monkeypatch):
    monkeypatch.setattr(CUDABackend, "is_available", classmethod(lambda cls: (True, "")))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flag_gems"
                        else real_find_spec(name, *a))
    ok, reason = FlagGemsBackend.is_available()
    assert not ok and "flag-gems==5.0.2" in reason and "--no-deps" in reason
    assert "flag_gems" not in sys.modules  # never imported just to list backends


def test_cross_entropy_inplace_backward_writes_into_logits():
    ce = kernel_loader.kernel_table(interpret=True)["cross_entropy"]
    logits = torch.randn(5, 300, dtype=torch.float32)
    target = torch.tensor([1, -100, 299, 0, 7])
    expected = torch.func.grad(lambda x: ops.get("cross_entropy").reference(x, target, z_loss=1e-3))(logits)
    leaf = logits.clone().requires_grad_()
    loss = ce(leaf, target, z_loss=1e-3, inplace_backward=True)
    (grad,) = torch.autograd.grad(loss, leaf)
    torch.testing.assert_close(grad, expected)
    assert grad.data_ptr() == leaf.data_ptr()  # no second logits-sized buffer
    torch.testing.assert_close(leaf.detach(), expected)


def test_moe_route_deepseek_v3_grouping():
    """256 experts in 8 groups, top-4 groups, top-8 experts with a selection bias (DeepSeek-V3's router)."""
    route = kernel_loader.kernel_table(interpret=True)["moe_route"]
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 256, generator=gen)
    bias = torch.randn(256, generator=gen) * 0.5
    kwargs = dict(top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5)
    idx, w, counts = route(logits, bias, **kwargs)
    ref_idx, ref_w, ref_counts = ops.get("moe_route").reference(logits.double(), bias.double(), **kwargs)
    assert torch.equal(idx, ref_idx) and torch.equal(counts, ref_counts)
    torch.testing.assert_close(w.double(), ref_w, rtol=1e-6, atol=1e-6)
    assert len({int(e) // 32 for e in idx[0]}) <= 4  # experts come from at most topk_group groups


def test_check_op_fails_a_wrong_kernel():
    def wrong_eps(x, weight, eps=1e-6):
        return ops.get("rms_norm").reference(x, weight, eps=eps * 1e4)

    with pytest.raises(AssertionError, match=r"rms_norm\[.*output 0"):
        check_op("rms_norm", wrong_eps, torch.float32)

    rope = kernel_loader.kernel_table(interpret=True)["rope"]
    with pytest.raises(AssertionError, match="rope"):
        check_op("rope", lambda x, cos, sin, interleaved=False: rope(x, cos, -sin, interleaved), torch.float32)


def test_bench_cli_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--backend", "triton-interpret"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "CUDA events" in err
    with pytest.raises(SystemExit) as exit_info:  # the comm subcommand is attached and checks its input
        main(["bench", "comm", "--adaptor", "carrier-pigeon"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "carrier-pigeon" in err and err.count("\n") == 0


def test_bench_cases_cover_the_presets():
    from openseek_hal.ops.bench_cases import cases

    all_cases = cases()
    assert {c.op for c in all_cases} == KERNEL_OPS
    labels = " ".join(c.label for c in all_cases)
    assert "8192x129280" in labels and "16384x4096" in labels and "openseek-small" in labels
    assert all(c.fwd_bytes > 0 for c in all_cases)
    with pytest.raises(KeyError):
        cases("no_such_op")


def test_bench_attention_rows_at_a_tiny_size(monkeypatch):
    """The attention rows of `openseek-hal bench` (ours = the flash kernel, SDPA, FlexAttention) run
    end to end on the CPU at a tiny size: inputs, timing path (wall clock instead of CUDA events),
    rows with TFLOP/s. The GPU numbers come from running the real command on a GPU."""
    import time
    import warnings

    from openseek_hal.ops import bench
    from openseek_hal.ops.bench_cases import attention_case, attention_flops, cases

    real = [c for c in cases("causal_attention")]
    assert {c.label for c in real} >= {"openseek-small 4x10x4096 qk192 v128", "deepseek-v3 1x128x4096 qk192 v128",
                                       "deepseek-v3 1x128x4096 qk192 v128 8 docs"}
    assert attention_flops(1, 1, 4, 16, 16) == (2 * 10 * 32, 2 * 10 * 80)

    def wall_ms(fn):
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)

    monkeypatch.setattr(bench, "_median_ms", wall_ms)
    for docs in (0, 2):
        case = attention_case("tiny", 1, 2, 32, dqk=24, dv=16, dtype=torch.float32, docs=docs, compiled_flex=False)
        impls = bench.case_impls(case, backend_op=None, interpret=True)
        assert impls["ours"] is kernel_loader.kernel_table(interpret=True)["causal_attention"]
        assert "eager" not in impls and "compile" not in impls
        (q, k, v), kwargs = case.make(torch.device("cpu"))
        assert q.transpose(1, 2).is_contiguous()  # (B,H,S,D) views of (B,S,H,D) tensors
        expected = ops.get("causal_attention").reference(q.double(), k.double(), v.double(), **kwargs)
        for name, impl in impls.items():  # every implementation computes the same attention
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # eager FlexAttention's "use torch.compile"
                out = impl(q, k, v, **kwargs)
            torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4, msg=name)
        times = bench.time_impls(case, impls, torch.device("cpu"))
        rows = bench.case_rows(case, times, copy_bw=1e9)
        assert [r["dir"] for r in rows] == ["fwd", "fwd+bwd"]
        assert all(r["TFLOPs"] > 0 and r["baselines"]["sdpa"]["TFLOPs"] > 0 for r in rows)
        if "flex-eager" in impls:  # FlexAttention has no backward on the CPU: reported as an error, not fatal
            assert rows[0]["baselines"]["flex-eager"]["TFLOPs"] > 0 and "error" in rows[1]["baselines"]["flex-eager"]


def test_moe_route_compiles_as_an_opaque_custom_op():
    """torch.compile traces the router (forward and backward) as one custom op, without a graph break."""
    route = kernel_loader.kernel_table(interpret=True)["moe_route"]
    kwargs = dict(top_k=2, n_group=4, topk_group=2, routed_scaling_factor=1.5)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(5), requires_grad=True)
    compiled = torch.compile(lambda x: route(x, None, **kwargs)[1].square().sum(), fullgraph=True, backend="aot_eager")
    (grad,) = torch.autograd.grad(compiled(x), x)
    x64 = x.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(ops.get("moe_route").reference(x64, None, **kwargs)[1].square().sum(), x64)
    torch.testing.assert_close(grad.double(), ref, rtol=1e-5, atol=1e-6)


def test_flaggems_adapters_map_our_signatures_onto_flag_gems(monkeypatch):
    """With a stand-in ``flag_gems`` (torch code with FlagGems' signatures) the adapters must conform."""
    import types

    import torch.nn.functional as F

    from openseek_hal.backends import flaggems

    fake = types.ModuleType("flag_gems")
    fake.rms_norm = lambda x, shape, w, eps: ops.get("rms_norm").reference(x, w, eps)
    fake.silu_and_mul = lambda gate, up: F.silu(gate) * up
    monkeypatch.setitem(sys.modules, "flag_gems", fake)
    monkeypatch.setattr(flaggems, "_import_flag_gems", lambda: (fake, ""))
    backend = FlagGemsBackend()
    origins = backend.op_origins()
    assert {op for op, o in origins.items() if o == "flaggems"} == {"rms_norm", "silu_and_mul"}
    assert origins["cross_entropy"] == "openseek-hal"  # FlagGems' reads out of bounds on ignored targets
    for name in ("rms_norm", "silu_and_mul"):
        assert check_op(name, backend.op(name), torch.float32) > 0


def test_triton_kernels_conform_through_the_interpreter(tmp_path):
    """The conformance op level (quick) on `triton-interpret`: strided 1-D arguments (weights, targets,
    biases), NaN/Inf rows and in-place list arguments, which once crashed the GPU with illegal accesses."""
    with pytest.raises(SystemExit) as exit_info:
        main(["conform", "--backend", "triton-interpret", "--level", "ops", "--quick", "--seed", "0",
              "--report", str(tmp_path)])
    assert exit_info.value.code == 0
    report = json.loads((tmp_path / "conform-triton-interpret.json").read_text())
    assert report["ok"] and report["counts"].get("pass", 0) > 300
    assert {c["op"] for c in report["checks"]} >= {"rms_norm", "cross_entropy", "moe_route", "adamw"}


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_mm_linear_matches_the_reference_loop(dtype):
    """The cuda backend's one-call grouped GEMM against the per-expert loop (run on the CPU here)."""
    from openseek_hal.ops.grouped import grouped_linear, grouped_mm_linear

    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 0, 11, 3, 0, 9])
    x = torch.randn(int(counts.sum()), 32, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(6, 48, 32, generator=gen) / 6).to(dtype).requires_grad_()
    x_ref, w_ref = (t.detach().clone().requires_grad_() for t in (x, w))
    try:
        y = grouped_mm_linear(x, w, counts)
    except RuntimeError as e:  # a torch whose _grouped_mm has no CPU kernel
        pytest.skip(f"no CPU grouped GEMM here: {e}")
    y_ref = grouped_linear(x_ref, w_ref, counts)
    upstream = torch.randn(y.shape, generator=gen).to(dtype)
    y.backward(upstream)
    y_ref.backward(upstream)
    tol = dict(rtol=1.6e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    torch.testing.assert_close(w.grad, w_ref.grad, **tol)


@pytest.mark.parametrize("impl", ["reference", "grouped_mm"])
def test_grouped_linear_rows_past_the_counts(impl):
    """Rows past ``sum(counts)`` belong to no group: the used rows' output and input gradient and the
    weight gradient equal those of the call without them (the reference returns zeros there; the grouped
    GEMM leaves whatever it leaves), and counts summing past the rows are refused."""
    from openseek_hal.ops.grouped import grouped_linear, grouped_mm_linear

    if impl == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    op, dtype = (grouped_linear, torch.float64) if impl == "reference" else (grouped_mm_linear, torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    counts = torch.tensor([4, 0, 7, 2])
    used, tail = int(counts.sum()), 9
    x = torch.randn(used + tail, 16, generator=gen).to(dtype)
    w = (torch.randn(4, 24, 16, generator=gen) / 4).to(dtype)
    upstream = torch.randn(used + tail, 24, generator=gen).to(dtype)
    a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
    a0, b0 = x[:used].clone().requires_grad_(), w.clone().requires_grad_()
    try:
        y = op(a, b, counts)
    except RuntimeError as e:  # a torch whose _grouped_mm has no CPU kernel
        pytest.skip(f"no CPU grouped GEMM here: {e}")
    y.backward(upstream)
    y0 = op(a0, b0, counts)
    y0.backward(upstream[:used])
    assert y.shape == (used + tail, 24)
    if impl == "reference":  # the same float64 loop over the same used rows: equal bit for bit
        assert torch.equal(y[:used], y0) and torch.equal(a.grad[:used], a0.grad) and torch.equal(b.grad, b0.grad)
        assert (y[used:] == 0).all() and (a.grad[used:] == 0).all()
    else:  # a blocked kernel may sum in another order for another row count: bf16 rounding, while a tail row
        # leaking into the weight gradient would move it by O(1) (the rows are unit normals)
        tol = dict(rtol=1.6e-2, atol=1e-2)
        torch.testing.assert_close(y[:used], y0, **tol)
        torch.testing.assert_close(a.grad[:used], a0.grad, **tol)
        torch.testing.assert_close(b.grad, b0.grad, **tol)
    with pytest.raises(ValueError, match="counts sum to 13, more than the 12 rows"):
        grouped_linear(x[:12], w, counts)


def test_graph_timing_refuses_a_call_that_syncs_before_capturing(monkeypatch):
    """A call that synchronizes with the host (a host-built mask, ``.tolist()``) is refused before any
    capture starts (a failed capture leaves the CUDA RNG unusable for the rest of the run), with the
    sync debug mode restored; a call that does not sync passes the check. CUDA's sync debug mode is
    faked: on the CPU it only raises where the real one would."""
    from openseek_hal.ops import bench

    mode = {"now": 0}
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: mode["now"])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda m: mode.update(now=2 if m == "error" else m))

    def syncs():
        if mode["now"] == 2:
            raise RuntimeError("called a synchronizing CUDA operation")

    def never_capture():
        raise AssertionError("a capture was started")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", never_capture)
    with pytest.raises(RuntimeError, match="cannot be timed in a CUDA graph: it synchronizes with the host"):
        bench._graph_ms([syncs], stream=None)
    assert mode["now"] == 0
    bench._check_capturable([lambda: None])
    assert mode["now"] == 0


def test_graph_timing_cycles_independent_input_sets(monkeypatch):
    """`bench --timing graph` plumbing on the CPU (the CUDA graph itself needs a GPU): every timed call
    works on its own input set, the backward of a set differentiates that set's own forward, a fused
    loss is differentiated whole, and the number of sets keeps the calls in between 3x the L2 cache."""
    from openseek_hal.ops import bench
    from openseek_hal.ops.bench_cases import Case

    gen = torch.Generator().manual_seed(3)

    def make_norm(device):
        return tuple(torch.randn(*shape, generator=gen) for shape in ((6, 40), (6, 40), (40,))), {}

    def make_ce(device):
        return (torch.randn(5, 33, generator=gen), torch.randint(0, 33, (5,), generator=gen)), {}

    norm_case = Case("add_rms_norm", "t", make_norm, (0, 1, 2), fwd_bytes=4 * 6 * 40 * 4, bwd_bytes=5 * 6 * 40 * 4)
    ce_case = Case("cross_entropy", "t", make_ce, (0,), fwd_bytes=5 * 33 * 4, bwd_bytes=10 * 33 * 4,
                   fused_fwd_bwd=True)
    seen: list[list] = []

    def fake_graph_ms(fns, stream):
        assert stream is None  # the CPU: no capture stream
        seen.append([(fn, fn()) for fn in fns])
        return 1.0

    monkeypatch.setattr(bench, "_graph_ms", fake_graph_ms)
    l2 = 4 * 6 * 40 * 4  # one forward's bytes: 3 x L2 / bwd bytes -> ceil(2.4) + 1 = 4 sets
    assert bench._arg_sets(norm_case, l2) == 4
    assert bench._arg_sets(norm_case, 10**9) == 16 and bench._arg_sets(norm_case, 0) == 2
    assert bench._arg_sets(Case("x", "t", make_norm, (), 0, 0), 10**9) == 2  # no bytes counted
    norm = ops.get("add_rms_norm").reference
    assert bench._time_case(norm_case, norm, torch.device("cpu"), "graph", l2) == {"fwd": 1.0, "bwd": 1.0}
    fwd, bwd = seen
    assert len(fwd) == len(bwd) == 4
    inputs = [fn.args[0] for fn, _ in fwd]
    assert len({a[0].data_ptr() for a in inputs}) == 4  # four independent sets
    for (_, out), args in zip(fwd, inputs):
        assert not out[0].requires_grad  # the forward is timed without autograd
        torch.testing.assert_close(out[0], norm(*args)[0])
    for (fn, grads), args in zip(bwd, inputs):
        outs, grad_args, cots = fn.args
        assert [g.data_ptr() for g in grad_args] == [a.data_ptr() for a in args]  # this set's own inputs
        fresh = [a.detach().clone().requires_grad_() for a in args]
        expected = torch.autograd.grad(norm(*fresh), fresh, cots)
        for g, e in zip(grads, expected):
            torch.testing.assert_close(g, e)
    seen.clear()
    ce = ops.get("cross_entropy").reference
    assert bench._time_case(ce_case, ce, torch.device("cpu"), "graph", 10**9) == {"fwd": 1.0, "fwd+bwd": 1.0}
    for fn, _ in seen[1]:  # each fused step: the loss of its set, differentiated with the implicit 1
        impl, args, kwargs, grad_args, cots = fn.args
        assert impl is ce and grad_args[0] is args[0] and all(float(c) == 1.0 for c in cots)
    with pytest.raises(Exception, match="unknown timing"):
        bench.run_bench("cpu", None, print, timing="wall")
