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
* ``torch.compile``: forward and backward are ``torch.library`` custom ops (`flash_attention_fwd`,
  `flash_attention_bwd`) with fake implementations and an autograd rule, so ``fullgraph=True`` traces
  a call without entering the launch code; the launch config reaches both as plain ints (see
  `use_config`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


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


# -- tile helpers -------------------------------------------------------------------------------------
# Every (rows x head-dim) tile of every kernel goes through these, so the masks are written once: rows
# at or past S read as 0 (MASK_ROWS, off when S is a multiple of every block of the launch) and
# head-dim columns at or past D read as 0 (MASK_D, off when the power-of-two parts cover D exactly:
# MLA's 192 = 128 + 64 and v's 128 need no column mask). Both flags are constexpr, so a launch with
# neither has plain unmasked loads.

@triton.jit
def _load_tile(ptr, rows, S, stride, D0: tl.constexpr, DW: tl.constexpr, D, MASK_ROWS: tl.constexpr,
               MASK_D: tl.constexpr, TRANS: tl.constexpr):
    """Columns ``D0 .. D0 + DW`` of the rows ``rows`` (row stride ``stride``, unit column stride): a
    ``[len(rows), DW]`` tile, or ``[DW, len(rows)]`` with TRANS."""
    offs = D0 + tl.arange(0, DW)
    if TRANS:
        ptrs = ptr + rows[None, :] * stride + offs[:, None]
        row_mask = rows[None, :] < S
        d_mask = offs[:, None] < D
    else:
        ptrs = ptr + rows[:, None] * stride + offs[None, :]
        row_mask = rows[:, None] < S
        d_mask = offs[None, :] < D
    if MASK_ROWS:
        if MASK_D:
            x = tl.load(ptrs, mask=row_mask & d_mask, other=0.0)
        else:
            x = tl.load(ptrs, mask=row_mask, other=0.0)
    elif MASK_D:
        x = tl.load(ptrs, mask=d_mask, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _load_split(ptr, rows, S, stride, D, DA: tl.constexpr, DB: tl.constexpr, MASK_ROWS: tl.constexpr,
                MASK_D: tl.constexpr, TRANS: tl.constexpr):
    """A query/key tile in its two power-of-two head-dim parts ``[0, DA)`` and ``[DA, DA + DB)``
    (the second is the first again when DB = 0, and then unused)."""
    a = _load_tile(ptr, rows, S, stride, 0, DA, D, MASK_ROWS, MASK_D, TRANS)
    if DB > 0:
        b = _load_tile(ptr, rows, S, stride, DA, DB, D, MASK_ROWS, MASK_D, TRANS)
    else:
        b = a
    return a, b


@triton.jit
def _store_tile(ptr, x, rows, S, stride, D0: tl.constexpr, DW: tl.constexpr, D, MASK_ROWS: tl.constexpr,
                MASK_D: tl.constexpr, INTERP_BF16: tl.constexpr):
    offs = D0 + tl.arange(0, DW)
    ptrs = ptr + rows[:, None] * stride + offs[None, :]
    x = _cast(x, ptr.dtype.element_ty, INTERP_BF16)
    if MASK_ROWS:
        if MASK_D:
            tl.store(ptrs, x, mask=(rows[:, None] < S) & (offs[None, :] < D))
        else:
            tl.store(ptrs, x, mask=rows[:, None] < S)
    elif MASK_D:
        tl.store(ptrs, x, mask=offs[None, :] < D)
    else:
        tl.store(ptrs, x)


@triton.jit
def _store_split(ptr, x_a, x_b, rows, S, stride, D, DA: tl.constexpr, DB: tl.constexpr, MASK_ROWS: tl.constexpr,
                 MASK_D: tl.constexpr, INTERP_BF16: tl.constexpr):
    _store_tile(ptr, x_a, rows, S, stride, 0, DA, D, MASK_ROWS, MASK_D, INTERP_BF16)
    if DB > 0:
        _store_tile(ptr, x_b, rows, S, stride, DA, DB, D, MASK_ROWS, MASK_D, INTERP_BF16)


@triton.jit
def _mm_split(a_a, a_b, b_a, b_b, DB: tl.constexpr, PREC: tl.constexpr, INTERP_BF16: tl.constexpr):
    """``a_a @ b_a + a_b @ b_b``: a product over the split query/key head dim."""
    acc = _mm(a_a, b_a, PREC, INTERP_BF16)
    if DB > 0:
        acc += _mm(a_b, b_b, PREC, INTERP_BF16)
    return acc


@triton.jit
def _load_vec(ptr, rows, S, other, MASK_ROWS: tl.constexpr):
    if MASK_ROWS:
        x = tl.load(ptr + rows, mask=rows < S, other=other)
    else:
        x = tl.load(ptr + rows)
    return x


# -- forward ------------------------------------------------------------------------------------------

@triton.jit
def _visible(rows, cols, SEG_ROW, S, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, MASK_ROWS: tl.constexpr):
    """``[rows, cols]``: which keys each query sees (causal: not after it, and not past S; packed: not
    before its document's start ``SEG_ROW``). For a block that needs a mask (CAUSAL or VARLEN)."""
    if CAUSAL:
        keep = cols[None, :] <= rows[:, None]
        if MASK_ROWS:
            keep = keep & (cols[None, :] < S)
        if VARLEN:
            keep = keep & (cols[None, :] >= SEG_ROW[:, None])
    else:
        keep = cols[None, :] >= SEG_ROW[:, None]
    return keep


@triton.jit
def _query_block(N_BLOCKS, H, BLOCK_M: tl.constexpr):
    """This program's first query row, its (batch x head) index, batch and head. The longest rows go first
    (causal: the last query block sees every key), so the short ones fill the tail."""
    start_m = (N_BLOCKS - 1 - tl.program_id(0)) * BLOCK_M  # N_BLOCKS = the grid's first dim
    bh = tl.program_id(1).to(tl.int64)
    return start_m, bh, bh // H, bh % H


@triton.jit
def _key_range(SEG, b, S, rows, start_m, VARLEN: tl.constexpr, BLOCK_N: tl.constexpr, MASK_ROWS: tl.constexpr):
    """For a query block: its rows' document starts (packed; else the rows, unused), the first key block any
    row sees (packed: the block's first document start, rounded down to a key block) and the first key block
    that reaches the diagonal (the ones before it need no causal mask)."""
    lo = 0
    seg_row = rows
    if VARLEN:
        seg_row = _load_vec(SEG + b * S, rows, S, S, MASK_ROWS)
        lo = (tl.load(SEG + b * S + start_m) // BLOCK_N) * BLOCK_N  # the block's first document start
    return seg_row, lo, (start_m // BLOCK_N) * BLOCK_N


@triton.jit
def _fwd_block(acc, l_i, m_i, q_a, q_b, K, V, SEG_ROW, rows, start_n, qk_scale, stride_ks, stride_vs, S, D_QK, D_V,
               CAUSAL: tl.constexpr, VARLEN: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, DVB: tl.constexpr,
               BLOCK_N: tl.constexpr, MASK_ROWS: tl.constexpr, MASK_QK: tl.constexpr, MASK_V: tl.constexpr,
               PREC: tl.constexpr, INTERP_BF16: tl.constexpr):
    cols = start_n + tl.arange(0, BLOCK_N)
    kt_a, kt_b = _load_split(K, cols, S, stride_ks, D_QK, DA, DB, MASK_ROWS, MASK_QK, True)  # K^T: [D, BLOCK_N]
    qk = _mm_split(q_a, q_b, kt_a, kt_b, DB, PREC, INTERP_BF16)
    if CAUSAL or VARLEN:
        qk = tl.where(_visible(rows, cols, SEG_ROW, S, CAUSAL, VARLEN, MASK_ROWS), qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # a row with every key so far masked keeps m = -inf: subtract 0 there (exp2(-inf) = 0, no NaN)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_sub[:, None])
    else:
        # every key visible: the row max is finite, and the scale rides in the exp2 argument's FMA
        # (max(s x) = s max(x) for the positive scale), one multiply an element fewer
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_sub = m_new
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_tile(V, cols, S, stride_vs, 0, DVB, D_V, MASK_ROWS, MASK_V, False)
    acc = acc * alpha[:, None] + _mm(_cast(p, v.dtype, INTERP_BF16), v, PREC, INTERP_BF16)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd(Q, K, V, OUT, LSE, SEG, qk_scale,
              stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
              stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
              H, S, D_QK, D_V, N_BLOCKS,
              VARLEN: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, DVB: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_ROWS: tl.constexpr, MASK_QK: tl.constexpr,
              MASK_V: tl.constexpr, PREC: tl.constexpr, INTERP_BF16: tl.constexpr):
    start_m, bh, b, h = _query_block(N_BLOCKS, H, BLOCK_M)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    OUT += b * stride_ob + h * stride_oh
    rows = start_m + tl.arange(0, BLOCK_M)
    q_a, q_b = _load_split(Q, rows, S, stride_qs, D_QK, DA, DB, MASK_ROWS, MASK_QK, False)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DVB], tl.float32)
    seg_row, lo, mid = _key_range(SEG, b, S, rows, start_m, VARLEN, BLOCK_N, MASK_ROWS)
    # key blocks wholly left of the block's first row: no causal mask
    for start_n in range(lo, mid, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q_a, q_b, K, V, seg_row, rows, start_n, qk_scale, stride_ks,
                                   stride_vs, S, D_QK, D_V, False, VARLEN, DA, DB, DVB, BLOCK_N, False, MASK_QK,
                                   MASK_V, PREC, INTERP_BF16)
    # the diagonal blocks, masked
    for start_n in range(tl.maximum(lo, mid), tl.minimum(start_m + BLOCK_M, S), BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q_a, q_b, K, V, seg_row, rows, start_n, qk_scale, stride_ks,
                                   stride_vs, S, D_QK, D_V, True, VARLEN, DA, DB, DVB, BLOCK_N, MASK_ROWS, MASK_QK,
                                   MASK_V, PREC, INTERP_BF16)
    o = acc / l_i[:, None]
    _store_tile(OUT, o, rows, S, stride_os, 0, DVB, D_V, MASK_ROWS, MASK_V, INTERP_BF16)
    lse = m_i + tl.math.log2(l_i)
    if MASK_ROWS:
        tl.store(LSE + bh * S + rows, lse, mask=rows < S)
    else:
        tl.store(LSE + bh * S + rows, lse)


# -- backward -----------------------------------------------------------------------------------------
# P is recomputed from the saved log2-sum-exp: P = exp2(q k^T * scale * log2(e) - lse). dV = P^T dO,
# dP = dO V^T, dS = P * (dP - D) with D = rowsum(dO * O), dQ = scale * dS K, dK = scale * dS^T Q. The
# scale is applied once per output tile at the store (dQ, dK), not per S tile; the log2(e) factor
# rides in the one FMA that forms the exp2 argument. Two kernels write the gradients, each owning its
# output rows (no atomics, a fixed reduction order, so bitwise reproducible): dK/dV, one program per
# key block walking the query blocks from the diagonal down, and dQ, one program per query block
# walking the key blocks up to the diagonal. Only the diagonal blocks are causally masked; with
# cu_seqlens every block is document-masked.

@triton.jit
def _attn_bwd_pre(OUT, DO, DELTA, stride_ob, stride_oh, stride_os, stride_db, stride_dh, stride_ds, H, S, D_V,
                  DVB: tl.constexpr, BLOCK_M: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _load_tile(OUT + b * stride_ob + h * stride_oh, rows, S, stride_os, 0, DVB, D_V, True, True, False)
    do = _load_tile(DO + b * stride_db + h * stride_dh, rows, S, stride_ds, 0, DVB, D_V, True, True, False)
    tl.store(DELTA + bh * S + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rows < S)


@triton.jit
def _dkdv_block(dk_a, dk_b, dv, k_a, k_b, v, Q, DO, LSE, DELTA, SEG, cols, start_m, qk_scale, stride_qs, stride_ds,
                S, D_QK, D_V, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
                DVB: tl.constexpr, BLOCK_M: tl.constexpr, MASK_ROWS: tl.constexpr, MASK_QK: tl.constexpr,
                MASK_V: tl.constexpr, PREC: tl.constexpr, INTERP_BF16: tl.constexpr):
    """One query block against the program's key block, transposed (keys on the rows): S^T = K Q^T."""
    rows = start_m + tl.arange(0, BLOCK_M)
    # Q^T: [D, BLOCK_M]; rows past S load as zeros and contribute nothing
    qt_a, qt_b = _load_split(Q, rows, S, stride_qs, D_QK, DA, DB, MASK_ROWS, MASK_QK, True)
    lse = _load_vec(LSE, rows, S, 0.0, MASK_ROWS)
    pt = tl.math.exp2(_mm_split(k_a, k_b, qt_a, qt_b, DB, PREC, INTERP_BF16) * qk_scale - lse[None, :])
    if MASK_ROWS:  # padding queries (zeros): P^T = exp2(0 - 0) = 1 there, not 0
        pt = tl.where(rows[None, :] < S, pt, 0.0)
    if CAUSAL:
        pt = tl.where(rows[None, :] >= cols[:, None], pt, 0.0)
    if VARLEN:
        pt = tl.where(_load_vec(SEG, rows, S, S, MASK_ROWS)[None, :] <= cols[:, None], pt, 0.0)
    do = _load_tile(DO, rows, S, stride_ds, 0, DVB, D_V, MASK_ROWS, MASK_V, False)
    dv += _mm(_cast(pt, do.dtype, INTERP_BF16), do, PREC, INTERP_BF16)
    delta = _load_vec(DELTA, rows, S, 0.0, MASK_ROWS)
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
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_ROWS: tl.constexpr, MASK_QK: tl.constexpr,
                   MASK_V: tl.constexpr, PREC: tl.constexpr, INTERP_BF16: tl.constexpr):
    # key block 0 first: it has the most query blocks below it, so the short ones fill the tail
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
    k_a, k_b = _load_split(K, cols, S, stride_ks, D_QK, DA, DB, MASK_ROWS, MASK_QK, False)
    v = _load_tile(V, cols, S, stride_vs, 0, DVB, D_V, MASK_ROWS, MASK_V, False)
    dk_a = tl.zeros([BLOCK_N, DA], tl.float32)
    if DB > 0:
        dk_b = tl.zeros([BLOCK_N, DB], tl.float32)
    else:
        dk_b = dk_a
    dv = tl.zeros([BLOCK_N, DVB], tl.float32)
    hi = S
    if VARLEN:  # the queries that see this block end with the document of its last key
        hi = tl.load(SEG_END + b * S + tl.minimum(start_n + BLOCK_N, S) - 1)
    # the query blocks across the diagonal, masked, then the ones wholly below it
    for start_m in range((start_n // BLOCK_M) * BLOCK_M, tl.minimum(start_n + BLOCK_N, hi), BLOCK_M):
        dk_a, dk_b, dv = _dkdv_block(dk_a, dk_b, dv, k_a, k_b, v, Q, DO, LSE, DELTA, SEG, cols, start_m, qk_scale,
                                     stride_qs, stride_ds, S, D_QK, D_V, True, VARLEN, DA, DB, DVB, BLOCK_M,
                                     MASK_ROWS, MASK_QK, MASK_V, PREC, INTERP_BF16)
    for start_m in range(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, hi, BLOCK_M):
        dk_a, dk_b, dv = _dkdv_block(dk_a, dk_b, dv, k_a, k_b, v, Q, DO, LSE, DELTA, SEG, cols, start_m, qk_scale,
                                     stride_qs, stride_ds, S, D_QK, D_V, False, VARLEN, DA, DB, DVB, BLOCK_M,
                                     MASK_ROWS, MASK_QK, MASK_V, PREC, INTERP_BF16)
    DK += b * stride_dkb + h * stride_dkh
    DV += b * stride_dvb + h * stride_dvh
    _store_tile(DV, dv, cols, S, stride_dvs, 0, DVB, D_V, MASK_ROWS, MASK_V, INTERP_BF16)
    _store_split(DK, dk_a * sm_scale, dk_b * sm_scale, cols, S, stride_dks, D_QK, DA, DB, MASK_ROWS, MASK_QK,
                 INTERP_BF16)


@triton.jit
def _dq_block(dq_a, dq_b, q_a, q_b, do, lse, delta, K, V, SEG_ROW, rows, start_n, qk_scale, stride_ks, stride_vs,
              S, D_QK, D_V, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
              DVB: tl.constexpr, BLOCK_N: tl.constexpr, MASK_ROWS: tl.constexpr, MASK_QK: tl.constexpr,
              MASK_V: tl.constexpr, PREC: tl.constexpr, INTERP_BF16: tl.constexpr):
    cols = start_n + tl.arange(0, BLOCK_N)
    k_a, k_b = _load_split(K, cols, S, stride_ks, D_QK, DA, DB, MASK_ROWS, MASK_QK, False)
    p = tl.math.exp2(_mm_split(q_a, q_b, tl.trans(k_a), tl.trans(k_b), DB, PREC, INTERP_BF16) * qk_scale
                     - lse[:, None])
    if CAUSAL or VARLEN:
        p = tl.where(_visible(rows, cols, SEG_ROW, S, CAUSAL, VARLEN, MASK_ROWS), p, 0.0)
    vt = _load_tile(V, cols, S, stride_vs, 0, DVB, D_V, MASK_ROWS, MASK_V, True)  # V^T: [DVB, BLOCK_N]
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
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_ROWS: tl.constexpr, MASK_QK: tl.constexpr,
                 MASK_V: tl.constexpr, PREC: tl.constexpr, INTERP_BF16: tl.constexpr):
    start_m, bh, b, h = _query_block(N_BLOCKS, H, BLOCK_M)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_db + h * stride_dh
    rows = start_m + tl.arange(0, BLOCK_M)
    q_a, q_b = _load_split(Q, rows, S, stride_qs, D_QK, DA, DB, MASK_ROWS, MASK_QK, False)
    do = _load_tile(DO, rows, S, stride_ds, 0, DVB, D_V, MASK_ROWS, MASK_V, False)
    lse = _load_vec(LSE + bh * S, rows, S, 0.0, MASK_ROWS)
    delta = _load_vec(DELTA + bh * S, rows, S, 0.0, MASK_ROWS)
    dq_a = tl.zeros([BLOCK_M, DA], tl.float32)
    if DB > 0:
        dq_b = tl.zeros([BLOCK_M, DB], tl.float32)
    else:
        dq_b = dq_a
    seg_row, lo, mid = _key_range(SEG, b, S, rows, start_m, VARLEN, BLOCK_N, MASK_ROWS)
    # key blocks wholly left of the block's first row, unmasked, then the ones across the diagonal
    for start_n in range(lo, mid, BLOCK_N):
        dq_a, dq_b = _dq_block(dq_a, dq_b, q_a, q_b, do, lse, delta, K, V, seg_row, rows, start_n, qk_scale,
                               stride_ks, stride_vs, S, D_QK, D_V, False, VARLEN, DA, DB, DVB, BLOCK_N, False,
                               MASK_QK, MASK_V, PREC, INTERP_BF16)
    for start_n in range(tl.maximum(lo, mid), tl.minimum(start_m + BLOCK_M, S), BLOCK_N):
        dq_a, dq_b = _dq_block(dq_a, dq_b, q_a, q_b, do, lse, delta, K, V, seg_row, rows, start_n, qk_scale,
                               stride_ks, stride_vs, S, D_QK, D_V, True, VARLEN, DA, DB, DVB, BLOCK_N, MASK_ROWS,
                               MASK_QK, MASK_V, PREC, INTERP_BF16)
    DQ += b * stride_dqb + h * stride_dqh
    _store_split(DQ, dq_a * sm_scale, dq_b * sm_scale, rows, S, stride_dqs, D_QK, DA, DB, MASK_ROWS, MASK_QK,
                 INTERP_BF16)


# -- launch configurations ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Tiles:
    """One kernel's launch: ``block_m`` query rows x ``block_n`` key rows per tile, warps, pipeline stages."""

    block_m: int
    block_n: int
    warps: int
    stages: int

    @property
    def name(self) -> str:
        return f"m{self.block_m}n{self.block_n}w{self.warps}s{self.stages}"


@dataclass(frozen=True)
class AttentionConfig:
    """The launches of one call: the forward and the dQ kernel (a program per ``block_m`` queries,
    stepping ``block_n`` keys) and the dK/dV kernel (a program per ``kv.block_n`` keys, stepping
    ``kv.block_m`` queries). Blocks: powers of two >= 16, in any ratio."""

    fwd: Tiles
    kv: Tiles
    dq: Tiles

    @property
    def name(self) -> str:
        return f"fwd-{self.fwd.name}_kv-{self.kv.name}_dq-{self.dq.name}"


_FWD = Tiles(128, 64, 8, 3)  # 412-426 TFLOP/s at MLA's dims on an H100 (commit 269c8886)
# sm_90 (H100/H200) bf16/fp16 candidates per kernel, in order of preference: `default_config` takes
# the first that fits the head dims (`_kv_fits`, `_dq_fits`); `benchmarks/ops/attention_bwd_sweep.py`
# times them all. Registers/spills at MLA's 192/128 (Triton 3.9 for sm_90a, `attention_sm90_resources.py
# --candidates`) in the comments; 8 warps = two warpgroups, each a 64-row wgmma slice of the tile.
KV_CANDIDATES = (
    Tiles(32, 128, 8, 3),  # 255 regs, 16 B spilled: the default at 192/128 (the Triton tutorial's tiling)
    Tiles(32, 128, 8, 2),  # 24 B spilled
    Tiles(16, 128, 8, 3),  # no spill, but n16 wgmma for S^T and dP^T
    Tiles(64, 128, 8, 2),  # 440 B spilled: wider S^T tiles than the registers hold
    Tiles(32, 64, 4, 3),   # one warpgroup, 24 B spilled
    Tiles(16, 64, 4, 3),   # one warpgroup, no spill
    Tiles(32, 64, 8, 3),   # 64 key rows on 8 warps: both warpgroups compute the same S^T, dP^T (no spill)
)
DQ_CANDIDATES = (
    # H100 sweep (benchmarks/ops/attention_bwd_sweep.py, S 4096, 10 and 128 heads): 3 stages make the
    # backward 4-8% faster than 2 (1.52 vs 1.64 ms, 4.70 vs 4.87 ms)
    Tiles(128, 64, 8, 3),  # 248 regs, no spill, 200 KiB shared memory: the default at 192/128
    Tiles(128, 64, 8, 2),  # 244 regs, no spill
    Tiles(128, 32, 8, 3),
    Tiles(128, 32, 8, 4),
    Tiles(64, 64, 4, 3),
    Tiles(64, 32, 4, 3),
)
FWD_CANDIDATES = (_FWD, Tiles(128, 128, 8, 2), Tiles(128, 64, 8, 2), Tiles(128, 64, 8, 4), Tiles(64, 64, 4, 3))
_SMEM = 200 * 1024  # of the 227 KiB a block may have on sm_90, leaving room for the compiler's own


def _widths(dqk: int, dv: int) -> tuple[int, int]:
    da, db = split_head_dim(dqk)
    return da + db, _pad_v(dv)


def _kv_fits(t: Tiles, dqk: int, dv: int) -> bool:
    """dK/dV: the fp32 dK and dV accumulators (``block_n x (Dqk + Dv)``) at most 160 registers a thread,
    the S^T and dP^T tiles at most 16 each, 16 key rows per warp (fewer: the warpgroups would compute
    the same S^T), and K, V plus ``stages`` Q and dO tiles in the shared memory (2-byte elements)."""
    wqk, wv = _widths(dqk, dv)
    threads = 32 * t.warps
    return (t.block_n * (wqk + wv) // threads <= 160 and t.block_n * t.block_m // threads <= 16
            and t.block_n >= 16 * t.warps and 2 * (wqk + wv) * (t.block_n + t.stages * t.block_m) <= _SMEM)


def _dq_fits(t: Tiles, dqk: int, dv: int) -> bool:
    """dQ: the fp32 dQ accumulator plus the S and dP tiles at most 160 registers a thread, 16 query rows
    per warp, and Q, dO plus ``stages`` K and V tiles in the shared memory."""
    wqk, wv = _widths(dqk, dv)
    threads = 32 * t.warps
    return ((t.block_m * wqk + 2 * t.block_m * t.block_n) // threads <= 160 and t.block_m >= 16 * t.warps
            and 2 * (wqk + wv) * (t.block_m + t.stages * t.block_n) <= _SMEM)


def default_config(dqk: int, dv: int, dtype: torch.dtype = torch.bfloat16, interpreted: bool = False
                   ) -> AttentionConfig:
    """The fixed launch heuristic from the head dims and dtype (no autotuning: one reduction order).

    bf16/fp16 on the GPU: the first of `KV_CANDIDATES` / `DQ_CANDIDATES` that fits the registers and
    shared memory (`_kv_fits`, `_dq_fits`): MLA's 192/128 gets dK/dV 128 keys x 32 queries and dQ 128
    queries x 64 keys, both on 8 warps (two warpgroups, wgmma); the forward 128 x 64 on 8 warps.
    float32 (``ieee`` dots run on the CUDA cores: for checks, not for speed) takes small tiles, or the
    shared memory would overflow. Interpreter: small tiles, so that the short test sequences still
    cross several blocks (and BLOCK_M != BLOCK_N). `use_config` overrides all of it."""
    if interpreted or dtype == torch.float32:
        warps, stages = (1, 1) if interpreted else (4, 2)
        return AttentionConfig(Tiles(32, 16, warps, stages), Tiles(16, 32, warps, stages), Tiles(32, 16, warps, stages))
    kv = next((t for t in KV_CANDIDATES if _kv_fits(t, dqk, dv)), Tiles(16, 32, 4, 2))
    dq = next((t for t in DQ_CANDIDATES if _dq_fits(t, dqk, dv)), Tiles(64, 16, 4, 2))
    return AttentionConfig(_FWD, kv, dq)


def sweep_configs(dqk: int, dv: int) -> list[AttentionConfig]:
    """The default and its alternatives for `benchmarks/ops/attention_bwd_sweep.py` (bf16/fp16, sm_90):
    each dK/dV candidate with the default dQ, each dQ candidate with the default dK/dV, and the
    forward alternatives with the default backward. Candidates over the register budget are included
    too (the sweep shows what spilling costs)."""
    base = default_config(dqk, dv)
    out = [base]
    out += [AttentionConfig(base.fwd, kv, base.dq) for kv in KV_CANDIDATES if kv != base.kv]
    out += [AttentionConfig(base.fwd, base.kv, dq) for dq in DQ_CANDIDATES if dq != base.dq]
    out += [AttentionConfig(f, base.kv, base.dq) for f in FWD_CANDIDATES if f != base.fwd]
    return out


_OVERRIDE: contextvars.ContextVar[AttentionConfig | None] = contextvars.ContextVar("attention_config", default=None)


@contextlib.contextmanager
def use_config(config: AttentionConfig | None) -> Iterator[None]:
    """Launch every `causal_attention` inside the block with ``config`` instead of `default_config`
    (for sweeps and tests; None: the default). Its backward uses the same config wherever and
    whenever it runs: the config travels as plain ints in the custom op's arguments (`_config_ints`),
    which the autograd rule hands to the backward op. Under ``torch.compile`` the config in force
    while the graph is *traced* is baked into it (`_override_ints`); changing it later does not
    recompile (``torch._dynamo.reset()`` does)."""
    if config is not None:
        _check_config(config)
    token = _OVERRIDE.set(config)
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def _check_config(c: AttentionConfig) -> None:
    for t in (c.fwd, c.kv, c.dq):
        if min(t.block_m, t.block_n) < 16 or t.block_m & (t.block_m - 1) or t.block_n & (t.block_n - 1):
            raise ValueError(f"attention config {c.name}: blocks must be powers of two >= 16")


def _pad_v(dv: int) -> int:
    return max(16, triton.next_power_of_2(dv))


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


def _interpreted() -> bool:
    """Whether this module's kernels are Triton-interpreter ones (the ``triton-interpret`` copy)."""
    from triton.runtime.jit import JITFunction

    return not isinstance(_attn_fwd, JITFunction)


def _config_ints(c: AttentionConfig) -> list[int]:
    """A config as the 12 ints the custom ops take: (block_m, block_n, warps, stages) of fwd, kv, dq."""
    return [x for t in (c.fwd, c.kv, c.dq) for x in (t.block_m, t.block_n, t.warps, t.stages)]


def _launch_config(config: list[int], q: torch.Tensor, v: torch.Tensor) -> AttentionConfig:
    """The config of a custom op call: ``config`` as `_config_ints` made it, or `default_config` when
    empty (resolved here, inside the op: the same for the forward and the backward of a call)."""
    if not config:
        return default_config(q.shape[-1], v.shape[-1], q.dtype, _interpreted())
    if len(config) != 12:
        raise ValueError(f"attention config: 12 ints (fwd, kv, dq tiles), got {list(config)}")
    c = AttentionConfig(*(Tiles(*config[i:i + 4]) for i in (0, 4, 8)))
    _check_config(c)
    return c


@torch.compiler.assume_constant_result
def _override_ints() -> tuple[int, ...]:
    """The `use_config` override as ints, () for none. Under torch.compile dynamo cannot trace a
    ``ContextVar.get``; marked a constant result, it is called once while tracing and its value
    baked into the graph (no guard: see `use_config`). Eager calls simply call it."""
    c = _OVERRIDE.get()
    return () if c is None else tuple(_config_ints(c))


def _kernel_options(q: torch.Tensor, v: torch.Tensor, s: int, *blocks: int) -> dict[str, object]:
    """Constexprs shared by the kernels: the dot precision (fp32 inputs: full-precision ``tl.dot``,
    never tf32; bf16 under the interpreter: see `_mm`) and which masks are needed (rows: S not a
    multiple of every block; head dims: not covered exactly by the power-of-two parts)."""
    da, db = split_head_dim(q.shape[-1])
    return dict(PREC="ieee" if q.dtype == torch.float32 else "tf32",
                INTERP_BF16=_interpreted() and q.dtype == torch.bfloat16,
                MASK_ROWS=any(s % blk for blk in blocks), MASK_QK=da + db != q.shape[-1],
                MASK_V=_pad_v(v.shape[-1]) != v.shape[-1])


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _like_layout(x: torch.Tensor, d: int) -> torch.Tensor:
    """An empty ``(B,H,S,d)`` tensor laid out as ``x``'s ``(B,H,S)`` dims: ``(B,S,H,d)`` storage for a
    heads-inner view, else ``(B,H,S,d)``."""
    b, h, s, _ = x.shape
    if h > 1 and s > 1 and x.stride(1) < x.stride(2):
        return torch.empty(b, s, h, d, dtype=x.dtype, device=x.device).transpose(1, 2)
    return torch.empty(b, h, s, d, dtype=x.dtype, device=x.device)


@triton.jit
def _document_bounds_kernel(CU, START, END, n_cu, total, seq, STEPS: tl.constexpr, BLOCK: tl.constexpr):
    # per flattened token t: the last boundary index i with cu[i] <= t (a binary search over all of cu,
    # STEPS = ceil(log2(n_cu)) halvings), its document's start and end clipped to t's row
    t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = t < total
    lo = tl.zeros([BLOCK], dtype=tl.int64)  # cu[lo] <= t holds throughout (cu[0] = 0)
    hi = tl.zeros([BLOCK], dtype=tl.int64) + (n_cu - 1)
    for _ in tl.static_range(STEPS):
        mid = (lo + hi + 1) // 2
        below = tl.load(CU + mid, mask=mask, other=0).to(tl.int64) <= t
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid - 1)
    doc = tl.minimum(lo, tl.maximum(n_cu - 2, 0))
    row_start = (t // seq) * seq
    first = tl.load(CU + doc, mask=mask, other=0).to(tl.int64)
    last = tl.load(CU + tl.minimum(doc + 1, n_cu - 1), mask=mask, other=0).to(tl.int64)
    start = tl.minimum(tl.maximum(tl.maximum(first, row_start) - row_start, 0), seq)
    end = tl.minimum(tl.maximum(tl.minimum(last, row_start + seq) - row_start, 0), seq)
    tl.store(START + t, start.to(tl.int32), mask=mask)
    tl.store(END + t, end.to(tl.int32), mask=mask)


def document_bounds(cu_seqlens: torch.Tensor, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token of each row, the start and the end (exclusive) of its document within the row, as
    int32 ``[batch, seq]``, from boundaries ``cu_seqlens`` over the flattened ``batch * seq`` tokens.
    One kernel launch (a captured training step calls this in every attention layer's forward and
    backward), no host sync."""
    cu = cu_seqlens.contiguous()
    start = torch.empty(batch, seq, dtype=torch.int32, device=cu.device)
    end = torch.empty_like(start)
    total, n_cu = batch * seq, cu.numel()
    if total == 0:
        return start, end
    if n_cu < 2:  # no boundaries at all: every row is one document (the reference rejects this input)
        return start.zero_(), end.fill_(seq)
    block = 1024
    _document_bounds_kernel[(triton.cdiv(total, block),)](cu, start, end, n_cu, total, seq,
                                                          STEPS=max(1, math.ceil(math.log2(n_cu))), BLOCK=block)
    return start, end


def _forward(q, k, v, scale, seg, config: AttentionConfig):
    b, h, s, dqk = q.shape
    dv = v.shape[-1]
    o = _like_layout(q, dv)
    lse = torch.empty(b * h, s, dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    da, db = split_head_dim(dqk)
    t = config.fwd
    grid = (triton.cdiv(s, t.block_m), b * h)
    _attn_fwd[grid](q, k, v, o, lse, seg if seg is not None else lse, scale * LOG2E,
                    *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], h, s, dqk, dv, grid[0],
                    VARLEN=seg is not None, DA=da, DB=db, DVB=_pad_v(dv), BLOCK_M=t.block_m, BLOCK_N=t.block_n,
                    **_kernel_options(q, v, s, t.block_m), num_warps=t.warps, num_stages=t.stages)
    return o, lse


def _backward(do, q, k, v, o, lse, scale, seg, seg_end, config: AttentionConfig):
    b, h, s, dqk = q.shape
    dv_dim = v.shape[-1]
    dq, dk, dv = _like_layout(q, dqk), _like_layout(k, dqk), _like_layout(v, dv_dim)
    if b * h * s == 0:
        return dq, dk, dv
    do = _unit_last(do)
    da, db = split_head_dim(dqk)
    dvb = _pad_v(dv_dim)
    kv, dqt = config.kv, config.dq
    delta = torch.empty(b * h, s, dtype=torch.float32, device=q.device)
    _attn_bwd_pre[(triton.cdiv(s, 64), b * h)](o, do, delta, *o.stride()[:3], *do.stride()[:3], h, s, dv_dim,
                                                DVB=dvb, BLOCK_M=64)
    varlen = seg is not None
    seg_arg = seg if varlen else lse
    common = dict(VARLEN=varlen, DA=da, DB=db, DVB=dvb,
                  **_kernel_options(q, v, s, kv.block_m, kv.block_n, dqt.block_m, dqt.block_n))
    _attn_bwd_dkdv[(triton.cdiv(s, kv.block_n), b * h)](
        q, k, v, do, lse, delta, seg_arg, seg_end if varlen else lse, dk, dv, scale * LOG2E, scale,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        h, s, dqk, dv_dim, BLOCK_M=kv.block_m, BLOCK_N=kv.block_n, num_warps=kv.warps, num_stages=kv.stages,
        **common)
    dq_blocks = triton.cdiv(s, dqt.block_m)
    _attn_bwd_dq[(dq_blocks, b * h)](
        q, k, v, do, lse, delta, seg_arg, dq, scale * LOG2E, scale,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
        h, s, dqk, dv_dim, dq_blocks, BLOCK_M=dqt.block_m, BLOCK_N=dqt.block_n, num_warps=dqt.warps,
        num_stages=dqt.stages, **common)
    return dq, dk, dv


# -- custom ops --------------------------------------------------------------------------------------
# Forward and backward are torch.library custom ops, so torch.compile (fullgraph, inductor) keeps them
# as opaque nodes: dynamo never traces the launch code (it failed on the old autograd Function's
# ContextVar read and on isinstance checks of Triton objects), and the fake implementations give
# the outputs' shapes, dtypes and strides exactly as the kernels produce them (the (B,S,H,D) storage
# of a heads-inner input included: `_like_layout`). The launch config travels as 12 plain ints (empty:
# `default_config`, resolved inside the op), so the backward needs no context variable. Each copy of
# this package (compiled, interpreted) registers under its own namespace, as the MoE router does.

_NAMESPACE = "openseek_hal_interpret" if "_kernels_interpreted" in __name__ else "openseek_hal"


def _bounds(cu_seqlens: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if cu_seqlens is None:
        return None, None
    return document_bounds(cu_seqlens.to(q.device, non_blocking=True), q.shape[0], q.shape[2])


@torch.library.custom_op(f"{_NAMESPACE}::flash_attention_fwd", mutates_args=())
def flash_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        cu_seqlens: torch.Tensor | None, config: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o, lse)``: the attention output (in ``q``'s ``(B,H,S)`` layout) and the float32 ``[B*H, S]``
    log2-sum-exp per row. ``config``: `_config_ints` of the launch, or [] for `default_config`."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    seg, _ = _bounds(cu_seqlens, q)
    return _forward(q, k, v, scale, seg, _launch_config(config, q, v))


@flash_attention_fwd.register_fake
def _(q, k, v, scale, cu_seqlens, config):
    q = _unit_last(q)
    b, h, s, _ = q.shape
    return _like_layout(q, v.shape[-1]), q.new_empty((b * h, s), dtype=torch.float32)


@torch.library.custom_op(f"{_NAMESPACE}::flash_attention_bwd", mutates_args=())
def flash_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                        lse: torch.Tensor, scale: float, cu_seqlens: torch.Tensor | None,
                        config: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``, each in its input's ``(B,H,S)`` layout, from the forward's ``o`` and ``lse``
    (the same ``scale``, ``cu_seqlens`` and ``config`` as the forward)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    seg, seg_end = _bounds(cu_seqlens, q)
    return _backward(do, q, k, v, o, lse, scale, seg, seg_end, _launch_config(config, q, v))


@flash_attention_bwd.register_fake
def _(do, q, k, v, o, lse, scale, cu_seqlens, config):
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    return _like_layout(q, q.shape[-1]), _like_layout(k, k.shape[-1]), _like_layout(v, v.shape[-1])


def _setup_context(ctx, inputs, output):
    q, k, v, scale, cu_seqlens, config = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
    ctx.scale, ctx.config = scale, config
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero-filled [B*H, S] gradient for the log-sum-exp


def _backward_rule(ctx, do, _d_lse):
    if do is None:
        return None, None, None, None, None, None
    q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = flash_attention_bwd(do, q, k, v, o, lse, ctx.scale, cu_seqlens, ctx.config)
    return dq, dk, dv, None, None, None


flash_attention_fwd.register_autograd(_backward_rule, setup_context=_setup_context)


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
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(q.device, non_blocking=True)
    return flash_attention_fwd(q, k, v, scale, cu_seqlens, list(_override_ints()))[0]
