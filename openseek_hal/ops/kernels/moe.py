"""Triton MoE routing and token permute/unpermute, forward and backward.

``moe_route``: one program per token holds its expert scores as a ``(groups, experts per group)``
tile; group-limited selection and the top-k are done by repeated max + lowest-index-of-max, which
gives torch.topk's order (descending) without a sort. The backward (``ROWS`` tokens per program,
`launch.config`) recomputes the scores from the logits, and the picked ones from the logits
gathered at the saved indices. Tokens-per-expert counts are a histogram per block of ids added into a
zeroed table with integer atomics (exact, so reproducible, and unlike ``torch.bincount`` no device-to-host
sync, so CUDA graphs and torch.compile keep it).

Permute/unpermute: the stable sort of expert ids is torch's (over ``T * k`` ids narrowed to 8 or 16 bits); the
row movement and the sort's inverse are Triton. Every backward is a gather (each output row read-summed by
one program), never a scatter-add, so results are bitwise reproducible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..moe import check_aux_args
from . import launch
from ._common import acc_dtype, acc_type, split_float

_BIG = tl.constexpr(1 << 30)


@triton.jit
def _scores(X, row, g_idx, c_idx, group_size, n_experts, SOFTMAX: tl.constexpr, ACC: tl.constexpr):
    expert = g_idx[:, None] * group_size + c_idx[None, :]
    valid = (c_idx[None, :] < group_size) & (expert < n_experts)
    x = tl.load(X + row * n_experts + expert, mask=valid, other=float("-inf")).to(ACC)
    if SOFTMAX:
        m = tl.max(tl.max(x, axis=1), axis=0)
        e = tl.exp(x - m)
        s = e / tl.sum(tl.sum(e, axis=1), axis=0)
    else:
        s = 1.0 / (1.0 + tl.exp(-x))
    return tl.where(valid, s, 0.0), expert, valid


@triton.jit
def _route_fwd(X, BIAS, IDX, W, n_experts, group_size, scale, HAS_BIAS: tl.constexpr, SOFTMAX: tl.constexpr,
               NORM: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, TOP_K: tl.constexpr,
               ACC: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g_idx = tl.arange(0, BLOCK_G)
    c_idx = tl.arange(0, BLOCK_C)
    s, expert, valid = _scores(X, row, g_idx, c_idx, group_size, n_experts, SOFTMAX, ACC)
    choice = s
    if HAS_BIAS:
        choice += tl.load(BIAS + expert, mask=valid, other=0.0).to(ACC)
    choice = tl.where(valid, choice, float("-inf"))
    # NaN ranks above every number, as in torch.topk; otherwise no expert would match the maximum
    # and the row would get an out-of-range index (a crash on the GPU, not a NaN loss)
    choice = tl.where(choice != choice, float("inf"), choice)
    if N_GROUP > 1:
        best = tl.max(choice, axis=1)
        if HAS_BIAS and BLOCK_C > 1:  # group score: sum of the best two (DeepSeek-V3's noaux_tc)
            first = tl.min(tl.where(choice == best[:, None], c_idx[None, :], _BIG), axis=1)
            second = tl.max(tl.where(c_idx[None, :] == first[:, None], float("-inf"), choice), axis=1)
            group_score = best + tl.where(second == float("-inf"), 0.0, second)
        else:
            group_score = best
        group_score = tl.where(g_idx < N_GROUP, group_score, float("-inf"))
        keep = g_idx < 0
        for _ in tl.static_range(TOPK_GROUP):
            top = tl.max(group_score, axis=0)
            g = tl.min(tl.where(group_score == top, g_idx, _BIG), axis=0)
            keep = keep | (g_idx == g)
            group_score = tl.where(g_idx == g, float("-inf"), group_score)
        choice = tl.where(keep[:, None], choice, float("-inf"))
    k_idx = tl.arange(0, BLOCK_K)
    picked = tl.zeros([BLOCK_K], dtype=tl.int64)
    weights = tl.zeros([BLOCK_K], dtype=ACC)
    for j in tl.static_range(TOP_K):
        top = tl.max(tl.max(choice, axis=1), axis=0)
        e = tl.min(tl.min(tl.where(choice == top, expert, _BIG), axis=1), axis=0)
        hit = expert == e
        w = tl.sum(tl.sum(tl.where(hit, s, 0.0), axis=1), axis=0)
        picked = tl.where(k_idx == j, e.to(tl.int64), picked)
        weights = tl.where(k_idx == j, w, weights)
        choice = tl.where(hit, float("-inf"), choice)
    if NORM and TOP_K > 1:
        weights = weights / (tl.sum(weights, axis=0) + 1e-20)
    k_mask = k_idx < TOP_K
    tl.store(IDX + row * TOP_K + k_idx, picked, mask=k_mask)
    tl.store(W + row * TOP_K + k_idx, weights * scale, mask=k_mask)


@triton.jit
def _route_bwd(X, IDX, DW, DX, n_tokens, n_experts, scale, SOFTMAX: tl.constexpr, NORM: tl.constexpr,
               TOP_K: tl.constexpr, ACC: tl.constexpr, BLOCK_E: tl.constexpr, ROWS: tl.constexpr):
    """``ROWS`` tokens per program. Only the picked experts' weights have gradients, taken one pick at
    a time: a first pass loads each pick's index, weight gradient and logit as ``[ROWS]`` vectors and
    sums the picked scores (recomputed with the row's arithmetic, so the same values) for the
    normalization's gradient; a second spreads each pick's score gradient onto the row with one
    ``[ROWS, experts]`` select. (A ``[ROWS, experts, top_k]`` match doing both at once, or a register
    gather of the picked scores, was 20-70% slower on an H100: docs/ops.md.)"""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_tokens
    e_idx = tl.arange(0, BLOCK_E)
    valid = row_ok[:, None] & (e_idx < n_experts)[None, :]
    x_row = X + rows[:, None] * n_experts
    if SOFTMAX:  # the whole row's scores take part (through the normalizer)
        x = tl.load(x_row + e_idx[None, :], mask=valid, other=float("-inf")).to(ACC)
        m = tl.max(x, axis=1)
        ex = tl.exp(x - m[:, None])
        z = tl.sum(ex, axis=1)
        s = tl.where(valid, ex / z[:, None], 0.0)
    else:
        x = tl.load(x_row + e_idx[None, :], mask=valid, other=0.0).to(ACC)
        s = tl.where(valid, 1.0 / (1.0 + tl.exp(-x)), 0.0)
    if NORM and TOP_K > 1:
        z_sum = tl.zeros([ROWS], ACC)
        dw_sp = tl.zeros([ROWS], ACC)
        for k in tl.static_range(TOP_K):
            pk = tl.load(IDX + rows * TOP_K + k, mask=row_ok, other=0)
            dwk = tl.load(DW + rows * TOP_K + k, mask=row_ok, other=0.0).to(ACC) * scale
            xpk = tl.load(X + rows * n_experts + pk, mask=row_ok, other=0.0).to(ACC)
            if SOFTMAX:
                spk = tl.exp(xpk - m) / z
            else:
                spk = 1.0 / (1.0 + tl.exp(-xpk))
            z_sum += spk
            dw_sp += dwk * spk
        z_sum += 1e-20
    ds = tl.zeros([ROWS, BLOCK_E], ACC)
    for k in tl.static_range(TOP_K):  # the pick's index and gradient loaded again (L1 hits): no per-pick list
        pk = tl.load(IDX + rows * TOP_K + k, mask=row_ok, other=-1)
        dsk = tl.load(DW + rows * TOP_K + k, mask=row_ok, other=0.0).to(ACC) * scale
        if NORM and TOP_K > 1:
            dsk = dsk / z_sum - dw_sp / (z_sum * z_sum)
        ds += tl.where(e_idx[None, :] == pk[:, None], dsk[:, None], 0.0)
    if SOFTMAX:
        dx = s * (ds - tl.sum(ds * s, axis=1)[:, None])
    else:
        dx = ds * s * (1.0 - s)
    tl.store(DX + rows[:, None] * n_experts + e_idx[None, :], dx.to(DX.dtype.element_ty), mask=valid)


_COUNT_BLOCK = 4096  # expert ids per histogram program


@triton.jit
def _histogram(IDS, COUNTS, n, n_bins, BLOCK: tl.constexpr, BINS: tl.constexpr):
    """``counts[e] += #{i in this program's block: ids[i] == e}``: one integer atomic add per bin and program
    (integer sums: the same counts in any order). Rows past ``n`` count into bin ``n_bins``, never stored."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(IDS + offs, mask=offs < n, other=n_bins).to(tl.int32)
    bins = tl.arange(0, BINS)
    tl.atomic_add(COUNTS + bins, tl.histogram(ids, BINS).to(COUNTS.dtype.element_ty), mask=bins < n_bins)


def _count(indices: torch.Tensor, n: int) -> torch.Tensor:
    """Tokens per expert as int64 ``[n]``, on the device (no host sync, so graphs and compile keep it): a zeroed
    table and one histogram launch (where ``index_add_`` of ones took a third launch to make the ones)."""
    flat = indices.reshape(-1)
    counts = torch.zeros(n, dtype=torch.int64, device=flat.device)
    if flat.numel() and n:
        _histogram[(triton.cdiv(flat.numel(), _COUNT_BLOCK),)](flat, counts, flat.numel(), n, BLOCK=_COUNT_BLOCK,
                                                             BINS=triton.next_power_of_2(n + 1))
    return counts


def _route_blocks(experts: int, n_group: int, top_k: int) -> dict:
    group_size = experts // n_group
    return dict(BLOCK_G=triton.next_power_of_2(n_group), BLOCK_C=triton.next_power_of_2(group_size),
                BLOCK_K=triton.next_power_of_2(top_k))


# The router is a torch.library custom op (opaque to torch.compile, which then never re-analyses
# its Triton kernels: inductor failed on them when it did). Each copy of this package (compiled,
# interpreted) registers under its own namespace, so both can be loaded in one process.
_NAMESPACE = "openseek_hal_interpret" if "_kernels_interpreted" in __name__ else "openseek_hal"


@torch.library.custom_op(f"{_NAMESPACE}::moe_route", mutates_args=())
def _moe_route_op(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int, topk_group: int,
                  score_func: str, norm_topk_prob: bool,
                  routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens, experts = logits.shape
    indices = torch.empty((tokens, top_k), dtype=torch.int64, device=logits.device)
    weights = torch.empty((tokens, top_k), dtype=acc_dtype(logits.dtype), device=logits.device)
    if tokens:
        _route_fwd[(tokens,)](
            logits, bias if bias is not None else logits, indices, weights, experts, experts // n_group,
            routed_scaling_factor, HAS_BIAS=bias is not None, SOFTMAX=score_func == "softmax",
            NORM=norm_topk_prob, N_GROUP=n_group, TOPK_GROUP=topk_group, TOP_K=top_k,
            ACC=acc_type(logits.dtype), **_route_blocks(experts, n_group, top_k),
            num_warps=1 if experts <= 64 else 4)
    return indices, weights, _count(indices, experts)


@_moe_route_op.register_fake
def _(logits, bias, top_k, n_group, topk_group, score_func, norm_topk_prob, routed_scaling_factor):
    tokens, experts = logits.shape
    return (logits.new_empty((tokens, top_k), dtype=torch.int64),
            logits.new_empty((tokens, top_k), dtype=acc_dtype(logits.dtype)),
            logits.new_empty((experts,), dtype=torch.int64))


@torch.library.custom_op(f"{_NAMESPACE}::moe_route_backward", mutates_args=())
def _moe_route_backward_op(logits: torch.Tensor, indices: torch.Tensor, d_weights: torch.Tensor, n_group: int,
                           score_func: str, norm_topk_prob: bool, routed_scaling_factor: float) -> torch.Tensor:
    tokens, experts = logits.shape
    top_k = indices.shape[1]
    dx = torch.empty_like(logits)
    if tokens:
        cfg = launch.config("moe_route_bwd", experts)
        _route_bwd[(triton.cdiv(tokens, cfg["ROWS"]),)](
            logits, indices, d_weights.contiguous(), dx, tokens, experts, routed_scaling_factor,
            SOFTMAX=score_func == "softmax", NORM=norm_topk_prob, TOP_K=top_k, ACC=acc_type(logits.dtype),
            BLOCK_E=triton.next_power_of_2(experts), ROWS=cfg["ROWS"], num_warps=cfg["num_warps"])
    return dx


@_moe_route_backward_op.register_fake
def _(logits, indices, d_weights, n_group, score_func, norm_topk_prob, routed_scaling_factor):
    return torch.empty_like(logits)


def _route_setup_context(ctx, inputs, output):
    logits, _, _, n_group, _, score_func, norm, scale = inputs
    ctx.save_for_backward(logits, output[0])
    ctx.config = (n_group, score_func, norm, scale)
    ctx.mark_non_differentiable(output[0], output[2])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the indices and the counts


def _route_backward(ctx, _d_indices, d_weights, _d_counts):
    if d_weights is None:  # only the weights carry a gradient
        return None, None, None, None, None, None, None, None
    logits, indices = ctx.saved_tensors
    dx = _moe_route_backward_op(logits, indices, d_weights, *ctx.config)
    return dx, None, None, None, None, None, None, None


_moe_route_op.register_autograd(_route_backward, setup_context=_route_setup_context)


def moe_route(logits: torch.Tensor, bias: torch.Tensor | None = None, *, top_k: int, n_group: int = 1,
              topk_group: int = 1, score_func: str = "sigmoid", norm_topk_prob: bool = True,
              routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if score_func not in ("sigmoid", "softmax"):
        raise ValueError(f"score_func must be 'sigmoid' or 'softmax', got {score_func!r}")
    if logits.shape[-1] % n_group:
        raise ValueError(f"{logits.shape[-1]} experts do not split into {n_group} groups")
    bias = bias.contiguous() if bias is not None else None  # read as a dense vector by the kernel
    return _moe_route_op(logits.contiguous(), bias, top_k, n_group, topk_group, score_func, norm_topk_prob,
                         float(routed_scaling_factor))


# -- the sequence-wise balance loss ---------------------------------------------------------------
# Forward: programs over (sequence, chunk of its tokens) sum their tokens' normalized scores and count
# their picks per expert into partials; one program adds each sequence's partials (whole tiles of
# chunks at a time; the same bits every run, no atomics), forms f, the loss and keeps f for the backward.
# Backward: the same grid writes each token's logit gradient from its recomputed scores and its sequence's f.

@triton.jit
def _normalized_scores(X, rows, row_ok, e_idx, n_experts, SOFTMAX: tl.constexpr, ACC: tl.constexpr):
    """(normalized scores, sigmoid' / sum of sigmoids) of the ``rows`` x experts tile, zero where masked
    (the second output is the softmax's scores again, whose Jacobian needs no other factor)."""
    valid = row_ok[:, None] & (e_idx < n_experts)[None, :]
    if SOFTMAX:
        x = tl.load(X + rows[:, None] * n_experts + e_idx[None, :], mask=valid, other=float("-inf")).to(ACC)
        m = tl.max(x, axis=1)
        ex = tl.where(valid, tl.exp(x - tl.where(row_ok, m, 0.0)[:, None]), 0.0)
        z = tl.sum(ex, axis=1)
        n = ex / tl.where(row_ok, z, 1.0)[:, None]
        return n, n
    x = tl.load(X + rows[:, None] * n_experts + e_idx[None, :], mask=valid, other=0.0).to(ACC)
    sig = tl.where(valid, 1.0 / (1.0 + tl.exp(-x)), 0.0)
    z = tl.where(row_ok, tl.sum(sig, axis=1), 1.0)
    return sig / z[:, None], sig * (1.0 - sig) / z[:, None]


@triton.jit
def _aux_partials(X, IDX, P_PART, C_PART, seq, n_experts, n_chunks, SOFTMAX: tl.constexpr, TOP_K: tl.constexpr,
                  ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    local = c * CHUNK + tl.arange(0, CHUNK)
    row_ok = local < seq
    rows = b * seq + local
    e_idx = tl.arange(0, BLOCK_E)
    n, _ = _normalized_scores(X, rows, row_ok, e_idx, n_experts, SOFTMAX, ACC)
    counts = tl.zeros([BLOCK_E], ACC)
    for k in tl.static_range(TOP_K):
        pick = tl.load(IDX + rows * TOP_K + k, mask=row_ok, other=-1)
        counts += tl.sum((pick[:, None] == e_idx[None, :]).to(ACC), axis=0)
    part = (b * n_chunks + c) * BLOCK_E + e_idx
    tl.store(P_PART + part, tl.sum(n, axis=0))
    tl.store(C_PART + part, counts)


@triton.jit
def _aux_total(P_PART, C_PART, F, LOSS, batch, seq, n_experts, n_chunks, coef_hi, coef_lo,
               TOP_K: tl.constexpr, ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr):
    # each sequence's partials as [BLOCK_C chunks, experts] tiles, summed over the chunks (a tree
    # reduction: fixed for a given shape, so the same bits every run)
    e_idx = tl.arange(0, BLOCK_E)
    e_ok = e_idx < n_experts
    c_idx = tl.arange(0, BLOCK_C)
    total = tl.zeros([BLOCK_E], ACC)
    for b in range(batch):
        p = tl.zeros([BLOCK_E], ACC)
        counts = tl.zeros([BLOCK_E], ACC)
        for c0 in range(0, n_chunks, BLOCK_C):
            chunk = c0 + c_idx
            part = (b * n_chunks + chunk)[:, None] * BLOCK_E + e_idx[None, :]
            ok = (chunk < n_chunks)[:, None]
            p += tl.sum(tl.load(P_PART + part, mask=ok, other=0.0), axis=0)
            counts += tl.sum(tl.load(C_PART + part, mask=ok, other=0.0), axis=0)
        f = counts * n_experts / (TOP_K * seq)
        tl.store(F + b * n_experts + e_idx, f, mask=e_ok)
        total += tl.where(e_ok, f * (p / seq), 0.0)
    mean = tl.sum(total, axis=0) / batch
    tl.store(LOSS, mean * coef_hi + mean * coef_lo)  # coef as two float32 halves: exact in float64


@triton.jit
def _aux_bwd(X, F, G, DX, seq, n_experts, batch, coef_hi, coef_lo, SOFTMAX: tl.constexpr, ACC: tl.constexpr,
             CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    local = tl.program_id(1).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    row_ok = local < seq
    rows = b * seq + local
    e_idx = tl.arange(0, BLOCK_E)
    e_ok = e_idx < n_experts
    n, jac = _normalized_scores(X, rows, row_ok, e_idx, n_experts, SOFTMAX, ACC)
    f = tl.load(F + b * n_experts + e_idx, mask=e_ok, other=0.0)
    # d loss / d n[s, e] = scale * f[e]; through the normalization: jac * (f - sum_e' f[e'] n[s, e'])
    g = tl.load(G).to(ACC)
    scale = (g * coef_hi + g * coef_lo) / (batch * seq)
    dx = scale * jac * (f[None, :] - tl.sum(f[None, :] * n, axis=1)[:, None])
    tl.store(DX + rows[:, None] * n_experts + e_idx[None, :], dx.to(DX.dtype.element_ty),
             mask=row_ok[:, None] & e_ok[None, :])


def _aux_chunk(experts: int) -> tuple[int, int]:
    """(tokens per program, padded expert count): a tile of at most 4096 scores, at most 128 tokens."""
    block_e = triton.next_power_of_2(experts)
    return max(1, min(128, 4096 // block_e)), block_e


@torch.library.custom_op(f"{_NAMESPACE}::moe_seq_aux_loss", mutates_args=())
def _aux_op(logits: torch.Tensor, indices: torch.Tensor, batch: int, coef: float,
            score_func: str) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, experts = logits.shape
    seq = tokens // batch
    chunk, block_e = _aux_chunk(experts)
    n_chunks = triton.cdiv(seq, chunk)
    acc = acc_dtype(logits.dtype)
    p_part = torch.empty(batch * n_chunks * block_e, dtype=acc, device=logits.device)
    c_part = torch.empty_like(p_part)
    f = torch.empty(batch, experts, dtype=acc, device=logits.device)
    loss = torch.empty((), dtype=acc, device=logits.device)
    softmax = score_func == "softmax"
    _aux_partials[(batch, n_chunks)](logits, indices, p_part, c_part, seq, experts, n_chunks, SOFTMAX=softmax,
                                     TOP_K=indices.shape[1], ACC=acc_type(logits.dtype), CHUNK=chunk,
                                     BLOCK_E=block_e)
    _aux_total[(1,)](p_part, c_part, f, loss, batch, seq, experts, n_chunks, *split_float(coef),
                     TOP_K=indices.shape[1], ACC=acc_type(logits.dtype), BLOCK_E=block_e,
                     BLOCK_C=min(triton.next_power_of_2(n_chunks), max(1, 8192 // block_e)), num_warps=8)
    return loss, f


@_aux_op.register_fake
def _(logits, indices, batch, coef, score_func):
    acc = acc_dtype(logits.dtype)
    return logits.new_empty((), dtype=acc), logits.new_empty((batch, logits.shape[1]), dtype=acc)


@torch.library.custom_op(f"{_NAMESPACE}::moe_seq_aux_loss_backward", mutates_args=())
def _aux_backward_op(logits: torch.Tensor, f: torch.Tensor, grad: torch.Tensor, batch: int, coef: float,
                     score_func: str) -> torch.Tensor:
    tokens, experts = logits.shape
    seq = tokens // batch
    chunk, block_e = _aux_chunk(experts)
    dx = torch.empty_like(logits)
    _aux_bwd[(batch, triton.cdiv(seq, chunk))](logits, f, grad.reshape(1), dx, seq, experts, batch,
                                               *split_float(coef), SOFTMAX=score_func == "softmax",
                                               ACC=acc_type(logits.dtype), CHUNK=chunk, BLOCK_E=block_e)
    return dx


@_aux_backward_op.register_fake
def _(logits, f, grad, batch, coef, score_func):
    return torch.empty_like(logits)


def _aux_setup_context(ctx, inputs, output):
    logits, _, batch, coef, score_func = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.config = (batch, coef, score_func)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for f


def _aux_backward(ctx, d_loss, _d_f):
    if d_loss is None:
        return None, None, None, None, None
    logits, f = ctx.saved_tensors
    return _aux_backward_op(logits, f, d_loss.contiguous(), *ctx.config), None, None, None, None


_aux_op.register_autograd(_aux_backward, setup_context=_aux_setup_context)


def moe_seq_aux_loss(logits: torch.Tensor, indices: torch.Tensor, batch: int, *, coef: float,
                     score_func: str = "sigmoid") -> torch.Tensor:
    check_aux_args(logits, batch, score_func)
    return _aux_op(logits.contiguous(), indices.contiguous(), int(batch), float(coef), score_func)[0]


# -- permute / unpermute ------------------------------------------------------------------------

@triton.jit
def _gather_rows(SRC, ROWS, DST, stride_src, stride_dst, n_cols, DIVISOR: tl.constexpr, BLOCK: tl.constexpr):
    """``dst[i] = src[rows[i] // DIVISOR]``."""
    i = tl.program_id(0).to(tl.int64)
    src_row = tl.load(ROWS + i) // DIVISOR
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        tl.store(DST + i * stride_dst + cols, tl.load(SRC + src_row * stride_src + cols, mask=mask), mask=mask)


@triton.jit
def _combine_rows(SRC, INV, W, DST, stride_src, stride_dst, n_cols, top_k, HAS_W: tl.constexpr,
                  ACC: tl.constexpr, BLOCK: tl.constexpr):
    """``dst[t] = sum_j w[t, j] * src[inv[t * k + j]]`` (w = 1 without weights), summed in order of j."""
    t = tl.program_id(0).to(tl.int64)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        acc = tl.zeros([BLOCK], dtype=ACC)
        for j in range(top_k):
            p = tl.load(INV + t * top_k + j)
            v = tl.load(SRC + p * stride_src + cols, mask=mask, other=0.0).to(ACC)
            if HAS_W:
                v *= tl.load(W + t * top_k + j).to(ACC)
            acc += v
        tl.store(DST + t * stride_dst + cols, acc.to(DST.dtype.element_ty), mask=mask)


@triton.jit
def _unpermute_bwd(DOUT, Y, INV, W, DY, DW, stride_dout, stride_y, stride_dy, n_cols, top_k,
                   HAS_DW: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Per token: ``dy[inv[t, j]] = w[t, j] * dout[t]`` and, with HAS_DW, ``dw[t, j] = <dout[t], y[inv[t, j]]>``
    (without it ``y`` is not read: the weights are constants, as the expert-parallel regroup's ones are)."""
    t = tl.program_id(0).to(tl.int64)
    for j in range(top_k):
        p = tl.load(INV + t * top_k + j)
        w = tl.load(W + t * top_k + j).to(ACC)
        dot = tl.zeros([BLOCK], dtype=ACC)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            g = tl.load(DOUT + t * stride_dout + cols, mask=mask, other=0.0).to(ACC)
            tl.store(DY + p * stride_dy + cols, (g * w).to(DY.dtype.element_ty), mask=mask)
            if HAS_DW:
                y = tl.load(Y + p * stride_y + cols, mask=mask, other=0.0).to(ACC)
                dot += g * y
        if HAS_DW:
            tl.store(DW + t * top_k + j, tl.sum(dot, axis=0).to(DW.dtype.element_ty))


def _row_block(n_cols: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(max(n_cols, 1)), 4096)
    return block, max(1, min(8, block // 512))


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


@triton.jit
def _invert(ORDER, INV, n, BLOCK: tl.constexpr):
    """``inv[order[i]] = i``."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(INV + tl.load(ORDER + offs, mask=ok, other=0), offs.to(INV.dtype.element_ty), mask=ok)


def _inverse(order: torch.Tensor) -> torch.Tensor:
    """The inverse of the permutation ``order`` (one launch; a scatter of an ``arange`` took two)."""
    inv = torch.empty_like(order)
    if order.numel():
        _invert[(triton.cdiv(order.numel(), 1024),)](order.contiguous(), inv, order.numel(), BLOCK=1024)
    return inv


def _combine(src: torch.Tensor, inv: torch.Tensor, weights: torch.Tensor | None, tokens: int, top_k: int,
             out_dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty((tokens, src.shape[1]), dtype=out_dtype, device=src.device)
    if tokens and src.shape[1]:
        block, warps = _row_block(src.shape[1])
        _combine_rows[(tokens,)](src, inv, weights if weights is not None else inv, out, src.stride(0), out.stride(0),
                                 src.shape[1], top_k, HAS_W=weights is not None, ACC=acc_type(src.dtype),
                                 BLOCK=block, num_warps=warps)
    return out


def _expert_order(flat: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The stable argsort of expert ids, sorted as the narrowest integer that holds them: a radix sort makes
    one pass per 8 bits of key, so int64 ids cost eight passes where one (up to 256 experts) or two do."""
    for narrow in (torch.uint8, torch.int16):
        if num_experts - 1 <= torch.iinfo(narrow).max:
            return torch.sort(flat.to(narrow), stable=True).indices
    return torch.sort(flat, stable=True).indices


class MoEPermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, indices, num_experts):
        tokens, top_k = indices.shape
        flat = indices.reshape(-1)
        order = _expert_order(flat, num_experts)
        counts = _count(flat, num_experts)
        x = _rows(x)
        out = torch.empty((order.numel(), x.shape[1]), dtype=x.dtype, device=x.device)
        if order.numel() and x.shape[1]:
            block, warps = _row_block(x.shape[1])
            _gather_rows[(order.numel(),)](x, order, out, x.stride(0), out.stride(0), x.shape[1], DIVISOR=top_k,
                                           BLOCK=block, num_warps=warps)
        ctx.save_for_backward(order)
        ctx.shape = (tokens, top_k)
        ctx.mark_non_differentiable(order, counts)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the order and the counts
        return out, order, counts

    @staticmethod
    def backward(ctx, d_out, _d_order, _d_counts):
        if d_out is None:
            return None, None, None
        (order,) = ctx.saved_tensors
        tokens, top_k = ctx.shape
        dx = _combine(_rows(d_out), _inverse(order), None, tokens, top_k, d_out.dtype)
        return dx, None, None


class MoEUnpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_sorted, sorted_order, weights):
        tokens, top_k = weights.shape
        y = _rows(y_sorted)
        inv = _inverse(sorted_order)
        w = weights.contiguous()
        # y is needed only for the weights' gradient: constant weights (a plain permutation) keep no copy of it
        ctx.save_for_backward(y if ctx.needs_input_grad[2] else None, inv, w)
        ctx.y_meta = (y.shape, y.dtype)
        return _combine(y, inv, w, tokens, top_k, y.dtype)

    @staticmethod
    def backward(ctx, d_out):
        y, inv, w = ctx.saved_tensors
        tokens, top_k = w.shape
        shape, dtype = ctx.y_meta
        d_out = _rows(d_out)
        dy = torch.empty(shape, dtype=dtype, device=d_out.device)
        dw = torch.empty_like(w) if y is not None else None
        if tokens:
            block, warps = _row_block(shape[1])
            src = y if y is not None else dy  # without dw the kernel reads no y: any tensor holds the argument
            _unpermute_bwd[(tokens,)](d_out, src, inv, w, dy, dw if dw is not None else w, d_out.stride(0),
                                      src.stride(0), dy.stride(0), shape[1], top_k, HAS_DW=dw is not None,
                                      ACC=acc_type(torch.promote_types(dtype, w.dtype)), BLOCK=block, num_warps=warps)
        return dy, None, dw


def moe_permute(x: torch.Tensor, indices: torch.Tensor,
                num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return MoEPermute.apply(x, indices, num_experts)


def moe_unpermute(y_sorted: torch.Tensor, sorted_order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return MoEUnpermute.apply(y_sorted, sorted_order, weights)
