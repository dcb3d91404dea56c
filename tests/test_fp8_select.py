"""The cuda backend's per-shape choice between FP8 GEMMs (on the CPU with injected timings), the cuBLAS
adaptor against an emulation of ``torch._scaled_mm``'s block-scaled contract, and `fp8_linear`'s GEMM hook."""

from __future__ import annotations

import pytest
import torch

from openseek_hal.ops import fp8 as ref
from openseek_hal.ops import fp8_select
from openseek_hal.ops.fp8_select import FastestFP8Gemm, b_tile, cublas_fp8_gemm


def _operands(m, n, k, tile, seed=0):
    g = torch.Generator().manual_seed(seed)
    aq, as_ = ref.fp8_quantize(torch.randn(m, k, generator=g))
    bq, bs = ref.fp8_quantize(torch.randn(n, k, generator=g) * 0.1, tile)
    return aq, as_.float(), bq, bs.float()


def _reference(aq, as_, bq, bs, out_dtype="bfloat16"):
    return ref.fp8_gemm(aq, as_.double(), bq, bs.double()).to(ref.out_dtype_of(out_dtype))


def _selector(ms, calls, timed, check=None):
    def tagged(tag):
        def impl(*args):
            calls.append(tag)
            return _reference(*args)
        return impl

    def timer(fn, args):
        name = next(n for n, f in sel.candidates.items() if f is fn)
        timed.append((name, FastestFP8Gemm.key(args[0], args[2], args[3], args[4])))
        if isinstance(ms[name], Exception):
            raise ms[name]
        return ms[name]

    sel = FastestFP8Gemm({"triton": tagged("triton"), "cublas": tagged("cublas")}, timer=timer, check=check)
    return sel


def test_the_faster_gemm_is_chosen_once_per_shape_and_recorded():
    calls, timed = [], []
    sel = _selector({"triton": 2.0, "cublas": 1.0}, calls, timed)
    ops = _operands(130, 256, 384, "128x128")
    out = sel(*ops)
    assert torch.equal(out, _reference(*ops))
    sel(*ops)
    assert [name for name, _ in timed] == ["triton", "cublas"]  # timed once, not again for the same key
    assert calls == ["cublas", "cublas"]
    sel(*ops, torch.float32)  # another output dtype is another key
    assert len(timed) == 4
    wgrad = _operands(130, 256, 384, "1x128")  # B per 1x128 (a weight gradient's): another key too
    sel(*wgrad)
    assert len(timed) == 6
    rows = sel.report()
    assert [(r["M"], r["N"], r["K"], r["b_tile"], r["out_dtype"], r["choice"]) for r in rows] == [
        (130, 256, 384, "128x128", "bfloat16", "cublas"), (130, 256, 384, "128x128", "float32", "cublas"),
        (130, 256, 384, "1x128", "bfloat16", "cublas")]
    assert rows[0]["ms"] == {"triton": 2.0, "cublas": 1.0} and rows[0]["errors"] == {}


def test_a_failing_candidate_is_recorded_and_skipped():
    calls, timed = [], []
    sel = _selector({"triton": 3.0, "cublas": ValueError("K must be a multiple of 16\nmore")}, calls, timed)
    ops = _operands(4, 32, 200, "128x128")
    sel(*ops)
    row = sel.report()[0]
    assert row["choice"] == "triton" and row["ms"] == {"triton": 3.0}
    assert row["errors"] == {"cublas": "ValueError: K must be a multiple of 16"}
    # every candidate failing: the default (first) runs, and raises its own error if it cannot
    sel2 = _selector({"triton": RuntimeError("x"), "cublas": RuntimeError("y")}, [], [])
    sel2(*ops)
    assert sel2.report()[0]["choice"] == "triton"


def test_an_untimeable_call_takes_the_recorded_choice_or_the_default(monkeypatch):
    calls, timed = [], []
    sel = _selector({"triton": 2.0, "cublas": 1.0}, calls, timed)
    ops = _operands(8, 16, 128, "128x128")
    monkeypatch.setattr(fp8_select, "_untimeable", lambda: True)
    sel(*ops)
    assert calls == ["triton"] and timed == [] and sel.report() == []
    monkeypatch.setattr(fp8_select, "_untimeable", lambda: False)
    sel(*ops)
    monkeypatch.setattr(fp8_select, "_untimeable", lambda: True)
    sel(*ops)
    assert calls == ["triton", "cublas", "cublas"]


def _misreading_scaled_mm(mat_a, mat_b, *, scale_a, scale_b, out_dtype):
    """What cuBLAS computes from ``torch._scaled_mm``'s unpadded 128x128 view when K/128 is not a multiple of
    4: it reads B's scale (kb, nb) at offset ``kb + nb * round_up(K/128, 4)`` of the buffer (past its end:
    NaN here)."""
    kb, nb = scale_b.shape
    l4 = -(-kb // 4) * 4
    flat = torch.full((l4 * nb,), float("nan"))
    flat[: kb * nb] = scale_b.t().contiguous().reshape(-1)  # the storage of the [K/128, N/128] view, strides (1, kb)
    read = flat.reshape(nb, l4)[:, :kb].t()
    return _blockwise_product(mat_a, mat_b, scale_a, read, out_dtype)


@pytest.mark.parametrize("tile", ["128x128", "1x128"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_exact_check_passes_correct_gemms(tile, out_dtype):
    for m, n, k in [(5, 256, 1280), (130, 200, 300), (1, 16, 128)]:
        fp8_select.exact_check(_reference, m, n, k, tile, out_dtype, "cpu")


def test_the_exact_check_catches_misplaced_scales_and_the_selector_skips_them():
    def misreading(aq, as_, bq, bs, out_dtype):
        return _misreading_scaled_mm(aq, bq.t(), scale_a=as_, scale_b=bs.t(), out_dtype=ref.out_dtype_of(out_dtype))

    fp8_select.exact_check(misreading, 64, 256, 1024, "128x128", torch.bfloat16, "cpu")  # 8 blocks: reads right
    with pytest.raises(fp8_select.WrongResult, match="exact check failed"):
        fp8_select.exact_check(misreading, 64, 256, 1280, "128x128", torch.bfloat16, "cpu")

    def swapped_a_scales(aq, as_, bq, bs, out_dtype):  # the 1x128 scales read row for row of another layout
        return _reference(aq, as_.t().reshape(as_.shape), bq, bs, out_dtype)

    with pytest.raises(fp8_select.WrongResult):
        fp8_select.exact_check(swapped_a_scales, 64, 256, 1280, "1x128", torch.float32, "cpu")
    # in the selector: the failing candidate is recorded and never timed, even when it would be faster
    timed = []
    sel = FastestFP8Gemm({"triton": _reference, "cublas": misreading}, check=fp8_select.exact_check,
                         timer=lambda fn, args: timed.append(fn) or (1.0 if fn is misreading else 2.0))
    ops = _operands(64, 256, 1280, "128x128")
    assert torch.equal(sel(*ops), _reference(*ops))
    row = sel.report()[0]
    assert row["choice"] == "triton" and timed == [_reference]
    assert row["errors"]["cublas"].startswith("WrongResult: exact check failed")


def test_b_tile_tells_the_two_scalings_apart():
    assert b_tile(*_operands(4, 256, 128, "128x128")[2:]) == "128x128"
    assert b_tile(*_operands(4, 256, 128, "1x128")[2:]) == "1x128"
    assert b_tile(*_operands(4, 1, 128, "1x128")[2:]) == "128x128"  # one row: both layouts are [1, K/128]


def _emulated_scaled_mm(mat_a, mat_b, *, scale_a, scale_b, out_dtype):
    """``torch._scaled_mm``'s block-scaled contract (what cuBLAS computes), in float64, with its layout checks:
    A row-major [M, K]; B column-major [K, N]; scale_a [M, K/128] outer-dimension-major (1x128); scale_b
    [K/128, N/128] (128x128) or [K/128, N] (1x128)."""
    (m, k), n = mat_a.shape, mat_b.shape[1]
    kb = -(-k // 128)
    assert mat_a.stride(1) == 1 and mat_b.stride(0) == 1, "A row-major, B column-major"
    assert scale_a.shape == (m, kb) and scale_a.stride(0) == 1, "1x128 scales outer-dimension-major"
    assert scale_b.shape in ((kb, -(-n // 128)), (kb, n))
    if scale_b.shape == (kb, n) and n != -(-n // 128):
        assert scale_b.stride(1) == 1, "1x128 scales of B^T: unit stride along N"
    else:
        # cuBLAS reads 128x128 scales with a leading dimension of round_up(K/128, 4), whatever the strides say;
        # torch._scaled_mm accepts only the unpadded view, so only K/128 % 4 == 0 is right through it
        assert kb % 4 == 0 and scale_b.stride() == (1, kb), f"128x128 scales {scale_b.shape} {scale_b.stride()}"
    return _blockwise_product(mat_a, mat_b, scale_a, scale_b, out_dtype)


def _blockwise_product(mat_a, mat_b, scale_a, scale_b, out_dtype):
    k, n = mat_a.shape[1], mat_b.shape[1]
    a = mat_a.to(torch.float64) * scale_a.double().repeat_interleave(128, 1)[:, :k]
    sb = scale_b.double().repeat_interleave(128, 0)[:k]
    if scale_b.shape[1] != n:
        sb = sb.repeat_interleave(128, 1)[:, :n]
    return (a @ (mat_b.to(torch.float64) * sb)).to(out_dtype)


@pytest.mark.parametrize("tile", ["128x128", "1x128"])
def test_cublas_adaptor_passes_the_contract_to_scaled_mm(monkeypatch, tile):
    monkeypatch.setattr(torch, "_scaled_mm", _emulated_scaled_mm)
    for m, n, k in [(130, 256, 512), (7, 384, 1024), (256, 128, 2048)] + ([(9, 128, 384)] if tile == "1x128" else []):
        ops = _operands(m, n, k, tile, seed=m)
        for out_dtype in ("bfloat16", torch.float32):
            got = cublas_fp8_gemm(*ops, out_dtype)
            assert got.dtype == ref.out_dtype_of(out_dtype)
            # the emulation is float64 like the reference: equal up to the output rounding
            assert torch.equal(got, _reference(*ops, out_dtype))


def _emulated_scaled_mm_v2(mat_a, mat_b, scale_a, recipe_a, scale_b, recipe_b, output_dtype):
    """``torch.nn.functional.scaled_mm`` for 1x128 x 128x128: scale_b is ``[round_up(K/128, 4), N/128]`` with
    strides ``(1, round_up(K/128, 4))`` (the padded layout cuBLAS reads)."""
    st = torch.nn.functional.ScalingType
    assert recipe_a == st.BlockWise1x128 and recipe_b == st.BlockWise128x128
    kb = -(-mat_a.shape[1] // 128)
    l4 = -(-kb // 4) * 4
    assert scale_b.shape == (l4, mat_b.shape[1] // 128) and scale_b.stride() == (1, l4)
    assert scale_a.shape == (mat_a.shape[0], kb) and scale_a.stride(0) == 1
    return _blockwise_product(mat_a, mat_b, scale_a, scale_b[:kb], output_dtype)


def test_cublas_adaptor_pads_the_128x128_scales_through_the_newer_api(monkeypatch):
    if not hasattr(torch.nn.functional, "scaled_mm"):
        pytest.skip("this torch has no torch.nn.functional.scaled_mm")
    calls = []

    def v1(*args, **kwargs):
        calls.append("v1")
        return _emulated_scaled_mm(*args, **kwargs)

    def v2(*args, **kwargs):
        calls.append("v2")
        return _emulated_scaled_mm_v2(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", v1)
    monkeypatch.setattr(torch.nn.functional, "scaled_mm", v2)
    for k, api in [(1280, "v2"), (640, "v2"), (512, "v1"), (1024, "v1")]:
        ops = _operands(64, 256, k, "128x128", seed=k)
        assert torch.equal(cublas_fp8_gemm(*ops, torch.float32), _reference(*ops, torch.float32))
        assert calls[-1] == api


def test_cublas_adaptor_refuses_what_it_does_not_take():
    with pytest.raises(ValueError, match="K a multiple of 128"):
        cublas_fp8_gemm(*_operands(4, 256, 576, "128x128"))  # K 576: a partial K block
    with pytest.raises(ValueError, match="N of 128"):
        cublas_fp8_gemm(*_operands(4, 576, 256, "128x128"))  # N 576: a partial 128x128 block
    with pytest.raises(ValueError, match="N of 16"):
        cublas_fp8_gemm(*_operands(4, 24, 128, "1x128"))  # N 24
    with pytest.raises(ValueError, match=r"\[M, K\] and \[N, K\]"):
        aq, as_, bq, bs = _operands(4, 32, 128, "128x128")
        cublas_fp8_gemm(aq, as_, bq[:, :64], bs)


def test_fp8_linear_runs_all_three_gemms_through_the_given_gemm():
    pytest.importorskip("triton")
    from openseek_hal.ops.kernel_loader import load_kernels

    kernels = load_kernels(interpret=True).fp8
    calls = []

    def counting(a_q, a_scale, b_q, b_scale, out_dtype):
        calls.append((tuple(a_q.shape), tuple(b_q.shape), b_tile(b_q, b_scale)))
        return kernels.fp8_gemm(a_q, a_scale, b_q, b_scale, out_dtype)

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 80, 128, generator=g).bfloat16()
    w = (torch.randn(144, 128, generator=g) * 0.1).bfloat16()
    dy = torch.randn(2, 80, 144, generator=g).bfloat16()
    outs = []
    for gemm in (None, counting):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = kernels.fp8_linear(xi, wi, gemm)
        y.backward(dy)
        outs.append((y, xi.grad, wi.grad))
    # forward [160, 128] x [144, 128]; dx [160, 144] x [128, 144]; dW [144, 160] x [128, 160] per 1x128
    assert calls == [((160, 128), (144, 128), "128x128"), ((160, 144), (128, 144), "128x128"),
                     ((144, 160), (128, 160), "1x128")]
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_cuda_backend_routes_fp8_gemms_through_the_selector_on_hopper(monkeypatch):
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from openseek_hal.backends.cuda import CUDABackend

    backend = CUDABackend.__new__(CUDABackend)  # the op table needs no device
    backend.device = SimpleNamespace(index=0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    table = CUDABackend.native_ops(backend)
    gemm = table["fp8_gemm"]
    assert isinstance(gemm, FastestFP8Gemm) and list(gemm.candidates) == ["triton", "cublas"]
    assert gemm.candidates["cublas"] is cublas_fp8_gemm
    # the layer hands its three GEMMs to that selector
    from openseek_hal.ops.kernels import fp8 as kfp8

    seen = []

    monkeypatch.setattr(kfp8, "_FP8Linear", SimpleNamespace(apply=lambda x, w, g: seen.append(g) or x))
    table["fp8_linear"](torch.zeros(2, 128), torch.zeros(16, 128))
    assert seen == [gemm]
    # before Hopper (or without CUDA) the Triton kernel alone
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 9))
    assert CUDABackend.native_ops(backend)["fp8_gemm"] is not gemm
    assert not isinstance(CUDABackend.native_ops(backend)["fp8_gemm"], FastestFP8Gemm)


@pytest.mark.parametrize("tile", ["128x128", "1x128"])
def test_the_triton_kernel_passes_the_exact_check(tile):
    pytest.importorskip("triton")
    from openseek_hal.ops.kernel_loader import load_kernels

    kernels = load_kernels(interpret=True).fp8
    for out_dtype in (torch.bfloat16, torch.float32):
        fp8_select.exact_check(kernels.fp8_gemm, 130, 144, 300, tile, out_dtype, "cpu")


def test_decisions_preset_from_a_report_skip_the_timing():
    calls, timed = [], []
    sel = _selector({"triton": 2.0, "cublas": 1.0}, calls, timed)
    ops = _operands(130, 256, 512, "128x128")
    sel(*ops)
    fresh = _selector({"triton": 1.0, "cublas": 2.0}, [], timed2 := [])
    fresh.preset(sel.report() + [dict(sel.report()[0], K=1024, choice="cutlass")])
    assert fresh.report() == sel.report() and fresh.choose(*ops) == "cublas" and timed2 == []


def test_cublas_adaptor_takes_scales_in_any_strides(monkeypatch):
    """A weight's scales may arrive as a view (W^T's blocks are W's transposed): the adaptor lays them out."""
    monkeypatch.setattr(torch, "_scaled_mm", _emulated_scaled_mm)
    aq, as_, bq, bs = _operands(64, 256, 1024, "128x128")
    strided_b = bs.t().contiguous().t()  # same values, column-major
    strided_a = as_.t().contiguous().t()
    assert torch.equal(cublas_fp8_gemm(aq, strided_a, bq, strided_b), _reference(aq, as_, bq, bs))
