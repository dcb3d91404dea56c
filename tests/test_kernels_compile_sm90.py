"""The newest Triton kernels compiled for a Hopper GPU (sm_90) on a machine without one.

The interpreter checks a kernel's arithmetic, not whether the GPU compiler accepts it (layouts of
reshapes and joins, bitcasts, loop-carried tensors). Triton's NVIDIA backend ships ``ptxas``, so the
whole pipeline down to a cubin runs on the CPU: a kernel that would fail to build on the first GPU
call fails here instead. The signatures are those of the launches in the kernels' wrappers.
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from openseek_hal.ops.kernels import adamw, mla  # noqa: E402

try:  # ptxas comes with Triton's NVIDIA backend
    import triton.backends.nvidia  # noqa: F401
except ImportError:  # pragma: no cover - a Triton build without the NVIDIA backend
    pytest.skip("Triton has no NVIDIA backend here", allow_module_level=True)

BF16, F32 = "*bf16", "*fp32"


def _cubin(fn, signature: dict[str, str], constexprs: dict[str, object], tmp_path, monkeypatch) -> bytes:
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # a real build, not a cached one
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default, said explicitly (Triton 3.9 warns)
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    return kernel.asm["cubin"]


@pytest.mark.parametrize("interleaved", [False, True])
def test_mla_qkv_kernels_build_for_sm90(interleaved, tmp_path, monkeypatch):
    strides = {f"s{t}_{d}": "i64" for t in ("q", "kv") for d in "bsh"} | {"skr_b": "i64", "skr_s": "i64"}
    fwd = {"Q": BF16, "KV": BF16, "KR": BF16, "COS": F32, "SIN": F32, "QO": BF16, "KO": BF16, "n_tok": "i32",
           "seq": "i32", "heads": "i32", "nope": "i32", "half": "i32", **strides, "s_cs": "i32"}
    blocks = {"INTERLEAVED": interleaved, "ACC": tl.float32, "BLOCK_T": mla.BLOCK_T, "BLOCK_N": 128,
              "BLOCK_HALF": 32}
    assert _cubin(mla._mla_qkv_fwd, fwd, blocks, tmp_path / "fwd", monkeypatch)
    strides = {f"sd{t}_{d}": "i64" for t in ("q", "k", "v") for d in "bsh"}
    bwd = {"DQO": BF16, "DKO": BF16, "DV": BF16, "COS": F32, "SIN": F32, "DQ": BF16, "DKV": BF16, "DKR": BF16,
           "n_tok": "i32", "seq": "i32", "heads": "i32", "nope": "i32", "half": "i32", "v_dim": "i32", **strides,
           "s_cs": "i32"}
    assert _cubin(mla._mla_qkv_bwd, bwd, {**blocks, "BLOCK_V": 128}, tmp_path / "bwd", monkeypatch)


@pytest.mark.parametrize("device_schedule", [False, True])
def test_adamw_remainder_kernel_builds_for_sm90(device_schedule, tmp_path, monkeypatch):
    signature = {"P": BF16, "G": BF16, "M": F32, "V": F32, "MASTER": "*i16", "HYPER": "*fp64", "LR": "*fp64",
                 "STEP": "*fp64", "SCALE": F32, "n": "i32"}
    constexprs = {"HAS_MASTER": False, "HAS_REMAINDER": True, "DEVICE_SCHEDULE": device_schedule,
                  "ACC": tl.float32, "BLOCK": 1024}
    assert _cubin(adamw._adamw_kernel, signature, constexprs, tmp_path, monkeypatch)


def test_sum_of_squares_kernel_builds_for_sm90(tmp_path, monkeypatch):
    from openseek_hal.ops.kernels import reduce

    constexprs = {"ACC": tl.float32, "BLOCK": reduce.BLOCK}
    assert _cubin(reduce._square_partials, {"X": BF16, "OUT": F32, "n": "i32"}, constexprs, tmp_path, monkeypatch)


@pytest.mark.parametrize("cu_type", ["*i32", "*i64"])
def test_document_bounds_kernel_builds_for_sm90(cu_type, tmp_path, monkeypatch):
    from openseek_hal.ops.kernels import attention

    signature = {"CU": cu_type, "START": "*i32", "END": "*i32", "n_cu": "i32", "total": "i32", "seq": "i32"}
    assert _cubin(attention._document_bounds_kernel, signature, {"STEPS": 14, "BLOCK": 1024}, tmp_path, monkeypatch)


@pytest.mark.parametrize("softmax", [False, True])
def test_balance_loss_kernels_build_for_sm90(softmax, tmp_path, monkeypatch):
    from openseek_hal.ops.kernels import moe

    chunk, block_e = moe._aux_chunk(64)
    common = {"SOFTMAX": softmax, "ACC": tl.float32, "CHUNK": chunk, "BLOCK_E": block_e}
    assert _cubin(moe._aux_partials, {"X": F32, "IDX": "*i64", "P_PART": F32, "C_PART": F32, "seq": "i32",
                                      "n_experts": "i32", "n_chunks": "i32"}, {**common, "TOP_K": 6},
                  tmp_path, monkeypatch)
    assert _cubin(moe._aux_total, {"P_PART": F32, "C_PART": F32, "F": F32, "LOSS": F32, "batch": "i32", "seq": "i32",
                                   "n_experts": "i32", "n_chunks": "i32", "coef_hi": "fp32", "coef_lo": "fp32"},
                  {"TOP_K": 6, "ACC": tl.float32, "BLOCK_E": block_e, "BLOCK_C": 64}, tmp_path, monkeypatch)
    assert _cubin(moe._aux_bwd, {"X": F32, "F": F32, "G": F32, "DX": F32, "seq": "i32", "n_experts": "i32",
                                 "batch": "i32", "coef_hi": "fp32", "coef_lo": "fp32"}, common, tmp_path, monkeypatch)


def test_embedding_add_rows_kernel_builds_for_sm90(tmp_path, monkeypatch):
    from openseek_hal.ops.kernels import embedding

    signature = {"TOTAL": BF16, "SORTED": "*i32", "ENDS": "*i32", "PERM": "*i64", "ROWS": BF16, "n": "i32",
                 "n_rows_total": "i32", "dim": "i32", "stride_total": "i32", "stride_rows": "i32"}
    constexprs = {"ACC": tl.float32, "POSITIONS": 4, "BLOCK_R": 32, "BLOCK_D": 128}
    assert _cubin(embedding._add_sorted_rows, signature, constexprs, tmp_path, monkeypatch)


def test_expert_count_and_inverse_kernels_build_for_sm90(tmp_path, monkeypatch):
    from openseek_hal.ops.kernels import moe

    assert _cubin(moe._histogram, {"IDS": "*i64", "COUNTS": "*i64", "n": "i32", "n_bins": "i32"},
                  {"BLOCK": moe._COUNT_BLOCK, "BINS": 128}, tmp_path, monkeypatch)
    assert _cubin(moe._invert, {"ORDER": "*i64", "INV": "*i64", "n": "i32"}, {"BLOCK": 1024}, tmp_path, monkeypatch)
