"""Triton causal flash attention for MLA (query/key head dim != value head dim), forward and backward.

``causal_attention(q[B,H,S,Dqk], k[B,H,S,Dqk], v[B,H,S,Dv], scale=None, cu_seqlens=None)``:

* Forward: one program per (query block, batch x head); an online softmax over the key blocks up to
  the diagonal (blocks wholly below it without a causal mask, the diagonal ones with it), so no
  ``S x S`` matrix is ever made. It saves the log-sum-exp per row (in log2 units) for the backward.
* Backward, three kernels and no atomics (so bitwise reproducible): ``D = rowsum(dO * O)``; then one
  program per key block walks the query blocks at and below the diagonal and writes dK and dV; then
  one program per query block walks the key blocks and writes dQ. P is recomputed blockwise from the
  saved log-sum-exp in both.
* Head dims: the query/key dim is split into two power-of-two parts (192 = 128 + 64, 24 = 16 + 16
  with 8 masked off), so MLA's 192 costs no padding to 256; the value dim is padded to a power of two
  (at least 16, the smallest ``tl.dot`` operand). Both are masked on every load and store.
* Dtypes: bf16/fp16/fp32 inputs, fp32 accumulation (fp32 inputs: ``tl.dot`` in full ``ieee`` fp32,
  never tf32; bf16/fp16: P and dS are rounded to the input dtype before their matmuls, as every
  flash kernel does). float64 inputs run the float64 reference (a torch ``S x S`` computation): no
  chip trains in float64, and it keeps float64 conformance exact.
* Layout: any strides with a unit last-dim stride (the model passes ``(B,H,S,D)`` views of
  ``(B,S,H,D)`` projections; other tensors are copied once). Outputs and gradients come back in
  the layout of the corresponding input's ``(B,H,S)`` dims (a ``(B,S,H,D)`` input gets a
  ``(B,S,H,D)``-backed result).
* ``cu_seqlens``: int32/int64 ``[n_docs + 1]`` boundaries over the *flattened* ``B*S`` tokens
  (``0 = cu[0] <= cu[1] <= ... <= cu[-1] = B*S``, flash-attn's varlen convention; with ``B = 1``
  exactly its packed layout; a document that straddles two rows is cut at the row end). A token
  attends to the earlier tokens of its own document only. The kernels get per token the start (and,
  for dK/dV, the end) of its document within its row, computed on the device from ``cu_seqlens``
  (no host sync, so the values are not checked here; the reference checks them), and skip the key
  blocks before the document of a query block.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


# -- forward ------------------------------------------------------------------------------------------

# INTERP_BF16 is set only for bfloat16 inputs under Triton's interpreter (Triton 3.9), which has two
# bfloat16 bugs: its tl.dot multiplies bf16 operands as their raw 16-bit integers (numpy has no
# bfloat16), and its fp32 -> bf16 cast truncates where the GPU rounds to nearest even (a bias that
# the rounded P and dS of a flash backward sum up). With the flag the kernels do what the GPU does:
# the same bf16 products in float32 (exact), accumulated in fp32, and round-to-nearest-even casts.
# On a GPU the flag is off and the code is the plain tl.dot / .to().

@triton.jit
def _cast(x, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
    if INTERP_BF16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)  # now exactly a bf16 value: the truncating cast is exact
    return x.to(dtype)


@triton.jit
def _mm(a, b, PREC: tl.constexpr, INTERP_BF16: tl.constexpr):
    if INTERP_BF16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _fwd_block(acc, l_i, m_i, q_a, q_b, K, V, SEG_ROW, rows, start_n, qk_scale, stride_ks, stride_vs, S, D_QK, D_V,
               CAUSAL: tl.constexpr, VARLEN: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, DVB: tl.constexpr,
               BLOCK_N: tl.constexpr, PREC: tl.constexpr, INTERP_BF16: tl.constexpr):
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < S
    offs_a = tl.arange(0, DA)
    # K^T: [DA, BLOCK_N]
    kt_a = tl.load(K + cols[None, :] * stride_ks + offs_a[:, None], mask=col_ok[None, :] & (offs_a[:, None] < D_QK),
                   other=0.0)
    qk = _mm(q_a, kt_a, PREC, INTERP_BF16)
    if DB > 0:
        offs_b = DA + tl.arange(0, DB)
        kt_b = tl.load(K + cols[None, :] * stride_ks + offs_b[:, None],
                       mask=col_ok[None, :] & (offs_b[:, None] < D_QK), other=0.0)
        qk += _mm(q_b, kt_b, PREC, INTERP_BF16)
    qk = qk * qk_scale
    if CAUSAL:
        keep = (cols[None, :] <= rows[:, None]) & col_ok[None, :]
        if VARLEN:
            keep = keep & (cols[None, :] >= SEG_ROW[:, None])
        qk = tl.where(keep, qk, float("-inf"))
    elif VARLEN:
        qk = tl.where(cols[None, :] >= SEG_ROW[:, None], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # a row with every key so far masked keeps m = -inf: subtract 0 there (exp2(-inf) = 0, no NaN)
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    offs_v = tl.arange(0, DVB)
    v = tl.load(V + cols[:, None] * stride_vs + offs_v[None, :], mask=col_ok[:, None] & (offs_v[None, :] < D_V),
                other=0.0)
    acc = acc * alpha[:, None] + _mm(_cast(p, v.dtype, INTERP_BF16), v, PREC, INTERP_BF16)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd(Q, K, V, OUT, LSE, SEG, qk_scale,
              stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
              stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
              H, S, D_QK, D_V, N_BLOCKS,
              VARLEN: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, DVB: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, INTERP_BF16: tl.constexpr):
    # the longest rows first (causal: the last query block sees every key), so the short ones fill the tail
    start_m = (N_BLOCKS - 1 - tl.program_id(0)) * BLOCK_M  # N_BLOCKS = the grid's first dim
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    OUT += b * stride_ob + h * stride_oh
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < S
    offs_a = tl.arange(0, DA)
    q_a = tl.load(Q + rows[:, None] * stride_qs + offs_a[None, :], mask=row_ok[:, None] & (offs_a[None, :] < D_QK),
                  other=0.0)
    if DB > 0:
        offs_b = DA + tl.arange(0, DB)
        q_b = tl.load(Q + rows[:, None] * stride_qs + offs_b[None, :],
                      mask=row_ok[:, None] & (offs_b[None, :] < D_QK), other=0.0)
    else:
        q_b = q_a
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DVB], tl.float32)
    lo = 0
    seg_row = rows
    if VARLEN:
        seg_row = tl.load(SEG + b * S + rows, mask=row_ok, other=S)
        lo = (tl.load(SEG + b * S + start_m) // BLOCK_N) * BLOCK_N  # the block's first document start
    # key blocks wholly left of the block's first row: no causal mask (BLOCK_M is a multiple of BLOCK_N)
    for start_n in range(lo, start_m, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q_a, q_b, K, V, seg_row, rows, start_n, qk_scale, stride_ks,
                                   stride_vs, S, D_QK, D_V, False, VARLEN, DA, DB, DVB, BLOCK_N, PREC, INTERP_BF16)
    # the diagonal blocks, masked
    for start_n in range(tl.maximum(lo, start_m), tl.minimum(start_m + BLOCK_M, S), BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q_a, q_b, K, V, seg_row, rows, start_n, qk_scale, stride_ks,
                                   stride_vs, S, D_QK, D_V, True, VARLEN, DA, DB, DVB, BLOCK_N, PREC, INTERP_BF16)
    o = acc / l_i[:, None]
    offs_v = tl.arange(0, DVB)
    tl.store(OUT + rows[:, None] * stride_os + offs_v[None, :], _cast(o, OUT.dtype.element_ty, INTERP_BF16),
             mask=row_ok[:, None] & (offs_v[None, :] < D_V))
    tl.store(LSE + bh * S + rows, m_i + tl.math.log2(l_i), mask=row_ok)


# -- backward -----------------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_pre(OUT, DO, DELTA, stride_ob, stride_oh, stride_os, stride_db, stride_dh, stride_ds, H, S, D_V,
                  DVB: tl.constexpr, BLOCK_M: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = tl.arange(0, DVB)
    mask = (rows[:, None] < S) & (offs_v[None, :] < D_V)
    o = tl.load(OUT + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + offs_v[None, :], mask=mask,
                other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_db + h * stride_dh + rows[:, None] * stride_ds + offs_v[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    tl.store(DELTA + bh * S + rows, tl.sum(o * do, 1), mask=rows < S)


@triton.jit
def _dkdv_block(dk_a, dk_b, dv, k_a, k_b, v, Q, DO, LSE, DELTA, SEG, cols, start_m, qk_scale, stride_qs, stride_ds,
                S, D_QK, D_V, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
                DVB: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr, INTERP_BF16: tl.constexpr):
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < S
    offs_a = tl.arange(0, DA)
    offs_v = tl.arange(0, DVB)
    # Q^T: [DA, BLOCK_M]; rows past S load as zeros and contribute nothing
    qt_a = tl.load(Q + rows[None, :] * stride_qs + offs_a[:, None], mask=row_ok[None, :] & (offs_a[:, None] < D_QK),
                   other=0.0)
    qkt = _mm(k_a, qt_a, PREC, INTERP_BF16)
    if DB > 0:
        offs_b = DA + tl.arange(0, DB)
        qt_b = tl.load(Q + rows[None, :] * stride_qs + offs_b[:, None],
                       mask=row_ok[None, :] & (offs_b[:, None] < D_QK), other=0.0)
        qkt += _mm(k_b, qt_b, PREC, INTERP_BF16)
    else:
        qt_b = qt_a
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    pt = tl.math.exp2(qkt * qk_scale - lse[None, :])  # [BLOCK_N, BLOCK_M]
    keep = row_ok[None, :]
    if CAUSAL:
        keep = keep & (rows[None, :] >= cols[:, None])
    if VARLEN:
        seg = tl.load(SEG + rows, mask=row_ok, other=S)
        keep = keep & (seg[None, :] <= cols[:, None])
    pt = tl.where(keep, pt, 0.0)
    do = tl.load(DO + rows[:, None] * stride_ds + offs_v[None, :], mask=row_ok[:, None] & (offs_v[None, :] < D_V),
                 other=0.0)
    dv += _mm(_cast(pt, do.dtype, INTERP_BF16), do, PREC, INTERP_BF16)
    delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
    dpt = _mm(v, tl.trans(do), PREC, INTERP_BF16)
    dst = _cast(pt * (dpt - delta[None, :]), qt_a.dtype, INTERP_BF16)
    dk_a += _mm(dst, tl.trans(qt_a), PREC, INTERP_BF16)
    if DB > 0:
        dk_b += _mm(dst, tl.trans(qt_b), PREC, INTERP_BF16)
    return dk_a, dk_b, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, SEG, SEG_END, DK, DV, qk_scale, sm_scale,
                   stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                   stride_vb, stride_vh, stride_vs, stride_db, stride_dh, stride_ds,
                   stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
                   H, S, D_QK, D_V,
                   VARLEN: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, DVB: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, INTERP_BF16: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_db + h * stride_dh
    LSE += bh * S
    DELTA += bh * S
    SEG += b * S
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < S
    offs_a = tl.arange(0, DA)
    offs_v = tl.arange(0, DVB)
    k_a = tl.load(K + cols[:, None] * stride_ks + offs_a[None, :], mask=col_ok[:, None] & (offs_a[None, :] < D_QK),
                  other=0.0)
    dk_a = tl.zeros([BLOCK_N, DA], tl.float32)
    if DB > 0:
        offs_b = DA + tl.arange(0, DB)
        k_b = tl.load(K + cols[:, None] * stride_ks + offs_b[None, :],
                      mask=col_ok[:, None] & (offs_b[None, :] < D_QK), other=0.0)
        dk_b = tl.zeros([BLOCK_N, DB], tl.float32)
    else:
        k_b = k_a
        dk_b = dk_a
    v = tl.load(V + cols[:, None] * stride_vs + offs_v[None, :], mask=col_ok[:, None] & (offs_v[None, :] < D_V),
                other=0.0)
    dv = tl.zeros([BLOCK_N, DVB], tl.float32)
    hi = S
    if VARLEN:  # the queries that see this block end with the document of its last key
        hi = tl.load(SEG_END + b * S + tl.minimum(start_n + BLOCK_N, S) - 1)
    # the diagonal query blocks (BLOCK_N is a multiple of BLOCK_M), then the ones wholly below it
    for start_m in range(start_n, tl.minimum(start_n + BLOCK_N, hi), BLOCK_M):
        dk_a, dk_b, dv = _dkdv_block(dk_a, dk_b, dv, k_a, k_b, v, Q, DO, LSE, DELTA, SEG, cols, start_m, qk_scale,
                                     stride_qs, stride_ds, S, D_QK, D_V, True, VARLEN, DA, DB, DVB, BLOCK_M, PREC,
                                     INTERP_BF16)
    for start_m in range(start_n + BLOCK_N, hi, BLOCK_M):
        dk_a, dk_b, dv = _dkdv_block(dk_a, dk_b, dv, k_a, k_b, v, Q, DO, LSE, DELTA, SEG, cols, start_m, qk_scale,
                                     stride_qs, stride_ds, S, D_QK, D_V, False, VARLEN, DA, DB, DVB, BLOCK_M, PREC,
                                     INTERP_BF16)
    DK += b * stride_dkb + h * stride_dkh
    DV += b * stride_dvb + h * stride_dvh
    tl.store(DV + cols[:, None] * stride_dvs + offs_v[None, :], _cast(dv, DV.dtype.element_ty, INTERP_BF16),
             mask=col_ok[:, None] & (offs_v[None, :] < D_V))
    tl.store(DK + cols[:, None] * stride_dks + offs_a[None, :],
                 _cast(dk_a * sm_scale, DK.dtype.element_ty, INTERP_BF16),
             mask=col_ok[:, None] & (offs_a[None, :] < D_QK))
    if DB > 0:
        offs_b = DA + tl.arange(0, DB)
        tl.store(DK + cols[:, None] * stride_dks + offs_b[None, :],
                 _cast(dk_b * sm_scale, DK.dtype.element_ty, INTERP_BF16),
                 mask=col_ok[:, None] & (offs_b[None, :] < D_QK))


@triton.jit
def _dq_block(dq_a, dq_b, q_a, q_b, do, lse, delta, K, V, SEG_ROW, rows, start_n, qk_scale, stride_ks, stride_vs,
              S, D_QK, D_V, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
              DVB: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, INTERP_BF16: tl.constexpr):
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < S
    offs_a = tl.arange(0, DA)
    offs_v = tl.arange(0, DVB)
    k_a = tl.load(K + cols[:, None] * stride_ks + offs_a[None, :], mask=col_ok[:, None] & (offs_a[None, :] < D_QK),
                  other=0.0)
    qk = _mm(q_a, tl.trans(k_a), PREC, INTERP_BF16)
    if DB > 0:
        offs_b = DA + tl.arange(0, DB)
        k_b = tl.load(K + cols[:, None] * stride_ks + offs_b[None, :],
                      mask=col_ok[:, None] & (offs_b[None, :] < D_QK), other=0.0)
        qk += _mm(q_b, tl.trans(k_b), PREC, INTERP_BF16)
    else:
        k_b = k_a
    p = tl.math.exp2(qk * qk_scale - lse[:, None])
    if CAUSAL:
        keep = (cols[None, :] <= rows[:, None]) & col_ok[None, :]
        if VARLEN:
            keep = keep & (cols[None, :] >= SEG_ROW[:, None])
        p = tl.where(keep, p, 0.0)
    elif VARLEN:
        p = tl.where(cols[None, :] >= SEG_ROW[:, None], p, 0.0)
    vt = tl.load(V + cols[None, :] * stride_vs + offs_v[:, None], mask=col_ok[None, :] & (offs_v[:, None] < D_V),
                 other=0.0)
    dp = _mm(do, vt, PREC, INTERP_BF16)
    ds = _cast(p * (dp - delta[:, None]), k_a.dtype, INTERP_BF16)
    dq_a += _mm(ds, k_a, PREC, INTERP_BF16)
    if DB > 0:
        dq_b += _mm(ds, k_b, PREC, INTERP_BF16)
    return dq_a, dq_b


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, SEG, DQ, qk_scale, sm_scale,
                 stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                 stride_vb, stride_vh, stride_vs, stride_db, stride_dh, stride_ds,
                 stride_dqb, stride_dqh, stride_dqs,
                 H, S, D_QK, D_V, N_BLOCKS,
                 VARLEN: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, DVB: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, INTERP_BF16: tl.constexpr):
    # the longest rows first (causal: the last query block sees every key), so the short ones fill the tail
    start_m = (N_BLOCKS - 1 - tl.program_id(0)) * BLOCK_M  # N_BLOCKS = the grid's first dim
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_db + h * stride_dh
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < S
    offs_a = tl.arange(0, DA)
    offs_v = tl.arange(0, DVB)
    q_a = tl.load(Q + rows[:, None] * stride_qs + offs_a[None, :], mask=row_ok[:, None] & (offs_a[None, :] < D_QK),
                  other=0.0)
    dq_a = tl.zeros([BLOCK_M, DA], tl.float32)
    if DB > 0:
        offs_b = DA + tl.arange(0, DB)
        q_b = tl.load(Q + rows[:, None] * stride_qs + offs_b[None, :],
                      mask=row_ok[:, None] & (offs_b[None, :] < D_QK), other=0.0)
        dq_b = tl.zeros([BLOCK_M, DB], tl.float32)
    else:
        q_b = q_a
        dq_b = dq_a
    do = tl.load(DO + rows[:, None] * stride_ds + offs_v[None, :], mask=row_ok[:, None] & (offs_v[None, :] < D_V),
                 other=0.0)
    lse = tl.load(LSE + bh * S + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * S + rows, mask=row_ok, other=0.0)
    lo = 0
    seg_row = rows
    if VARLEN:
        seg_row = tl.load(SEG + b * S + rows, mask=row_ok, other=S)
        lo = (tl.load(SEG + b * S + start_m) // BLOCK_N) * BLOCK_N
    for start_n in range(lo, start_m, BLOCK_N):
        dq_a, dq_b = _dq_block(dq_a, dq_b, q_a, q_b, do, lse, delta, K, V, seg_row, rows, start_n, qk_scale,
                               stride_ks, stride_vs, S, D_QK, D_V, False, VARLEN, DA, DB, DVB, BLOCK_N, PREC,
                               INTERP_BF16)
    for start_n in range(tl.maximum(lo, start_m), tl.minimum(start_m + BLOCK_M, S), BLOCK_N):
        dq_a, dq_b = _dq_block(dq_a, dq_b, q_a, q_b, do, lse, delta, K, V, seg_row, rows, start_n, qk_scale,
                               stride_ks, stride_vs, S, D_QK, D_V, True, VARLEN, DA, DB, DVB, BLOCK_N, PREC,
                               INTERP_BF16)
    DQ += b * stride_dqb + h * stride_dqh
    tl.store(DQ + rows[:, None] * stride_dqs + offs_a[None, :],
                 _cast(dq_a * sm_scale, DQ.dtype.element_ty, INTERP_BF16),
             mask=row_ok[:, None] & (offs_a[None, :] < D_QK))
    if DB > 0:
        offs_b = DA + tl.arange(0, DB)
        tl.store(DQ + rows[:, None] * stride_dqs + offs_b[None, :],
                 _cast(dq_b * sm_scale, DQ.dtype.element_ty, INTERP_BF16),
                 mask=row_ok[:, None] & (offs_b[None, :] < D_QK))


# -- launchers ----------------------------------------------------------------------------------------

def split_head_dim(d: int) -> tuple[int, int]:
    """``(DA, DB)``: ``d`` covered by a power-of-two part and a second one (0: none), each >= 16.

    192 -> (128, 64); 128 -> (128, 0); 24 -> (16, 16); 8 -> (16, 0); 320 -> (256, 64)."""
    if d <= 16:
        return 16, 0
    a = 1 << (d.bit_length() - 1)  # largest power of two <= d
    if a == d:
        return a, 0
    return a, max(16, triton.next_power_of_2(d - a))


def _config(dqk: int, dv: int, interpreted: bool, fp32: bool = False) -> dict[str, int]:
    """Tile sizes, warps and pipeline stages per kernel (``fwd_*``: forward, ``kv_*``: dK/dV, ``dq_*``: dQ).

    GPU: chosen for sm_90 by compiling every candidate with Triton 3.9 for an H100 target without a GPU
    and reading the cubins' register and spill counts (``cuobjdump --dump-resource-usage``): the largest
    tiles that do not spill, or spill least (MLA's 192-wide dK/dV spills a few bytes in every tiling
    tried). Not yet timed on a GPU: see docs/ops.md. float32 (``ieee`` dots run on the CUDA cores, not
    the tensor cores: for checks, not for speed) needs small tiles, or the forward alone would ask for
    290 KiB of shared memory. Interpreter: small tiles, so that the short test sequences still cross
    several blocks (and BLOCK_M != BLOCK_N)."""
    if interpreted or fp32:
        warps, stages = (1, 1) if interpreted else (4, 2)
        return dict(fwd_m=32, fwd_n=16, fwd_warps=warps, fwd_stages=stages, kv_n=32, kv_m=16, kv_warps=warps,
                    kv_stages=stages, dq_m=32, dq_n=16, dq_warps=warps, dq_stages=stages)
    widest = max(dqk, dv)
    fwd = dict(fwd_m=128, fwd_n=64, fwd_warps=8, fwd_stages=3)
    if widest > 128:  # MLA 192/128: dK/dV spills 16 bytes at 32x32 (272 at 64x32); dQ none at 64x16
        return dict(fwd, kv_n=32, kv_m=32, kv_warps=8, kv_stages=2, dq_m=64, dq_n=16, dq_warps=8, dq_stages=2)
    if widest > 64:
        return dict(fwd, kv_n=64, kv_m=32, kv_warps=8, kv_stages=2, dq_m=64, dq_n=32, dq_warps=8, dq_stages=2)
    return dict(fwd, kv_n=128, kv_m=32, kv_warps=8, kv_stages=2, dq_m=128, dq_n=32, dq_warps=8, dq_stages=2)


def _interpreted() -> bool:
    """Whether this module's kernels are Triton-interpreter ones (the ``triton-interpret`` copy)."""
    from triton.runtime.jit import JITFunction

    return not isinstance(_attn_fwd, JITFunction)


def _dot_options(q: torch.Tensor) -> dict[str, object]:
    """fp32 inputs: full-precision ``tl.dot`` (never tf32); bf16 under the interpreter: see `_mm`."""
    return dict(PREC="ieee" if q.dtype == torch.float32 else "tf32",
                INTERP_BF16=_interpreted() and q.dtype == torch.bfloat16)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _like_layout(x: torch.Tensor, d: int) -> torch.Tensor:
    """An empty ``(B,H,S,d)`` tensor laid out as ``x``'s ``(B,H,S)`` dims: ``(B,S,H,d)`` storage for a
    heads-inner view, else ``(B,H,S,d)``."""
    b, h, s, _ = x.shape
    if h > 1 and s > 1 and x.stride(1) < x.stride(2):
        return torch.empty(b, s, h, d, dtype=x.dtype, device=x.device).transpose(1, 2)
    return torch.empty(b, h, s, d, dtype=x.dtype, device=x.device)


def document_bounds(cu_seqlens: torch.Tensor, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token of each row, the start and the end (exclusive) of its document within the row, as
    int32 ``[batch, seq]``, from boundaries ``cu_seqlens`` over the flattened ``batch * seq`` tokens.
    Pure device ops (no host sync)."""
    cu = cu_seqlens.to(torch.int64).contiguous()
    flat = torch.arange(batch * seq, device=cu.device, dtype=torch.int64)
    doc = torch.searchsorted(cu, flat, right=True) - 1
    doc = doc.clamp(0, max(cu.numel() - 2, 0))
    row_start = (flat // max(seq, 1)) * seq
    start = torch.maximum(cu[doc], row_start) - row_start
    end = torch.minimum(cu[(doc + 1).clamp(max=cu.numel() - 1)], row_start + seq) - row_start
    return (start.clamp(0, seq).to(torch.int32).view(batch, seq).contiguous(),
            end.clamp(0, seq).to(torch.int32).view(batch, seq).contiguous())


def _forward(q, k, v, scale, seg):
    b, h, s, dqk = q.shape
    dv = v.shape[-1]
    o = _like_layout(q, dv)
    lse = torch.empty(b * h, s, dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    da, db = split_head_dim(dqk)
    dvb = max(16, triton.next_power_of_2(dv))
    cfg, prec = _config(dqk, dv, _interpreted(), q.dtype == torch.float32), _dot_options(q)
    grid = (triton.cdiv(s, cfg["fwd_m"]), b * h)
    _attn_fwd[grid](q, k, v, o, lse, seg if seg is not None else lse, scale * LOG2E,
                    *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], h, s, dqk, dv, grid[0],
                    VARLEN=seg is not None, DA=da, DB=db, DVB=dvb, BLOCK_M=cfg["fwd_m"], BLOCK_N=cfg["fwd_n"],
                    **prec, num_warps=cfg["fwd_warps"], num_stages=cfg["fwd_stages"])
    return o, lse


def _backward(do, q, k, v, o, lse, scale, seg, seg_end):
    b, h, s, dqk = q.shape
    dv_dim = v.shape[-1]
    dq, dk, dv = _like_layout(q, dqk), _like_layout(k, dqk), _like_layout(v, dv_dim)
    if b * h * s == 0:
        return dq, dk, dv
    do = _unit_last(do)
    da, db = split_head_dim(dqk)
    dvb = max(16, triton.next_power_of_2(dv_dim))
    cfg, prec = _config(dqk, dv_dim, _interpreted(), q.dtype == torch.float32), _dot_options(q)
    delta = torch.empty(b * h, s, dtype=torch.float32, device=q.device)
    _attn_bwd_pre[(triton.cdiv(s, 64), b * h)](o, do, delta, *o.stride()[:3], *do.stride()[:3], h, s, dv_dim,
                                                DVB=dvb, BLOCK_M=64)
    varlen = seg is not None
    seg_arg = seg if varlen else lse
    common = dict(VARLEN=varlen, DA=da, DB=db, DVB=dvb, **prec)
    _attn_bwd_dkdv[(triton.cdiv(s, cfg["kv_n"]), b * h)](
        q, k, v, do, lse, delta, seg_arg, seg_end if varlen else lse, dk, dv, scale * LOG2E, scale,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        h, s, dqk, dv_dim, BLOCK_M=cfg["kv_m"], BLOCK_N=cfg["kv_n"], num_warps=cfg["kv_warps"],
        num_stages=cfg["kv_stages"], **common)
    dq_blocks = triton.cdiv(s, cfg["dq_m"])
    _attn_bwd_dq[(dq_blocks, b * h)](
        q, k, v, do, lse, delta, seg_arg, dq, scale * LOG2E, scale,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
        h, s, dqk, dv_dim, dq_blocks, BLOCK_M=cfg["dq_m"], BLOCK_N=cfg["dq_n"], num_warps=cfg["dq_warps"],
        num_stages=cfg["dq_stages"], **common)
    return dq, dk, dv


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, cu_seqlens):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        b, _, s, _ = q.shape
        seg = seg_end = None
        if cu_seqlens is not None:
            seg, seg_end = document_bounds(cu_seqlens.to(q.device, non_blocking=True), b, s)
        o, lse = _forward(q, k, v, scale, seg)
        ctx.save_for_backward(q, k, v, o, lse, seg, seg_end)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, seg, seg_end = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.scale, seg, seg_end)
        return dq, dk, dv, None, None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Flash attention with the `openseek_hal.ops.attention.causal_attention` contract (see the module doc)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"causal_attention takes (batch, heads, seq, dim) tensors, got {q.dim()}/{k.dim()}/{v.dim()} "
                         "dims")
    if q.shape[:3] != k.shape[:3] or q.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"causal_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match "
                         "(this kernel needs the same batch, heads and sequence for all three)")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if q.dtype == torch.float64:
        from ..attention import causal_attention as reference

        return reference(q, k, v, scale, cu_seqlens)
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"causal_attention kernel: q/k/v must share one of float32/bfloat16/float16, got "
                        f"{q.dtype}/{k.dtype}/{v.dtype}")
    if max(q.shape[-1], v.shape[-1]) > 256:
        raise ValueError(f"causal_attention kernel: head dims up to 256, got {q.shape[-1]}/{v.shape[-1]}")
    if cu_seqlens is not None and (cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point()):
        raise ValueError("cu_seqlens must be a 1-d integer tensor of document boundaries")
    return FlashAttention.apply(q, k, v, scale, cu_seqlens)
