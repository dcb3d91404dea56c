"""Triton FP8 kernels: tile quantization (1x128 / 128x128), the block-scaled GEMM, its grouped variants,
and the autograd layers `fp8_linear` / `fp8_grouped_linear` built from them.

The rounding rule is `openseek_hal.ops.fp8`'s, bit for bit: ``scale = max(fl32(amax / 448), 2**-126)``
(a correctly rounded division, ``tl.math.div_rn``), ``y = fl32(x / scale)``, then round to nearest even
on the e4m3 grid done explicitly in float32 (a magic-number add on the binade's step) and the e4m3 byte
assembled from the float32 bits. No float -> fp8 conversion instruction is used: Triton 3.9's
interpreter converts non-representable values wrongly (124.7 -> 64) and NaN to 384, so the kernel
writes the bytes itself and gets the same bits on a GPU and in the interpreter.

The GEMM (``C = A @ B^T``, A ``[M, K]`` per 1x128, B ``[N, K]`` per 128x128 block or per 1x128) walks K in
steps of 128: each step is one ``tl.dot`` of fp8 tiles (a fresh float32 result), multiplied by the
step's scales and added to the float32 accumulator (DeepSeek-V3's promotion). When B is block-scaled
and a program's N tile lies within one 128-block (BLOCK_N <= 128), B's scale is one number per step and
the promotion is one FMA per accumulator element. Tiles are chosen per shape by a fixed rule
(`gemm_config`), never by autotuning, so results are bitwise reproducible run to run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.utils.weak  # noqa: F401  (WeakIdKeyDictionary)
import triton
import triton.language as tl

from openseek_hal.ops import fp8 as _ref

FP8 = torch.float8_e4m3fn
TILE = 128


# -- quantization ---------------------------------------------------------------------------------

@triton.jit
def _e4m3_bits(y):
    """float32 ``y`` -> its e4m3fn byte (int32 0..255): RNE on the e4m3 grid, saturated at 448, NaN -> 0x7F."""
    a = tl.abs(y)
    a = tl.where(a > 448.0, 448.0, a)
    bits = a.to(tl.int32, bitcast=True)
    e = (bits >> 23) & 0xFF
    step_e = tl.where(e < 121, 118, e - 3)  # biased exponent of the e4m3 step: 2**(max(E, -6) - 3)
    magic = ((step_e + 23) << 23).to(tl.float32, bitcast=True)  # 2**23 steps: adding rounds to a step (RNE)
    r = (a + magic) - magic
    rb = r.to(tl.int32, bitcast=True)
    re = (rb >> 23) & 0xFF
    normal = ((re - 120) << 3) | ((rb >> 20) & 7)
    sub = (r * 512.0).to(tl.int32)  # e4m3 subnormals: r = m * 2**-9, m in 0..7 (8 is the first normal)
    out = tl.where(re >= 121, normal, sub)
    sign = (y.to(tl.int32, bitcast=True) >> 24) & 0x80
    out = out | sign
    return tl.where(y != y, 0x7F, out)


@triton.jit
def _block_scale(amax, nan, SHAPE: tl.constexpr):
    """The tile scale from its float32 amax and NaN flag, the rule of every quantization kernel: amax / 448
    rounded to nearest, at least the smallest normal float32 (an all-zero tile), NaN where the tile has one."""
    scale = tl.math.div_rn(amax, tl.zeros([SHAPE], tl.float32) + 448.0)
    scale = tl.where(scale < 1.1754943508222875e-38, 1.1754943508222875e-38, scale)  # NaN stays NaN
    return tl.where(nan > 0, float("nan"), scale)


@triton.jit
def _quant_kernel(X, Q, S, M, K, stride_xb, stride_xm, stride_xk, stride_qb, stride_qm, stride_sb, stride_sm,
                  TILE_M: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    kb = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_m * ROWS + tl.arange(0, ROWS)
    cols = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(X + b * stride_xb + rows[:, None].to(tl.int64) * stride_xm + cols[None, :] * stride_xk, mask=mask,
                other=0.0).to(tl.float32)
    ax = tl.abs(x)
    amax = tl.max(ax, axis=1)
    nan = tl.max((x != x).to(tl.int32), axis=1)
    if TILE_M != 1:
        amax = tl.zeros([ROWS], tl.float32) + tl.max(amax, axis=0)
        nan = tl.zeros([ROWS], tl.int32) + tl.max(nan, axis=0)
    scale = _block_scale(amax, nan, ROWS)
    y = tl.math.div_rn(x, scale[:, None] + tl.zeros([ROWS, BLOCK_K], tl.float32))
    q = _e4m3_bits(y).to(tl.uint8)
    tl.store(Q + b * stride_qb + rows[:, None].to(tl.int64) * stride_qm + cols[None, :], q, mask=mask)
    if TILE_M == 1:
        tl.store(S + b * stride_sb + rows * stride_sm + kb, scale, mask=rows < M)
    else:
        first = tl.arange(0, ROWS) == 0
        tl.store(S + b * stride_sb + pid_m * stride_sm + kb + tl.arange(0, ROWS) * 0, scale, mask=first)


def quantize(x: torch.Tensor, tile: str = "1x128") -> tuple[torch.Tensor, torch.Tensor]:
    """``x[M, K]`` or ``x[B, M, K]`` (any strides) -> contiguous ``(q float8_e4m3fn, scale float32)``."""
    if tile not in ("1x128", "128x128"):
        raise ValueError(f"fp8 tile must be 1x128 or 128x128, got {tile!r}")
    batched = x.dim() == 3
    if x.dim() not in (2, 3):
        raise ValueError(f"quantize takes a 2-d or 3-d tensor, got shape {tuple(x.shape)}")
    x3 = x if batched else x.unsqueeze(0)
    nb, m, k = x3.shape
    tile_m = 1 if tile == "1x128" else TILE
    kb = triton.cdiv(k, TILE)
    q = torch.empty(nb, m, k, dtype=FP8, device=x.device)
    s = torch.empty(nb, m if tile_m == 1 else triton.cdiv(m, TILE), kb, dtype=torch.float32, device=x.device)
    if q.numel():
        rows = 32 if tile_m == 1 and x.device.type == "cuda" else TILE
        grid = (triton.cdiv(m, rows), kb, nb)
        _quant_kernel[grid](x3, q.view(torch.uint8), s, m, k, x3.stride(0), x3.stride(1), x3.stride(2),
                            q.stride(0), q.stride(1), s.stride(0), s.stride(1), TILE_M=tile_m, ROWS=rows,
                            BLOCK_K=TILE, num_warps=4 if tile_m == 1 else 8)
    return (q, s) if batched else (q[0], s[0])


# Old and new code paths, each selectable so one GPU process can time both (`benchmarks/ops/fp8_gpu.py`).
# Every new path is tested on the CPU against the old one (bitwise where it is a pure refactor) and the
# float64 references. ``weight_cache``: W and W^T quantized once per weight version (one kernel, one read of
# W); ``fused_quant``: x (and dy) read once for both the row and the along-the-tokens quantization;
# ``kgrouped_split``: the experts' weight gradient split along each expert's tokens (flattened expert x chunk
# grid, fixed-order reduction); ``split_k``: split-K for dense GEMMs with few output tiles and a long K.
PATHS: dict[str, bool] = {"weight_cache": True, "fused_quant": True, "kgrouped_split": True, "split_k": True}


def set_paths(**flags: bool) -> dict[str, bool]:
    """Select old (False) or new (True) code paths by name (`PATHS`); returns the previous selection."""
    unknown = set(flags) - set(PATHS)
    if unknown:
        raise ValueError(f"unknown fp8 paths {sorted(unknown)}; known: {sorted(PATHS)}")
    old = dict(PATHS)
    PATHS.update({k: bool(v) for k, v in flags.items()})
    return old


@triton.jit
def _quant_wt_kernel(X, Q, QT, S, ST, M, K, stride_xb, stride_xm, stride_xk, stride_qb, stride_qm, stride_tb,
                     stride_tk, stride_sb, stride_sm, stride_stb, stride_stk, BLOCK: tl.constexpr):
    """One 128x128 block of ``X[b]`` read once -> its fp8 values in ``Q[b]`` and transposed in ``QT[b]``, its
    scale at ``S[b, i, j]`` and ``ST[b, j, i]`` (W^T's 128x128 blocks are W's blocks transposed, same scale)."""
    pid_m = tl.program_id(0)
    kb = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK + tl.arange(0, BLOCK)
    cols = kb * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    x = tl.load(X + b * stride_xb + rows[:, None].to(tl.int64) * stride_xm + cols[None, :] * stride_xk, mask=mask,
                other=0.0).to(tl.float32)
    amax = tl.zeros([BLOCK], tl.float32) + tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    nan = tl.zeros([BLOCK], tl.int32) + tl.max(tl.max((x != x).to(tl.int32), axis=1), axis=0)
    scale = _block_scale(amax, nan, BLOCK)
    y = tl.math.div_rn(x, scale[:, None] + tl.zeros([BLOCK, BLOCK], tl.float32))
    q = _e4m3_bits(y).to(tl.uint8)
    tl.store(Q + b * stride_qb + rows[:, None].to(tl.int64) * stride_qm + cols[None, :], q, mask=mask)
    tl.store(QT + b * stride_tb + cols[:, None].to(tl.int64) * stride_tk + rows[None, :], tl.trans(q),
             mask=(cols < K)[:, None] & (rows < M)[None, :])
    first = tl.arange(0, BLOCK) == 0
    tl.store(S + b * stride_sb + pid_m * stride_sm + kb + tl.arange(0, BLOCK) * 0, scale, mask=first)
    tl.store(ST + b * stride_stb + kb * stride_stk + pid_m + tl.arange(0, BLOCK) * 0, scale, mask=first)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w[N, K]`` or ``w[E, N, K]`` per 128x128 block, read once -> ``(q, scale, q of w^T, scale of w^T)``:
    bitwise ``quantize(w, "128x128") + quantize(w.transpose(-1, -2), "128x128")``."""
    if w.dim() not in (2, 3):
        raise ValueError(f"quantize_weight takes a 2-d or 3-d tensor, got shape {tuple(w.shape)}")
    w3 = w if w.dim() == 3 else w.unsqueeze(0)
    nb, m, k = w3.shape
    mb, kb = triton.cdiv(m, TILE), triton.cdiv(k, TILE)
    q = torch.empty(nb, m, k, dtype=FP8, device=w.device)
    qt = torch.empty(nb, k, m, dtype=FP8, device=w.device)
    s = torch.empty(nb, mb, kb, dtype=torch.float32, device=w.device)
    st = torch.empty(nb, kb, mb, dtype=torch.float32, device=w.device)
    if q.numel():
        _quant_wt_kernel[(mb, kb, nb)](w3, q.view(torch.uint8), qt.view(torch.uint8), s, st, m, k, w3.stride(0),
                                       w3.stride(1), w3.stride(2), q.stride(0), q.stride(1), qt.stride(0),
                                       qt.stride(1), s.stride(0), s.stride(1), st.stride(0), st.stride(1),
                                       BLOCK=TILE, num_warps=8)
    return (q, s, qt, st) if w.dim() == 3 else (q[0], s[0], qt[0], st[0])


_WEIGHT_CACHE: torch.utils.weak.WeakIdKeyDictionary = torch.utils.weak.WeakIdKeyDictionary()


def _weight_key(w: torch.Tensor) -> tuple:
    return (w._version, w.data_ptr(), tuple(w.shape), tuple(w.stride()), w.dtype, w.device, _ref.weight_generation())


def cached_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quantize_weight` of ``w``, computed once per weight version: the entry is keyed by the tensor's
    identity (weakly), ``w._version`` (in-place updates bump it), its storage, shape and dtype and
    `openseek_hal.ops.fp8.weight_generation` (bumped by the optimizer, whose writes bypass the counter)."""
    key = _weight_key(w)
    hit = _WEIGHT_CACHE.get(w)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = quantize_weight(w.detach())
    _WEIGHT_CACHE[w] = (key, value)
    return value


def clear_weight_cache() -> None:
    _WEIGHT_CACHE.clear()


@triton.jit
def _quant_dual_kernel(X, Q, S, QT, ST, M, K, stride_xm, stride_xk, stride_qm, stride_sm, stride_tk, stride_stk,
                       BLOCK: tl.constexpr):
    """A 128x128 tile of ``X[M, K]`` read once -> its 1x128 quantization along K (``Q``, ``S[M, K/128]``) and the
    1x128 quantization of ``X^T`` along M (``QT[K, M]``, ``ST[K, M/128]``): both of `_quant_kernel`'s rules."""
    pid_m = tl.program_id(0)
    kb = tl.program_id(1)
    rows = pid_m * BLOCK + tl.arange(0, BLOCK)
    cols = kb * BLOCK + tl.arange(0, BLOCK)
    row_ok, col_ok = rows < M, cols < K
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None].to(tl.int64) * stride_xm + cols[None, :] * stride_xk, mask=mask,
                other=0.0).to(tl.float32)
    ax = tl.abs(x)
    isnan = (x != x).to(tl.int32)
    scale = _block_scale(tl.max(ax, axis=1), tl.max(isnan, axis=1), BLOCK)
    q = _e4m3_bits(tl.math.div_rn(x, scale[:, None] + tl.zeros([BLOCK, BLOCK], tl.float32))).to(tl.uint8)
    tl.store(Q + rows[:, None].to(tl.int64) * stride_qm + cols[None, :], q, mask=mask)
    tl.store(S + rows * stride_sm + kb, scale, mask=row_ok)
    scale_t = _block_scale(tl.max(ax, axis=0), tl.max(isnan, axis=0), BLOCK)
    qt = _e4m3_bits(tl.math.div_rn(x, scale_t[None, :] + tl.zeros([BLOCK, BLOCK], tl.float32))).to(tl.uint8)
    tl.store(QT + cols[:, None].to(tl.int64) * stride_tk + rows[None, :], tl.trans(qt),
             mask=col_ok[:, None] & row_ok[None, :])
    tl.store(ST + cols * stride_stk + pid_m, scale_t, mask=col_ok)


def quantize_dual(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x[M, K]`` (any strides) read once -> ``quantize(x, "1x128") + quantize(x.t(), "1x128")``, bitwise."""
    if x.dim() != 2:
        raise ValueError(f"quantize_dual takes a 2-d tensor, got shape {tuple(x.shape)}")
    m, k = x.shape
    mb, kb = triton.cdiv(m, TILE), triton.cdiv(k, TILE)
    q = torch.empty(m, k, dtype=FP8, device=x.device)
    s = torch.empty(m, kb, dtype=torch.float32, device=x.device)
    qt = torch.empty(k, m, dtype=FP8, device=x.device)
    st = torch.empty(k, mb, dtype=torch.float32, device=x.device)
    if q.numel():
        _quant_dual_kernel[(mb, kb)](x, q.view(torch.uint8), s, qt.view(torch.uint8), st, m, k, x.stride(0),
                                     x.stride(1), q.stride(0), s.stride(0), qt.stride(0), st.stride(0), BLOCK=TILE,
                                     num_warps=8)
    return q, s, qt, st


# -- GEMMs -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GemmConfig:
    block_m: int = 128
    block_n: int = 128
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 4
    split_k: int = 1  # >1: K cut into this many ranges, float32 partials summed in a fixed order (fp8_gemm)

    def text(self) -> str:
        split = f" splitk{self.split_k}" if self.split_k > 1 else ""
        return f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages} g{self.group_m}{split}"


# The configs `benchmarks/ops/fp8_gpu.py` sweeps; `gemm_config` picks one by shape (no autotuning).
CONFIGS: tuple[GemmConfig, ...] = (
    GemmConfig(128, 128, 8, 8, 4), GemmConfig(128, 128, 8, 8, 3), GemmConfig(128, 128, 8, 4, 4),
    GemmConfig(128, 256, 8, 8, 3), GemmConfig(64, 128, 8, 4, 4), GemmConfig(64, 64, 8, 4, 3),
    GemmConfig(128, 64, 8, 4, 4),
)


# The SM count the split-K rule assumes (an H100 SXM's): a constant, not the card's, so a shape's split (and
# so its bits) does not depend on which card runs it.
SMS = 132
SPLIT_MIN_BLOCKS = 8  # each split-K range takes at least 8 K-blocks (1024 of K)


def split_k_for(tiles: int, k: int) -> int:
    """Splits of K for a GEMM with ``tiles`` output tiles: 1 unless the tiles leave SMs idle (< `SMS`) and K is
    long; then about two waves of programs, each range at least `SPLIT_MIN_BLOCKS` K-blocks."""
    kb = triton.cdiv(k, TILE)
    if tiles >= SMS or kb < 2 * SPLIT_MIN_BLOCKS:
        return 1
    return max(1, min(kb // SPLIT_MIN_BLOCKS, (2 * SMS) // tiles))


def gemm_config(m: int, n: int, k: int, device: torch.device) -> GemmConfig:
    """The fixed tile choice for a shape: 128x128 tiles, 8 warps, 4 stages on a GPU; smaller tiles when
    the problem is small (keep the SMs busy); small tiles under the interpreter (it runs programs serially).
    On a GPU, split-K (`split_k_for`) when the output has fewer tiles than SMs and K is long (the weight
    gradients: K is the token count, the output a narrow layer's weight)."""
    if device.type != "cuda":  # the interpreter: few large programs (its cost is per program and per op)
        return GemmConfig(128, 128, 1, 1, 1)
    cfg = GemmConfig(64, 64, 8, 4, 3) if m * n <= 256 * 1024 else GemmConfig(128, 128, 8, 8, 4)
    split = split_k_for(triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), k)
    return GemmConfig(cfg.block_m, cfg.block_n, cfg.group_m, cfg.num_warps, cfg.num_stages, split)


_OVERRIDE: dict[str, GemmConfig | None] = {"config": None}


def set_config_override(config: GemmConfig | None) -> None:
    """Force every fp8 GEMM to ``config`` (None: the shape rule). For the benchmark's sweep only."""
    _OVERRIDE["config"] = config


def _config(m: int, n: int, k: int, device: torch.device) -> GemmConfig:
    return _OVERRIDE["config"] or gemm_config(m, n, k, device)


@triton.jit
def _operand(x, INTERP: tl.constexpr):
    """An fp8 tile for ``tl.dot``. Under Triton's interpreter (INTERP), which reads the e4m3fn NaN code 0x7F
    as 480, the tile is decoded from its bits to float32 (NaN kept; every e4m3 product is exact in float32)."""
    if INTERP:
        bits = x.to(tl.uint8, bitcast=True).to(tl.int32)
        e = (bits >> 3) & 15
        m = (bits & 7).to(tl.float32)
        mag = tl.where(e == 0, m * 0.001953125, (8.0 + m) * tl.exp2((e - 10).to(tl.float32)))
        mag = tl.where((bits & 0x7F) == 0x7F, float("nan"), mag)
        return tl.where((bits & 0x80) != 0, -mag, mag)
    return x


@triton.jit
def _scaled_k_loop(A, AS, B, BS, rows, cols, row_mask, col_mask, pid_n, k_lo, k_hi, kb_lo, kb_hi,
                   stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk, stride_bsn, stride_bsk,
                   B_ROW_SCALE: tl.constexpr, MASK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, INTERP: tl.constexpr):
    """sum over K blocks kb in [kb_lo, kb_hi) of dot(A[rows, kb], B[cols, kb]^T) * a_scale * b_scale, in fp32,
    reading only K indices in [k_lo, k_hi) (the rest as zeros) when MASK_K."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs = tl.arange(0, BLOCK_K)
    a_ptrs = A + rows[:, None].to(tl.int64) * stride_am + (kb_lo * BLOCK_K + offs)[None, :] * stride_ak
    b_ptrs = B + cols[None, :].to(tl.int64) * stride_bn + (kb_lo * BLOCK_K + offs)[:, None] * stride_bk
    for i in range(0, kb_hi - kb_lo):
        kb = kb_lo + i
        if MASK_K:
            kk = kb * BLOCK_K + offs
            k_ok = (kk >= k_lo) & (kk < k_hi)
            a = tl.load(a_ptrs, mask=row_mask[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & col_mask[None, :], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=col_mask[None, :], other=0.0)
        sa = tl.load(AS + rows * stride_asm + kb * stride_ask, mask=row_mask, other=0.0)
        part = tl.dot(_operand(a, INTERP), _operand(b, INTERP))
        if B_ROW_SCALE:
            sb = tl.load(BS + cols * stride_bsn + kb * stride_bsk, mask=col_mask, other=0.0)
            acc += part * sa[:, None] * sb[None, :]
        elif BLOCK_N <= BLOCK_K:  # the tile lies in one 128-block of B: one scale per step
            sb = tl.load(BS + ((pid_n * BLOCK_N) // BLOCK_K) * stride_bsn + kb * stride_bsk)
            acc += part * (sa * sb)[:, None]
        else:
            sb = tl.load(BS + (cols // BLOCK_K) * stride_bsn + kb * stride_bsk, mask=col_mask, other=0.0)
            acc += part * sa[:, None] * sb[None, :]
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _out_cast(acc, dtype: tl.constexpr, RNE_BF16: tl.constexpr):
    """``acc.to(dtype)``; RNE_BF16 (set only under Triton's interpreter, whose fp32 -> bf16 cast truncates):
    round to nearest even on the bits first, as the GPU's cast does."""
    if RNE_BF16:
        bits = acc.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        acc = bits.to(tl.float32, bitcast=True)
    return acc.to(dtype)


@triton.jit
def _gemm_kernel(A, AS, B, BS, C, M, N, K,
                 stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk, stride_bsn, stride_bsk,
                 stride_cm, stride_cn,
                 B_ROW_SCALE: tl.constexpr, MASK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, RNE_BF16: tl.constexpr, INTERP: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n  # swizzled order: GROUP_M row tiles share the B tiles they read from L2
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < M, cols < N
    acc = _scaled_k_loop(A, AS, B, BS, rows, cols, row_mask, col_mask, pid_n, 0, K, 0, tl.cdiv(K, BLOCK_K),
                         stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk, stride_bsn, stride_bsk,
                         B_ROW_SCALE, MASK_K, BLOCK_M, BLOCK_N, BLOCK_K, INTERP)
    tl.store(C + rows[:, None].to(tl.int64) * stride_cm + cols[None, :] * stride_cn,
             _out_cast(acc, C.dtype.element_ty, RNE_BF16),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _segment_of(ENDS, E, i, BLOCK_E: tl.constexpr):
    """The segment holding item ``i`` of ``E`` segments given by their inclusive prefix-sum ends ``ENDS``
    (E when ``i`` is past the last one): a device-side search, no host sync."""
    offs = tl.arange(0, BLOCK_E)
    ends = tl.load(ENDS + offs, mask=offs < E, other=2147483647)
    return tl.sum((ends <= i).to(tl.int32), axis=0)


@triton.jit
def _segment_bounds(ENDS, e):
    """``[start, end)`` of segment ``e`` from the inclusive prefix-sum ends ``ENDS``."""
    return tl.load(ENDS + e - 1, mask=e > 0, other=0), tl.load(ENDS + e)


@triton.jit
def _grouped_gemm_kernel(A, AS, B, BS, C, TILE_END, ROW_END, E, N, K,
                         stride_am, stride_ak, stride_asm, stride_ask, stride_be, stride_bn, stride_bk,
                         stride_bse, stride_bsn, stride_bsk, stride_cm, stride_cn,
                         MASK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_E: tl.constexpr, RNE_BF16: tl.constexpr, INTERP: tl.constexpr):
    """Rows grouped by expert (``counts``): program (t, n) takes row tile t of the concatenated per-expert
    tiles; the expert is found from the inclusive prefix sums of tiles per expert (no host sync)."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    t = pid // num_n
    pid_n = pid % num_n
    e = _segment_of(TILE_END, E, t, BLOCK_E)
    if e < E:
        tile_end = tl.load(TILE_END + e)
        row_start, row_end = _segment_bounds(ROW_END, e)
        tiles = tl.cdiv(row_end - row_start, BLOCK_M)
        local = t - (tile_end - tiles)
        rows = row_start + local * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask, col_mask = rows < row_end, cols < N
        acc = _scaled_k_loop(A, AS, B + e.to(tl.int64) * stride_be, BS + e.to(tl.int64) * stride_bse, rows, cols,
                             row_mask, col_mask, pid_n, 0, K, 0, tl.cdiv(K, BLOCK_K), stride_am, stride_ak,
                             stride_asm, stride_ask, stride_bn, stride_bk, stride_bsn, stride_bsk, False, MASK_K,
                             BLOCK_M, BLOCK_N, BLOCK_K, INTERP)
        tl.store(C + rows[:, None].to(tl.int64) * stride_cm + cols[None, :] * stride_cn,
                 _out_cast(acc, C.dtype.element_ty, RNE_BF16), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _kgrouped_gemm_kernel(A, AS, B, BS, C, ROW_END, M, N,
                          stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk, stride_bsn, stride_bsk,
                          stride_ce, stride_cm, stride_cn,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          RNE_BF16: tl.constexpr, INTERP: tl.constexpr):
    """The routed experts' weight gradient: ``C[e] = A[:, seg_e] @ B[:, seg_e]^T`` over each expert's token
    segment of the reduction (A ``[M, T]``, B ``[N, T]``, both per 1x128 along the tokens)."""
    pid = tl.program_id(0)
    e = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    k_lo, k_hi = _segment_bounds(ROW_END, e)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < M, cols < N
    acc = _scaled_k_loop(A, AS, B, BS, rows, cols, row_mask, col_mask, pid_n, k_lo, k_hi, k_lo // BLOCK_K,
                         tl.cdiv(k_hi, BLOCK_K), stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk,
                         stride_bsn, stride_bsk, True, True, BLOCK_M, BLOCK_N, BLOCK_K, INTERP)
    tl.store(C + e.to(tl.int64) * stride_ce + rows[:, None].to(tl.int64) * stride_cm + cols[None, :] * stride_cn,
             _out_cast(acc, C.dtype.element_ty, RNE_BF16), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _kgrouped_split_kernel(A, AS, B, BS, C, P, ROW_END, CHUNK_END, SLOT_START, E, M, N, CK,
                           stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk, stride_bsn, stride_bsk,
                           stride_ce, stride_cm, stride_cn, stride_ps, stride_pm, stride_pn,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
                           RNE_BF16: tl.constexpr, INTERP: tl.constexpr):
    """`_kgrouped_gemm_kernel` split along the tokens: program (tile, c) takes chunk c of the flattened (expert,
    chunk) list (at most CK K-blocks of one expert's segment; the expert found from the prefix sums
    ``CHUNK_END``, no host sync). An expert with one chunk writes ``C[e]`` directly; the chunks of a split expert
    write float32 partials to ``P[SLOT_START[e] + j]``, summed in chunk order by `_splitk_reduce_kernel`.
    Only the (at most two) K-blocks a segment boundary cuts are loaded with a K mask: the others load whole
    128-wide tiles, which Triton can pipeline (a mask at a loaded, unaligned bound has no 4-byte vectors and
    left the old kernel's loop unpipelined)."""
    pid = tl.program_id(0)
    c = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    e = _segment_of(CHUNK_END, E, c, BLOCK_E)
    if e < E:
        chunk_start, chunk_end = _segment_bounds(CHUNK_END, e)
        chunks = chunk_end - chunk_start
        j = c - chunk_start
        k_lo, k_hi = _segment_bounds(ROW_END, e)
        kb_lo = k_lo // BLOCK_K
        kb_hi = tl.cdiv(k_hi, BLOCK_K)
        c0 = kb_lo + j * CK
        c1 = tl.minimum(c0 + CK, kb_hi)
        full_lo = tl.cdiv(k_lo, BLOCK_K)  # the blocks wholly inside [k_lo, k_hi): [full_lo, full_hi)
        full_hi = k_hi // BLOCK_K
        i0 = tl.maximum(c0, full_lo)
        i1 = tl.maximum(tl.minimum(c1, full_hi), i0)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask, col_mask = rows < M, cols < N
        acc = _scaled_k_loop(A, AS, B, BS, rows, cols, row_mask, col_mask, pid_n, k_lo, k_hi, i0, i1, stride_am,
                             stride_ak, stride_asm, stride_ask, stride_bn, stride_bk, stride_bsn, stride_bsk, True,
                             False, BLOCK_M, BLOCK_N, BLOCK_K, INTERP)
        nonempty = k_lo < k_hi
        head_cut = (k_lo % BLOCK_K) != 0
        head_on = (nonempty & head_cut & (kb_lo >= c0) & (kb_lo < c1)).to(tl.int32)
        tail_on = (nonempty & ((k_hi % BLOCK_K) != 0) & (full_hi >= c0) & (full_hi < c1)
                   & ((full_hi != kb_lo) | (~head_cut))).to(tl.int32)
        acc += _scaled_k_loop(A, AS, B, BS, rows, cols, row_mask, col_mask, pid_n, k_lo, k_hi, kb_lo,
                              kb_lo + head_on, stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk,
                              stride_bsn, stride_bsk, True, True, BLOCK_M, BLOCK_N, BLOCK_K, INTERP)
        acc += _scaled_k_loop(A, AS, B, BS, rows, cols, row_mask, col_mask, pid_n, k_lo, k_hi, full_hi,
                              full_hi + tail_on, stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk,
                              stride_bsn, stride_bsk, True, True, BLOCK_M, BLOCK_N, BLOCK_K, INTERP)
        out_mask = row_mask[:, None] & col_mask[None, :]
        if chunks > 1:
            slot = tl.load(SLOT_START + e) + j
            tl.store(P + slot.to(tl.int64) * stride_ps + rows[:, None].to(tl.int64) * stride_pm
                     + cols[None, :] * stride_pn, acc, mask=out_mask)
        else:
            tl.store(C + e.to(tl.int64) * stride_ce + rows[:, None].to(tl.int64) * stride_cm
                     + cols[None, :] * stride_cn, _out_cast(acc, C.dtype.element_ty, RNE_BF16), mask=out_mask)


@triton.jit
def _splitk_reduce_kernel(P, C, CHUNK_END, SLOT_START, MN, NSLOT, stride_ps, stride_ce,
                          GROUPED: tl.constexpr, BLOCK: tl.constexpr, RNE_BF16: tl.constexpr):
    """``C[g] = sum_j P[first + j]`` over group g's float32 partials, j ascending (a fixed order: bitwise the same
    every run), rounded once to C's dtype. GROUPED: group g = expert g with ``chunks > 1`` (the others wrote C
    themselves); else one group of NSLOT partials."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    if GROUPED:
        g_start, g_end = _segment_bounds(CHUNK_END, g)
        count = g_end - g_start
        first = tl.load(SLOT_START + g)
    else:
        count = NSLOT
        first = g * 0
    if count > 1:
        acc = tl.load(P + first.to(tl.int64) * stride_ps + offs, mask=mask, other=0.0)
        for j in range(1, count):
            acc += tl.load(P + (first + j).to(tl.int64) * stride_ps + offs, mask=mask, other=0.0)
        tl.store(C + g.to(tl.int64) * stride_ce + offs, _out_cast(acc, C.dtype.element_ty, RNE_BF16), mask=mask)


@triton.jit
def _gemm_splitk_kernel(A, AS, B, BS, P, M, N, K, CK,
                        stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk, stride_bsn, stride_bsk,
                        stride_ps, stride_pm, stride_pn,
                        B_ROW_SCALE: tl.constexpr, MASK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, INTERP: tl.constexpr):
    """`_gemm_kernel` over K-blocks ``[s * CK, (s + 1) * CK)`` for split s = program_id(1): float32 partials
    ``P[s]`` (summed in split order by `_splitk_reduce_kernel`)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = rows < M, cols < N
    kb0 = split * CK
    kb1 = tl.minimum(kb0 + CK, tl.cdiv(K, BLOCK_K))
    acc = _scaled_k_loop(A, AS, B, BS, rows, cols, row_mask, col_mask, pid_n, 0, K, kb0, kb1,
                         stride_am, stride_ak, stride_asm, stride_ask, stride_bn, stride_bk, stride_bsn, stride_bsk,
                         B_ROW_SCALE, MASK_K, BLOCK_M, BLOCK_N, BLOCK_K, INTERP)
    tl.store(P + split.to(tl.int64) * stride_ps + rows[:, None].to(tl.int64) * stride_pm + cols[None, :] * stride_pn,
             acc, mask=row_mask[:, None] & col_mask[None, :])


REDUCE_BLOCK = 1024


_out = _ref.out_dtype_of


def _fp8(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dtype != FP8:
        raise ValueError(f"{what} must be float8_e4m3fn, got {t.dtype}")
    return t if t.stride(-1) == 1 else t.contiguous()


def _scale(t: torch.Tensor, shapes: list[tuple[int, ...]], what: str) -> torch.Tensor:
    if tuple(t.shape) not in shapes:
        raise ValueError(f"{what} has shape {tuple(t.shape)}, expected one of {shapes}")
    return t.float() if t.dtype != torch.float32 else t


def fp8_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: str | torch.dtype = "bfloat16") -> torch.Tensor:
    """``C[M, N] = (a_q * a_scale) @ (b_q * b_scale)^T``; see `openseek_hal.ops.fp8.fp8_gemm`."""
    a_q, b_q = _fp8(a_q, "a_q"), _fp8(b_q, "b_q")
    (m, k), n = a_q.shape, b_q.shape[0]
    if b_q.dim() != 2 or b_q.shape[1] != k:
        raise ValueError(f"fp8_gemm: a {tuple(a_q.shape)} and b {tuple(b_q.shape)} must be [M, K] and [N, K]")
    kb = triton.cdiv(k, TILE)
    a_scale = _scale(a_scale, [(m, kb)], "a_scale")
    b_scale = _scale(b_scale, [(triton.cdiv(n, TILE), kb), (n, kb)], "b_scale")
    row_scale = _ref.b_tile(b_q, b_scale) == "1x128"
    c = torch.empty(m, n, dtype=_out(out_dtype), device=a_q.device)
    if not c.numel():
        return c
    if k == 0:
        return c.zero_()
    cfg = _config(m, n, k, a_q.device)
    if PATHS["split_k"] and cfg.split_k > 1:
        return _gemm_split_k(a_q, a_scale, b_q, b_scale, c, row_scale, cfg)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _gemm_kernel[grid](a_q, a_scale, b_q, b_scale, c, m, n, k, a_q.stride(0), a_q.stride(1), a_scale.stride(0),
                       a_scale.stride(1), b_q.stride(0), b_q.stride(1), b_scale.stride(0), b_scale.stride(1),
                       c.stride(0), c.stride(1), B_ROW_SCALE=row_scale, MASK_K=k % TILE != 0, BLOCK_M=cfg.block_m,
                       BLOCK_N=cfg.block_n, BLOCK_K=TILE, GROUP_M=cfg.group_m, RNE_BF16=_rne(c), INTERP=_interpreted(),
                       num_warps=cfg.num_warps,
                       num_stages=cfg.num_stages)
    return c


def _gemm_split_k(a_q, a_scale, b_q, b_scale, c, row_scale: bool, cfg: GemmConfig) -> torch.Tensor:
    (m, k), n = a_q.shape, b_q.shape[0]
    kb = triton.cdiv(k, TILE)
    ck = triton.cdiv(kb, cfg.split_k)
    splits = triton.cdiv(kb, ck)
    p = torch.empty(splits, m, n, dtype=torch.float32, device=a_q.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), splits)
    _gemm_splitk_kernel[grid](a_q, a_scale, b_q, b_scale, p, m, n, k, ck, a_q.stride(0), a_q.stride(1),
                              a_scale.stride(0), a_scale.stride(1), b_q.stride(0), b_q.stride(1), b_scale.stride(0),
                              b_scale.stride(1), p.stride(0), p.stride(1), p.stride(2), B_ROW_SCALE=row_scale,
                              MASK_K=k % TILE != 0, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=TILE,
                              GROUP_M=cfg.group_m, INTERP=_interpreted(), num_warps=cfg.num_warps,
                              num_stages=cfg.num_stages)
    if splits == 1:
        return c.copy_(p[0])
    _splitk_reduce_kernel[(triton.cdiv(m * n, REDUCE_BLOCK), 1)](p, c, p, p, m * n, splits, p.stride(0), 0,
                                                                 GROUPED=False, BLOCK=REDUCE_BLOCK, RNE_BF16=_rne(c),
                                                                 num_warps=4)
    return c


def _interpreted() -> bool:
    """Whether this module's kernels are Triton-interpreter ones (the ``triton-interpret`` copy)."""
    from triton.runtime.jit import JITFunction

    return not isinstance(_gemm_kernel, JITFunction)


def _rne(c: torch.Tensor) -> bool:
    return c.dtype == torch.bfloat16 and _interpreted()


def _row_ends(counts: torch.Tensor, experts: int) -> torch.Tensor:
    if counts.dim() != 1 or counts.numel() != experts:
        raise ValueError(f"counts must have one entry per expert ({experts}), got shape {tuple(counts.shape)}")
    return counts.cumsum(0, dtype=torch.int32)


def fp8_grouped_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
                     counts: torch.Tensor, out_dtype: str | torch.dtype = "bfloat16") -> torch.Tensor:
    """Rows of ``a_q[N, K]`` grouped by ``counts[E]`` times ``b_q[E, M, K]^T`` (block scales ``[E, M/128, K/128]``);
    one launch, no host sync (the grid is sized for the worst case, ``ceil(N/BLOCK_M) + E`` row tiles)."""
    a_q = _fp8(a_q, "a_q")
    b_q = b_q if b_q.stride(-1) == 1 else b_q.contiguous()
    _fp8(b_q, "b_q")
    (rows, k), (e, m) = a_q.shape, b_q.shape[:2]
    if b_q.dim() != 3 or b_q.shape[2] != k:
        raise ValueError(f"fp8_grouped_gemm: a {tuple(a_q.shape)} and b {tuple(b_q.shape)} must be [N, K], [E, M, K]")
    kb = triton.cdiv(k, TILE)
    a_scale = _scale(a_scale, [(rows, kb)], "a_scale")
    b_scale = _scale(b_scale, [(e, triton.cdiv(m, TILE), kb)], "b_scale")
    c = torch.empty(rows, m, dtype=_out(out_dtype), device=a_q.device)
    if not c.numel():
        return c
    if k == 0:
        return c.zero_()
    cfg = _config(rows, m, k, a_q.device)
    block_n = min(cfg.block_n, TILE)  # one B scale per step and tile
    row_end = _row_ends(counts, e)
    tile_end = triton.cdiv(counts.to(torch.int64), cfg.block_m).cumsum(0).to(torch.int32)
    grid = ((triton.cdiv(rows, cfg.block_m) + e) * triton.cdiv(m, block_n),)
    _grouped_gemm_kernel[grid](a_q, a_scale, b_q, b_scale, c, tile_end, row_end, e, m, k, a_q.stride(0),
                               a_q.stride(1), a_scale.stride(0), a_scale.stride(1), b_q.stride(0), b_q.stride(1),
                               b_q.stride(2), b_scale.stride(0), b_scale.stride(1), b_scale.stride(2), c.stride(0),
                               c.stride(1), MASK_K=k % TILE != 0, BLOCK_M=cfg.block_m, BLOCK_N=block_n,
                               BLOCK_K=TILE, BLOCK_E=triton.next_power_of_2(e), RNE_BF16=_rne(c), INTERP=_interpreted(),
                               num_warps=cfg.num_warps,
                               num_stages=cfg.num_stages)
    return c


KGROUPED_PARTIAL_BYTES = 256 << 20  # the split experts' float32 partials stay under this


def kgrouped_chunk_blocks(m: int, n: int, t: int, experts: int) -> int:
    """K-blocks per chunk of the split K-grouped GEMM: at least 8 (1024 tokens), and large enough that the
    partials' worst case (``2 * (ceil(T/128) + E) / chunk`` slots of ``M x N`` float32) fits
    `KGROUPED_PARTIAL_BYTES` (at most 64 slots)."""
    slots = max(2, min(64, KGROUPED_PARTIAL_BYTES // max(1, m * n * 4)))
    return max(8, triton.cdiv(2 * (triton.cdiv(t, TILE) + experts), slots))


def fp8_kgrouped_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
                      counts: torch.Tensor, out_dtype: str | torch.dtype = "float32",
                      chunk_blocks: int | None = None) -> torch.Tensor:
    """``C[e] = A[:, seg_e] @ B[:, seg_e]^T`` for ``A[M, T]``, ``B[N, T]`` (1x128 scales along T) and the token
    segments given by ``counts[E]`` -> ``C[E, M, N]`` (the routed experts' weight gradient). With
    ``PATHS["kgrouped_split"]`` each expert's segment is cut into chunks of ``chunk_blocks`` K-blocks (default
    `kgrouped_chunk_blocks`) run by separate programs, their partials summed in chunk order."""
    a_q, b_q = _fp8(a_q, "a_q"), _fp8(b_q, "b_q")
    (m, t), n, e = a_q.shape, b_q.shape[0], counts.numel()
    kb = triton.cdiv(t, TILE)
    a_scale = _scale(a_scale, [(m, kb)], "a_scale")
    b_scale = _scale(b_scale, [(n, kb)], "b_scale")
    c = torch.empty(e, m, n, dtype=_out(out_dtype), device=a_q.device)
    if not c.numel():
        return c
    if t == 0:
        return c.zero_()
    cfg = _config(m, n, t, a_q.device)
    row_end = _row_ends(counts, e)
    if PATHS["kgrouped_split"]:
        return _kgrouped_split(a_q, a_scale, b_q, b_scale, counts, row_end, c, cfg,
                               chunk_blocks or kgrouped_chunk_blocks(m, n, t, e))
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), e)
    _kgrouped_gemm_kernel[grid](a_q, a_scale, b_q, b_scale, c, row_end, m, n, a_q.stride(0), a_q.stride(1),
                                a_scale.stride(0), a_scale.stride(1), b_q.stride(0), b_q.stride(1), b_scale.stride(0),
                                b_scale.stride(1), c.stride(0), c.stride(1), c.stride(2), BLOCK_M=cfg.block_m,
                                BLOCK_N=cfg.block_n, BLOCK_K=TILE, RNE_BF16=_rne(c), INTERP=_interpreted(),
                                num_warps=cfg.num_warps,
                                num_stages=cfg.num_stages)
    return c


def _kgrouped_split(a_q, a_scale, b_q, b_scale, counts, row_end, c, cfg: GemmConfig, ck: int) -> torch.Tensor:
    """The flattened (expert, chunk) launch: chunk counts and offsets by prefix sums on the device (no host
    sync); the grid and the partials are sized for the worst case from the shapes alone."""
    (m, t), n, e = a_q.shape, b_q.shape[0], counts.numel()
    kb_total = triton.cdiv(t, TILE)
    cnt = counts.to(torch.int64)
    end = row_end.to(torch.int64)
    start = end - cnt
    blocks = torch.where(cnt > 0, (end + TILE - 1) // TILE - start // TILE, 0)
    chunks = ((blocks + ck - 1) // ck).clamp(min=1)
    chunk_end = chunks.cumsum(0).to(torch.int32)
    slots = torch.where(chunks > 1, chunks, 0)
    slot_start = (slots.cumsum(0) - slots).to(torch.int32)
    # sum(blocks) <= kb_total + E - 1 (a block cut by a boundary counts for both experts)
    chunk_bound = e + (kb_total + e) // ck
    slot_bound = max(1, 2 * (kb_total + e) // ck)
    p = torch.empty(slot_bound, m, n, dtype=torch.float32, device=a_q.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), chunk_bound)
    _kgrouped_split_kernel[grid](a_q, a_scale, b_q, b_scale, c, p, row_end, chunk_end, slot_start, e, m, n, ck,
                                 a_q.stride(0), a_q.stride(1), a_scale.stride(0), a_scale.stride(1), b_q.stride(0),
                                 b_q.stride(1), b_scale.stride(0), b_scale.stride(1), c.stride(0), c.stride(1),
                                 c.stride(2), p.stride(0), p.stride(1), p.stride(2), BLOCK_M=cfg.block_m,
                                 BLOCK_N=cfg.block_n, BLOCK_K=TILE, BLOCK_E=triton.next_power_of_2(e),
                                 RNE_BF16=_rne(c), INTERP=_interpreted(), num_warps=cfg.num_warps,
                                 num_stages=cfg.num_stages)
    _splitk_reduce_kernel[(triton.cdiv(m * n, REDUCE_BLOCK), e)](p, c, chunk_end, slot_start, m * n, 0, p.stride(0),
                                                                 c.stride(0), GROUPED=True, BLOCK=REDUCE_BLOCK,
                                                                 RNE_BF16=_rne(c), num_warps=4)
    return c


def fp8_quantize(x: torch.Tensor, tile: str = "1x128") -> tuple[torch.Tensor, torch.Tensor]:
    """The op (`openseek_hal.ops.fp8.fp8_quantize`): a 2-d ``x``."""
    if x.dim() != 2:
        raise ValueError(f"fp8_quantize takes a 2-d tensor, got shape {tuple(x.shape)}")
    return quantize(x, tile)


# -- autograd layers ------------------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> torch.dtype:
    if dtype not in (torch.bfloat16, torch.float32, torch.float16):
        raise ValueError(f"fp8 layers run in bfloat16, float16 or float32, got {dtype}")
    return dtype


def _weight_quant(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                 torch.Tensor | None]:
    """W per 128x128 for the forward, and W^T's blocks for dx when the path computes them at once (cached)."""
    if PATHS["weight_cache"]:
        return cached_weight(weight)
    wq, ws = quantize(weight, "128x128")
    return wq, ws, None, None


def _act_quant(x: torch.Tensor, rows: bool, tokens: bool) -> tuple[torch.Tensor | None, ...]:
    """``x[T, K]``'s 1x128 quantization along K (``rows``) and along the tokens (``tokens``, of x^T)."""
    if rows and tokens and PATHS["fused_quant"]:
        return quantize_dual(x)
    q, s = quantize(x, "1x128") if rows else (None, None)
    qt, st = quantize(x.t(), "1x128") if tokens else (None, None)
    return q, s, qt, st


def _weight_t_quant(weight: torch.Tensor, wtq: torch.Tensor | None, wts: torch.Tensor | None):
    if wtq is not None:
        return wtq, wts
    return quantize(weight.transpose(-1, -2), "128x128")  # W^T's 128x128 blocks: W's, transposed


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, gemm):
        x2 = x.reshape(-1, x.shape[-1])
        # the weight gradient reads x along the tokens: keep it quantized that way (fp8, not x itself)
        xq, xs, xtq, xts = _act_quant(x2, True, weight.requires_grad)
        wq, ws, wtq, wts = _weight_quant(weight)
        y = gemm(xq, xs, wq, ws, _dtype_name(x.dtype))
        ctx.save_for_backward(xtq, xts, weight, wtq, wts)
        ctx.x_shape, ctx.x_dtype, ctx.gemm = x.shape, x.dtype, gemm
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        xtq, xts, weight, wtq, wts = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = None
        dyq, dys, dytq, dyts = _act_quant(dy2, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        if ctx.needs_input_grad[0]:
            wtq, wts = _weight_t_quant(weight, wtq, wts)
            dx = ctx.gemm(dyq, dys, wtq, wts, ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dw = ctx.gemm(dytq, dyts, xtq, xts, weight.dtype)
        return dx, dw, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, gemm: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """``x[..., K] @ weight[N, K]^T`` through fp8 forward and backward (see `openseek_hal.ops.fp8`).

    ``gemm``: the block-scaled GEMM of all three products, with `fp8_gemm`'s signature and contract
    (default: this module's Triton kernel; the ``cuda`` backend passes its per-shape choice between
    that kernel and cuBLAS's)."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    return _FP8Linear.apply(x, weight, gemm or fp8_gemm)


class _FP8GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, counts):
        xq, xs, xtq, xts = _act_quant(x, True, weight.requires_grad)
        wq, ws, wtq, wts = _weight_quant(weight)
        y = fp8_grouped_gemm(xq, xs, wq, ws, counts, _dtype_name(x.dtype))
        ctx.save_for_backward(xtq, xts, weight, counts, wtq, wts)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        xtq, xts, weight, counts, wtq, wts = ctx.saved_tensors
        dx = dw = None
        dyq, dys, dytq, dyts = _act_quant(dy, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        if ctx.needs_input_grad[0]:
            wtq, wts = _weight_t_quant(weight, wtq, wts)
            dx = fp8_grouped_gemm(dyq, dys, wtq, wts, counts, ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dw = fp8_kgrouped_gemm(dytq, dyts, xtq, xts, counts, weight.dtype)
        return dx, dw, None


def fp8_grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """`grouped_linear` through fp8 forward and backward; no host sync."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    return _FP8GroupedLinear.apply(x, weight, counts)
