"""Every Triton kernel, forward and backward, against its OpDef's float64 reference (Triton interpreter, CPU).

The kernels are the `triton-interpret` backend's copy (see `openseek_hal.ops.kernel_loader`); the
inputs are the OpDef samples (edge shapes, non-contiguous views) in float32 and bfloat16.
"""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("triton")

from openseek_hal.ops.kernel_loader import kernel_table  # noqa: E402
from openseek_hal.ops.selfcheck import check_op  # noqa: E402

KERNELS = kernel_table(interpret=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_matches_reference(name, dtype):
    assert check_op(name, KERNELS[name], dtype) > 0


@pytest.mark.parametrize("name", ["rms_norm", "rope", "cross_entropy", "moe_unpermute"])
def test_kernel_float64_accumulates_in_float64(name):
    assert check_op(name, KERNELS[name], torch.float64) > 0


def test_norm_kernel_takes_eps_exactly_in_float64():
    """At a mean square ~eps, eps rounded to float32 (a kernel's float scalar) moves rstd by ~1e-9,
    which the backward's cancellation turns into ~1e-5 relative errors; the halves keep it exact."""
    from openseek_hal.ops.kernels._common import split_float

    for value in (1e-6, 1e-5, 0.1, 1 / 3):
        hi, lo = split_float(value)
        assert torch.tensor(hi, dtype=torch.float32).item() == hi and torch.tensor(lo, dtype=torch.float32).item() == lo
        assert abs(hi + lo - value) <= 2 ** -48 * value
    x = torch.full((2, 8), 1e-3, dtype=torch.float64)  # mean square 1e-6 = eps
    y = KERNELS["rms_norm"](x, torch.ones(8, dtype=torch.float64), eps=1e-6)
    expected = 1e-3 / (2e-6) ** 0.5
    assert torch.allclose(y, torch.full_like(y, expected), rtol=1e-14, atol=0), float((y / expected - 1).abs().max())


# -- causal_attention (the MLA flash kernel) ------------------------------------------------------

def _attention_inputs(b, h, s, dqk, dv, dtype, seed=0, bshd=False):
    g = torch.Generator().manual_seed(seed)
    if bshd:  # the model's layout: (B,H,S,D) views of (B,S,H,D) tensors
        q, k = (torch.randn(b, s, h, dqk, generator=g).to(dtype).transpose(1, 2) for _ in range(2))
        v = torch.randn(b, s, h, dv, generator=g).to(dtype).transpose(1, 2)
    else:
        q, k = (torch.randn(b, h, s, dqk, generator=g).to(dtype) for _ in range(2))
        v = torch.randn(b, h, s, dv, generator=g).to(dtype)
    return q, k, v


def _attention_fwd_bwd(q, k, v, scale, cu_seqlens=None, seed=1):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    kwargs = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
    out = KERNELS["causal_attention"](q, k, v, scale, **kwargs)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return (out, *torch.autograd.grad(out, (q, k, v), do)), do


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("b", "h", "s", "dqk", "dv", "cu"), [
    (1, 2, 50, 40, 48, None),                     # 40 = 32 + 16 (8 masked), v 48 padded to 64
    (2, 1, 23, 80, 24, [0, 9, 10, 30, 46]),       # 80 = 64 + 16; packed documents, one straddles the rows
    (1, 1, 17, 256, 256, None),                   # the largest head dims, one partial tile
    (1, 3, 70, 192, 128, [0, 33, 70]),            # MLA, boundary inside a 32-row block
])
def test_attention_kernel_odd_head_dims_against_float64(b, h, s, dqk, dv, cu, dtype):
    from openseek_hal import ops

    opdef = ops.get("causal_attention")
    q, k, v = _attention_inputs(b, h, s, dqk, dv, dtype, bshd=cu is not None)
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    got, do = _attention_fwd_bwd(q, k, v, 0.13, cu_seqlens)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = opdef.reference(q64, k64, v64, 0.13, cu_seqlens)
    expected = (ref, *torch.autograd.grad(ref, (q64, k64, v64), do.double()))
    rtol, atol = opdef.tol(dtype, max(s, dqk, dv))
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
        assert g.dtype == dtype and g.shape == e.shape
        torch.testing.assert_close(g.double(), e, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_kernel_is_bitwise_deterministic(dtype):
    """No atomics: two runs (forward and all three gradients) give the same bits, packed or not."""
    q, k, v = _attention_inputs(1, 2, 130, 192, 128, dtype, bshd=True)
    for cu in (None, torch.tensor([0, 5, 64, 65, 130], dtype=torch.int32)):
        first, _ = _attention_fwd_bwd(q, k, v, 0.11, cu)
        second, _ = _attention_fwd_bwd(q, k, v, 0.11, cu)
        for a, b in zip(first, second):
            assert torch.equal(a, b)


def test_attention_kernel_keeps_the_models_layout_and_handles_empty_and_single_token():
    q, k, v = _attention_inputs(2, 3, 9, 24, 16, torch.float32, bshd=True)
    (out, dq, dk, dv), _ = _attention_fwd_bwd(q, k, v, None)
    for t in (out, dq, dk, dv):  # (B,S,H,D) storage, as the inputs: no transposing copy downstream
        assert t.transpose(1, 2).is_contiguous()
    for shape in ((0, 2, 5), (2, 0, 5), (2, 2, 0), (1, 1, 1)):
        b, h, s = shape
        q, k, v = _attention_inputs(b, h, s, 24, 16, torch.bfloat16)
        (out, dq, dk, dv), _ = _attention_fwd_bwd(q, k, v, 0.3)
        assert out.shape == (b, h, s, 16) and dq.shape == q.shape and dv.shape == v.shape
        if s == 1:  # one token attends to itself only
            torch.testing.assert_close(out, v)


def test_attention_kernel_float64_runs_the_reference():
    """float64 inputs take the float64 reference (no chip trains in float64): exact, differentiable."""
    assert check_op("causal_attention", KERNELS["causal_attention"], torch.float64) > 0


def test_attention_kernel_launch_configs_are_valid():
    """Every default and sweep config has power-of-two blocks >= 16; at MLA's dims the default is the
    first candidate of each kernel (the heuristic's intended pick) and every candidate is swept."""
    import importlib

    attention = importlib.import_module("openseek_hal.ops.kernels.attention")
    for dqk, dv in ((192, 128), (128, 128), (64, 64), (256, 256), (24, 16)):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for interpreted in (False, True):
                attention._check_config(attention.default_config(dqk, dv, dtype, interpreted))
        for config in attention.sweep_configs(dqk, dv):
            attention._check_config(config)
    mla = attention.default_config(192, 128, torch.bfloat16)
    assert (mla.kv, mla.dq) == (attention.KV_CANDIDATES[0], attention.DQ_CANDIDATES[0])
    swept = attention.sweep_configs(192, 128)
    assert {c.kv for c in swept} == set(attention.KV_CANDIDATES)
    assert {c.dq for c in swept} == set(attention.DQ_CANDIDATES)
    assert {c.fwd for c in swept} == set(attention.FWD_CANDIDATES)
    assert len({c.name for c in swept}) == len(swept)
    with pytest.raises(ValueError, match="powers of two"):
        attention._check_config(attention.AttentionConfig(mla.fwd, attention.Tiles(48, 128, 8, 2), mla.dq))
    assert [attention.split_head_dim(d) for d in (8, 16, 24, 40, 64, 80, 128, 192, 256)] == [
        (16, 0), (16, 0), (16, 16), (32, 16), (64, 0), (64, 16), (128, 0), (128, 64), (256, 0)]


def _sweep_configs_covering_every_candidate():
    """The GPU launch candidates of every kernel (`sweep_configs` at MLA's dims), zipped so each
    forward, dK/dV and dQ tiling appears at least once, in a few configs (the interpreter is slow)."""
    import importlib

    from openseek_hal.ops.kernel_loader import load_kernels

    # the interpreted copy of the kernel package (the compiled one when TRITON_INTERPRET=1 process-wide)
    attention = importlib.import_module(load_kernels(interpret=True).__name__ + ".attention")
    fwd, kv, dq = attention.FWD_CANDIDATES, attention.KV_CANDIDATES, attention.DQ_CANDIDATES
    n = max(len(fwd), len(kv), len(dq))
    return attention, [attention.AttentionConfig(fwd[i % len(fwd)], kv[i % len(kv)], dq[i % len(dq)])
                       for i in range(n)]


_ATTENTION_INTERPRETED, _SWEPT = _sweep_configs_covering_every_candidate()


@pytest.mark.parametrize("config", _SWEPT, ids=lambda c: c.name)
def test_attention_every_launch_config_matches_float64(config):
    """Each selectable GPU tiling (big blocks, other block ratios than the interpreter's default) run by
    the interpreter in fp16 (the same launches as bf16, without the interpreter's slow bf16 emulation)
    at MLA's dims against the float64 reference: causal over S = 256 (a multiple of every block: the
    unmasked-load path), and three packed documents over S = 144 (a partial tile, boundaries inside
    blocks)."""
    from openseek_hal import ops

    opdef = ops.get("causal_attention")
    cases = ((1, 256, None), (1, 144, [0, 37, 130, 144]))
    for b, s, cu in cases:
        q, k, v = _attention_inputs(b, 1, s, 192, 128, torch.float16, seed=s, bshd=True)
        cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32)
        with _ATTENTION_INTERPRETED.use_config(config):
            got, do = _attention_fwd_bwd(q, k, v, 0.11, cu_seqlens)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = opdef.reference(q64, k64, v64, 0.11, cu_seqlens)
        expected = (ref, *torch.autograd.grad(ref, (q64, k64, v64), do.double()))
        rtol, atol = opdef.tol(torch.float16, max(s, 192))
        for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
            torch.testing.assert_close(g.double(), e, rtol=rtol, atol=atol,
                                       msg=lambda m, name=name, s=s: f"{config.name} S={s} {name}: {m}")


def test_attention_cu_seqlens_are_checked_by_the_reference():
    from openseek_hal.ops.attention import causal_attention, document_ids

    assert document_ids(torch.tensor([0, 3, 3, 8]), 2, 4).tolist() == [[0, 0, 0, 2], [2, 2, 2, 2]]
    q = torch.randn(2, 1, 4, 8, dtype=torch.float64)
    for bad in ([1, 8], [0, 5, 3, 8], [0, 7]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            causal_attention(q, q, q, None, torch.tensor(bad))
    # one document per row is plain causal attention
    torch.testing.assert_close(causal_attention(q, q, q, None, torch.tensor([0, 4, 8])), causal_attention(q, q, q))


@pytest.mark.parametrize(("cu", "backend"), [(None, "aot_eager"), ([0, 9, 50, 51, 80], "aot_eager"),
                                             ([0, 9, 50, 51, 80], "inductor")], ids=["dense", "packed", "inductor"])
def test_attention_kernel_compiles_fullgraph_forward_and_backward(cu, backend, monkeypatch):
    """torch.compile(fullgraph=True) traces the flash kernel (the custom ops, no graph break; the
    autograd Function before them failed on its ContextVar read) forward and backward, on (B,H,S,D)
    views of (B,S,H,D) tensors: the compiled run gives the eager run's bits (the same kernels run) in
    the same layouts, within tolerance of the float64 reference; a `use_config` in force while tracing
    reaches both the forward and the backward op. Inductor too (on the CPU the graph holds nothing
    but the opaque ops); the GPU run (benchmarks/ops/gpu_run.py) checks inductor with CUDA tensors."""
    import shutil

    from openseek_hal import ops

    if backend == "inductor" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("inductor on the CPU needs a C++ compiler")
    attention = _ATTENTION_INTERPRETED
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    q, k, v = _attention_inputs(2, 2, 40, 24, 16, torch.float32, seed=3, bshd=True)
    do = torch.randn(2, 40, 2, 16, generator=torch.Generator().manual_seed(4)).transpose(1, 2)
    config = attention.AttentionConfig(attention.Tiles(16, 32, 1, 1), attention.Tiles(32, 16, 1, 1),
                                       attention.Tiles(16, 16, 1, 1))
    launched = []
    real = attention._launch_config
    monkeypatch.setattr(attention, "_launch_config", lambda c, q, v: launched.append(list(c)) or real(c, q, v))

    def fwd_bwd(fn):
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out = fn(qq, kk, vv)
        return (out, *torch.autograd.grad(out, (qq, kk, vv), do))

    def attn(q, k, v):
        return attention.causal_attention(q, k, v, 0.3, cu_seqlens)

    torch._dynamo.reset()
    with attention.use_config(config):
        eager = fwd_bwd(attn)
        compiled = fwd_bwd(torch.compile(attn, fullgraph=True, backend=backend))
    assert launched == [attention._config_ints(config)] * 4  # fwd + bwd, eager and compiled
    opdef = ops.get("causal_attention")
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = opdef.reference(q64, k64, v64, 0.3, cu_seqlens)
    expected = (ref, *torch.autograd.grad(ref, (q64, k64, v64), do.double()))
    rtol, atol = opdef.tol(torch.float32, 40)
    for name, e, c, r in zip(("out", "dq", "dk", "dv"), eager, compiled, expected):
        assert torch.equal(c, e) and c.stride() == e.stride(), name
        assert c.transpose(1, 2).is_contiguous(), name  # (B,S,H,D) storage, as the inputs
        torch.testing.assert_close(c.double(), r, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
    torch._dynamo.reset()


@pytest.mark.parametrize("cu", [None, [0, 7, 20]], ids=["dense", "packed"])
def test_attention_custom_ops_pass_opcheck(cu):
    """torch.library.opcheck of the flash kernel's forward and backward ops: schema, fake tensors
    (shapes, dtypes and strides as the kernels produce them, (B,S,H,D) storage included), the autograd
    registration and AOT dispatch with dynamic shapes."""
    attention = _ATTENTION_INTERPRETED
    cu_seqlens = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    q, k, v = (t.requires_grad_() for t in _attention_inputs(1, 2, 20, 24, 16, torch.float32, seed=5, bshd=True))
    torch.library.opcheck(attention.flash_attention_fwd, (q, k, v, 0.3, cu_seqlens, []))
    o, lse = attention.flash_attention_fwd(q.detach(), k.detach(), v.detach(), 0.3, cu_seqlens, [])
    assert o.transpose(1, 2).is_contiguous() and lse.shape == (2, 20) and lse.dtype == torch.float32
    do = torch.randn_like(o)
    torch.library.opcheck(attention.flash_attention_bwd,
                          (do, q.detach(), k.detach(), v.detach(), o, lse, 0.3, cu_seqlens, []))


def test_attention_kernels_compile_for_h100(monkeypatch):
    """The interpreter does not run Triton's GPU compiler: compile every attention kernel for sm_90
    (H100/H200) with the installed Triton, as the cuda backend launches them, and check each fits the
    227 KiB of shared memory a block may have there. No GPU needed (ptxas ships in Triton's wheel)."""
    from benchmark_scripts import load_script, require_sm90_compiler

    require_sm90_compiler("ptxas", "cuobjdump")
    resources = load_script("ops/attention_sm90_resources.py")
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    for dtype, varlen in (("bf16", False), ("bf16", True), ("fp32", False)):
        for name, fn, consts, pointers, warps, stages in resources.kernels_for(192, 128, varlen, dtype):
            kernel = resources.compile_kernel(fn, consts, pointers, warps, stages)
            assert kernel.metadata.shared <= 227 * 1024, (dtype, name, kernel.metadata.shared)
            if dtype == "bf16" and name in ("fwd", "bwd_dq"):  # the tensor-core path, no register spills
                usage = resources.resources(kernel)
                assert "STACK:0" in usage and "wgmma" in usage, (name, usage)
            if dtype == "bf16" and name == "bwd_dkdv":  # wgmma; dK + dV fill the registers: a few bytes spill
                usage = resources.resources(kernel)
                assert "wgmma" in usage and int(usage.split("STACK:")[1].split()[0]) <= 64, usage


def test_round_to_float32_matches_torch_and_compiles_to_a_constant():
    """The kernels' float32 scalar split: the same value as torch's float32 conversion (ties to even,
    subnormals) and no graph break under torch.compile (a `Tensor.item()` there broke compiled blocks)."""
    import random
    import struct

    from openseek_hal.ops.kernels._common import round_to_float32, split_float

    rng = random.Random(0)
    values = [1e-6, 1e-5, 0.1, 1 / 3, -2.5, 3.0e38, 1e-40, 1e-45, 7e-46, 0.0]
    values += [rng.choice((-1, 1)) * 2 ** rng.uniform(-149, 127) for _ in range(20000)]
    for _ in range(2000):  # midpoints between neighbouring float32 numbers: the ties
        bits = rng.randrange(1, 0x7F000000)
        lo, hi = (struct.unpack("<f", struct.pack("<I", b))[0] for b in (bits, bits + 1))
        values.append((lo + hi) / 2)
    got = torch.tensor([round_to_float32(v) for v in values], dtype=torch.float64)
    expected = torch.tensor(values, dtype=torch.float64).to(torch.float32).to(torch.float64)
    assert torch.equal(got, expected)
    hi, lo = split_float(1e-6)
    assert hi + lo == 1e-6 or abs(hi + lo - 1e-6) < 1e-6 * 2 ** -45
    assert torch.compile(lambda: split_float(1e-6), fullgraph=True, backend="eager")() == (hi, lo)


@pytest.mark.parametrize("step", [1, 2, 7, 1000, 123457])
def test_adamw_kernel_reads_lr_and_step_from_the_device_as_the_numbers_give_them(step):
    """The device-schedule form computes ``beta**step`` in float64 by squaring (<= 2*log2(step) roundings,
    ~1e-15 relative) where the number form takes Python's ``**``; both reach float32 arithmetic as the
    same values except within ~1e-15 of a float32 rounding boundary, so the updates agree to one rounding
    of each stored dtype at every step count, and a wrong exponent or a swapped beta would miss by far
    more."""
    adamw = KERNELS["adamw"]
    gen = torch.Generator().manual_seed(step)
    masters = [torch.randn(700, generator=gen)]
    state = [[m.to(torch.bfloat16) for m in masters], [torch.randn(700, generator=gen).to(torch.bfloat16)],
             [torch.randn(700, generator=gen) * 0.1], [torch.rand(700, generator=gen) * 0.01], masters]
    a, b = ([[t.clone() for t in group] for group in state] for _ in range(2))
    hyper = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_scale=torch.tensor([0.5]))
    adamw(*a[:4], lr=3e-3, step=step, master_params=a[4], **hyper)
    adamw(*b[:4], lr=torch.tensor(3e-3, dtype=torch.float64), step=torch.tensor(float(step), dtype=torch.float64),
          master_params=b[4], **hyper)
    for x, y in zip(a, b, strict=True):  # one rounding of each stored dtype (bf16 weights, fp32 state)
        assert torch.allclose(x[0].float(), y[0].float(), rtol=torch.finfo(x[0].dtype).eps, atol=0), step
    with pytest.raises(ValueError, match="both numbers or both device tensors"):
        adamw(*b[:4], lr=3e-3, step=torch.tensor(2.0, dtype=torch.float64), master_params=b[4], **hyper)


def _masters_at_the_edges(gen: torch.Generator) -> torch.Tensor:
    """fp32 masters over many binades, plus every kind of edge of the bf16-plus-remainder encoding: exact
    halves between two bf16 numbers (even and odd upper halves, both signs), the largest remainders either
    way, powers of two and the numbers just below them, zero, subnormals."""
    spread = torch.randn(3000, generator=gen) * torch.exp2(torch.randint(-60, 60, (3000,), generator=gen).float())
    uppers = torch.cat([torch.arange(0, 300), torch.arange(0x3F70, 0x3F90), torch.arange(0x7F70, 0x7F7F)])
    halves = (uppers << 16 | 0x8000).to(torch.int64)  # an exact half above upper halves of either parity
    halves = torch.cat([halves, halves | 2**31, halves - 1, halves + 1]).to(torch.int32)  # both signs, near
    edges = torch.tensor([1.0, 1.0 - 2**-24, 2.0 - 2**-23, 2**-130, 2**-149, 65504.0, 3.0e38])
    return torch.cat([spread, halves.view(torch.float32), edges, -edges, torch.zeros(1)])  # (-0 - 0 is +0)


def test_adamw_kernel_remainder_form_with_lr_zero_splits_masters_exactly_as_the_reference():
    """With lr 0 the update leaves every master as it was, so the kernel's join and split must give back the
    very bits `split_master` gives, ties included: one upper half off, or a remainder one unit off, fails."""
    from openseek_hal.ops.optim import split_master

    masters = _masters_at_the_edges(torch.Generator().manual_seed(0))
    weights, remainders = split_master(masters)
    n = masters.numel()
    adamw = KERNELS["adamw"]
    p, r = [weights.clone()], [remainders.clone()]
    adamw(p, [torch.randn(n).to(torch.bfloat16)], [torch.zeros(n)], [torch.zeros(n)], lr=0.0, beta1=0.9,
          beta2=0.95, eps=1e-8, weight_decay=0.1, step=3, param_remainders=r)
    assert torch.equal(p[0].view(torch.int16), weights.view(torch.int16))
    assert torch.equal(r[0], remainders)


@pytest.mark.parametrize("device_schedule", [False, True])
def test_adamw_kernel_remainder_form_updates_the_master_as_the_full_fp32_master_does(device_schedule):
    """The same arithmetic on the same fp32 master: the decoded masters and the moments are bitwise those of
    the ``master_params`` form, and each weight is its master rounded to nearest (halves away from zero)."""
    from openseek_hal.ops.optim import join_master, split_master

    gen = torch.Generator().manual_seed(1)
    masters = _masters_at_the_edges(gen)
    masters = torch.where(masters.abs() > 1e30, torch.ones_like(masters), masters)  # no overflow in the update
    n = masters.numel()
    grads = torch.randn(n, generator=gen).to(torch.bfloat16)
    m, v = torch.randn(n, generator=gen) * 0.1, torch.rand(n, generator=gen) * 0.01
    weights, remainders = split_master(masters)
    hyper = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_scale=torch.tensor([0.5]))
    if device_schedule:
        hyper.update(lr=torch.tensor(3e-3, dtype=torch.float64), step=torch.tensor(5.0, dtype=torch.float64))
    else:
        hyper.update(lr=3e-3, step=5)
    adamw = KERNELS["adamw"]
    full = [[masters.to(torch.bfloat16)], [grads], [m.clone()], [v.clone()], [masters.clone()]]
    adamw(*full[:4], master_params=full[4], **hyper)
    split = [[weights.clone()], [grads], [m.clone()], [v.clone()], [remainders.clone()]]
    adamw(*split[:4], param_remainders=split[4], **hyper)
    decoded = join_master(split[0][0], split[4][0])
    assert torch.equal(decoded.view(torch.int32), full[4][0].view(torch.int32))
    assert torch.equal(split[2][0], full[2][0]) and torch.equal(split[3][0], full[3][0])
    assert torch.equal(split[0][0].view(torch.int16), split_master(decoded)[0].view(torch.int16))
    assert (split[0][0].float() - decoded).abs().le((full[0][0].float() - decoded).abs()).all()  # nearest
    with pytest.raises(ValueError, match="two forms of the master"):
        adamw(*split[:4], param_remainders=split[4], master_params=full[4], **hyper)
    with pytest.raises(ValueError, match="int16 tensors shaped like"):
        adamw(*split[:4], param_remainders=[split[4][0].float()], **hyper)


@pytest.mark.parametrize("experts", [8, 256, 257, 40000])
def test_permute_sorts_narrowed_expert_ids_in_the_order_of_the_full_ids(experts):
    """The permute's stable sort of expert ids, on ids narrowed to 8 or 16 bits where they fit, gives the
    order of a stable sort of the int64 ids (ids at the top of each width included)."""
    moe = sys.modules[KERNELS["moe_permute"].__module__]
    gen = torch.Generator().manual_seed(experts)
    flat = torch.randint(0, experts, (3000,), generator=gen)
    flat[:4] = torch.tensor([experts - 1, 0, experts - 1, 0])
    assert torch.equal(moe._expert_order(flat, experts), torch.sort(flat, stable=True).indices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpermute_kernel_with_constant_weights_keeps_no_copy_of_its_input(dtype):
    """The expert-parallel regroup unpermutes with unit weights that need no gradient: the kernel's autograd
    then saves no copy of ``y`` (one [pairs, hidden] activation per MoE layer) and its input gradient is the
    weighted scatter the reference gives; with weights needing a gradient ``y`` is kept, and dw is right too."""
    from openseek_hal.ops.moe import moe_unpermute as reference

    gen = torch.Generator().manual_seed(5)
    tokens, k, hidden = 7, 3, 40
    order = torch.randperm(tokens * k, generator=gen)
    dout = torch.randn(tokens, hidden, generator=gen).to(dtype)
    saved: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    for needs_w in (False, True):
        y = torch.randn(tokens * k, hidden, generator=gen).to(dtype).requires_grad_()
        w = torch.rand(tokens, k, generator=gen).to(dtype).requires_grad_(needs_w)
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            out = KERNELS["moe_unpermute"](y, order, w)
        assert any(t.shape == y.shape for t in saved) == needs_w
        grads = torch.autograd.grad(out, [y, w] if needs_w else [y], dout)
        y64 = y.detach().double().requires_grad_()
        w64 = w.detach().double().requires_grad_(needs_w)
        want = torch.autograd.grad(reference(y64, order, w64), [y64, w64] if needs_w else [y64], dout.double())
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for got, ref in zip(grads, want, strict=True):
            torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_cuda_backends_multi_tensor_sum_of_squares_matches_reference(dtype):
    """`cuda`'s `sum_of_squares` (torch's multi-tensor norm, squared and added) runs on the CPU too."""
    from openseek_hal.ops.optim import foreach_sum_of_squares

    assert check_op("sum_of_squares", foreach_sum_of_squares, dtype) > 0


def test_expert_counts_and_inverse_over_several_blocks():
    """The routing's tokens-per-expert (per-block histograms added with integer atomics) against
    ``torch.bincount`` for ids spanning several blocks, an expert count that is not a power of two, experts
    that get nothing, and no ids; the permutation inverse against ``argsort``."""
    from openseek_hal.ops.kernel_loader import load_kernels

    moe = load_kernels(True).moe
    gen = torch.Generator().manual_seed(0)
    for n, experts in ((3 * moe._COUNT_BLOCK + 17, 6), (500, 64), (0, 5)):
        ids = torch.randint(0, max(1, experts - 1), (n,), generator=gen)  # the last expert is never picked
        assert torch.equal(moe._count(ids.view(-1, 1), experts), torch.bincount(ids, minlength=experts))
    order = torch.randperm(2500, generator=gen)
    assert torch.equal(moe._inverse(order), torch.argsort(order))
    assert moe._inverse(torch.empty(0, dtype=torch.int64)).numel() == 0
