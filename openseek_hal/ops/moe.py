"""DeepSeekMoE routing and the token permute/unpermute around the experts (references and OpDefs).

``moe_route`` turns router logits into expert choices the way DeepSeek-V3 does: scores by sigmoid
(or softmax) in float32; an expert bias that shifts *selection only* (aux-loss-free balancing);
group-limited top-k (keep the ``topk_group`` best of ``n_group`` expert groups, then take ``top_k``
experts among them); weights gathered from the unbiased scores, optionally normalized, then scaled
by ``routed_scaling_factor``.

``moe_permute`` groups token copies by expert (stable, so tokens keep their order inside an
expert); ``moe_unpermute`` scatters expert outputs back and sums each token's ``top_k`` copies
weighted by its routing weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .opdef import OpDef, Sample, randn


def moe_route(logits: torch.Tensor, bias: torch.Tensor | None = None, *, top_k: int, n_group: int = 1,
              topk_group: int = 1, score_func: str = "sigmoid", norm_topk_prob: bool = True,
              routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route ``logits[T, E]`` -> ``(indices[T, top_k] int64, weights[T, top_k], tokens_per_expert[E] int64)``.

    Weights are differentiable with respect to ``logits``; the bias never receives a gradient.
    Group score: the best expert of the group without a bias, the sum of its best two with one
    (DeepSeek-V3's ``noaux_tc``). Which of exactly tied experts (or groups) is chosen is not
    specified: conformance accepts any choice that is a top-k up to ties (`route_choice`).
    """
    scores, choice = _route_scores(logits, bias, score_func)
    if n_group > 1:
        group_scores = _group_scores(choice, n_group, bias is not None)
        keep_groups = group_scores.topk(topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, keep_groups, True)
        choice = choice.masked_fill(~_expert_mask(group_mask, choice.shape[1]), float("-inf"))
    indices = choice.topk(top_k, dim=-1).indices
    return _route_outputs(scores, indices, top_k, norm_topk_prob, routed_scaling_factor)


def _route_scores(logits: torch.Tensor, bias: torch.Tensor | None,
                  score_func: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, selection scores): the gate's scores in at least fp32, and those plus the bias, detached."""
    if score_func not in ("sigmoid", "softmax"):
        raise ValueError(f"score_func must be 'sigmoid' or 'softmax', got {score_func!r}")
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    scores = x.sigmoid() if score_func == "sigmoid" else x.softmax(dim=-1)
    return scores, scores.detach() if bias is None else scores.detach() + bias.to(x.dtype)


def _group_scores(choice: torch.Tensor, n_group: int, with_bias: bool) -> torch.Tensor:
    tokens, experts = choice.shape
    if experts % n_group:
        raise ValueError(f"{experts} experts do not split into {n_group} groups")
    grouped = choice.view(tokens, n_group, experts // n_group)
    if not with_bias:
        return grouped.amax(dim=-1)
    return grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)


def _expert_mask(group_mask: torch.Tensor, experts: int) -> torch.Tensor:
    tokens, n_group = group_mask.shape
    return group_mask.unsqueeze(-1).expand(tokens, n_group, experts // n_group).reshape(tokens, experts)


def expert_counts(flat_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Picks per expert (int64 ``[num_experts]``) of the expert ids ``flat_ids``. ``index_add_``, not
    ``torch.bincount``: bincount sizes its output from the data, which on a GPU makes the host wait for
    the device (and breaks graph capture and ``torch.compile``); integer sums are exact in any order."""
    return torch.zeros(num_experts, dtype=torch.int64, device=flat_ids.device).index_add_(
        0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int64))


def _route_outputs(scores: torch.Tensor, indices: torch.Tensor, top_k: int, norm_topk_prob: bool,
                   routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    weights = scores.gather(1, indices)
    if norm_topk_prob and top_k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * routed_scaling_factor
    counts = expert_counts(indices.flatten(), scores.shape[1])
    return indices, weights, counts


def check_aux_args(logits: torch.Tensor, batch: int, score_func: str) -> None:
    """`moe_seq_aux_loss`'s argument checks (shared by its implementations): ``ValueError`` if bad."""
    if score_func not in ("sigmoid", "softmax"):
        raise ValueError(f"score_func must be 'sigmoid' or 'softmax', got {score_func!r}")
    tokens = logits.shape[0]
    if batch < 1 or tokens % batch or tokens == 0:
        raise ValueError(f"moe_seq_aux_loss: {tokens} tokens are not {batch} sequences of at least one token")


def moe_seq_aux_loss(logits: torch.Tensor, indices: torch.Tensor, batch: int, *, coef: float,
                     score_func: str = "sigmoid") -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss of one MoE layer: ``coef * mean_b sum_e f[b, e] P[b, e]``.

    ``logits[B*S, E]`` are the router's, ``indices[B*S, k]`` the experts each token picked; the tokens are
    ``batch`` sequences of ``S`` in order. ``P[b, e]`` is the mean over sequence ``b`` of the token's
    scores normalized to sum 1 (sigmoid scores divided by their sum, or the softmax); ``f[b, e]`` is the
    fraction of the sequence's ``S * k`` picks that went to ``e``, times ``E`` (so a uniform spread gives 1).
    Differentiable with respect to ``logits`` only (the picks are counts). Returns a 0-d tensor in at
    least float32."""
    check_aux_args(logits, batch, score_func)
    tokens, experts = logits.shape
    seq, top_k = tokens // batch, indices.shape[1]
    x = logits.to(torch.promote_types(logits.dtype, torch.float32)).view(batch, seq, experts)
    if score_func == "sigmoid":
        scores = x.sigmoid()
        scores = scores / scores.sum(dim=-1, keepdim=True)
    else:
        scores = x.softmax(dim=-1)
    picks = indices.reshape(batch, seq * top_k)
    picked = torch.zeros(batch, experts, dtype=x.dtype, device=x.device).scatter_add_(
        1, picks, torch.ones_like(picks, dtype=x.dtype))
    f = picked * (experts / (top_k * seq))
    return coef * (f * scores.mean(dim=1)).sum(dim=-1).mean()


def route_choice(args: tuple, kwargs: dict, outputs: list, dtype: torch.dtype) -> Callable[..., tuple] | None:
    """`moe_route`'s reference with the backend's ``indices``, if they are a top-k up to ties, else None.

    The choice is correct when every chosen expert lies in a group that a group top-k could keep
    (its group score at least the ``topk_group``-th best minus ``tol``), at most ``topk_group``
    groups are used, and no expert left out of those groups scores above the lowest chosen one by
    more than ``tol``: scores computed from the same inputs by a backend that keeps them in at least
    fp32 differ by a few roundings, so ``tol`` is 16 units of roundoff of ``dtype``'s accumulation
    type, relative to the largest selection score. Exact ties in bf16 logits are common (256 values
    per octave); which of them a backend prefers is not a numerical property.
    """
    logits, bias = args[0], args[1] if len(args) > 1 else kwargs.get("bias")
    indices = outputs[0] if outputs and isinstance(outputs[0], torch.Tensor) else None
    top_k, n_group, topk_group = kwargs["top_k"], kwargs.get("n_group", 1), kwargs.get("topk_group", 1)
    tokens, experts = logits.shape
    if indices is None or indices.is_floating_point() or tuple(indices.shape) != (tokens, top_k):
        return None
    indices = indices.to(device="cpu", dtype=torch.int64)
    if tokens == 0:
        return _given_route(indices)
    if indices.min() < 0 or indices.max() >= experts:
        return None
    if (indices.sort(dim=-1).values.diff(dim=-1) == 0).any():  # an expert chosen twice
        return None
    _, choice = _route_scores(logits, bias, kwargs.get("score_func", "sigmoid"))
    tol = 16 * torch.finfo(torch.promote_types(dtype, torch.float32)).eps * max(1.0, float(choice.abs().max()))
    allowed = torch.ones(tokens, experts, dtype=torch.bool)
    if n_group > 1:
        group_scores = _group_scores(choice, n_group, bias is not None)
        threshold = group_scores.topk(topk_group, dim=-1).values[:, -1:]
        used = torch.zeros(tokens, n_group, dtype=torch.bool).scatter(1, indices // (experts // n_group), True)
        if (used.sum(dim=-1) > topk_group).any() or (group_scores[used] < threshold.expand_as(used)[used] - tol).any():
            return None
        # the experts a correct choice had to consider: those of the groups it used, and of every group
        # that beats the group threshold beyond the tolerance (kept whatever the tie-break)
        allowed = _expert_mask(used | (group_scores > threshold + tol), experts)
    chosen = torch.zeros(tokens, experts, dtype=torch.bool).scatter(1, indices, True)
    lowest = choice.gather(1, indices).amin(dim=-1, keepdim=True)
    if (choice.masked_fill(chosen | ~allowed, float("-inf")) > lowest + tol).any():
        return None
    return _given_route(indices)


def _given_route(indices: torch.Tensor) -> Callable[..., tuple]:
    def route(logits: torch.Tensor, bias: torch.Tensor | None = None, *, top_k: int, n_group: int = 1,
              topk_group: int = 1, score_func: str = "sigmoid", norm_topk_prob: bool = True,
              routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores, _ = _route_scores(logits, bias, score_func)
        return _route_outputs(scores, indices.to(logits.device), top_k, norm_topk_prob, routed_scaling_factor)
    return route


def moe_permute(x: torch.Tensor, indices: torch.Tensor,
                num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x[T, H]``, ``indices[T, k]`` -> ``(x_sorted[T*k, H], sorted_order[T*k], tokens_per_expert[E])``.

    ``sorted_order`` is the stable argsort of ``indices.flatten()``: row ``i`` of ``x_sorted`` is
    token ``sorted_order[i] // k``, and rows of expert ``e`` are contiguous, in token order.
    """
    k = indices.shape[-1]
    flat = indices.flatten()
    sorted_order = torch.sort(flat, stable=True).indices
    counts = expert_counts(flat, num_experts)
    return x.index_select(0, sorted_order // k), sorted_order, counts


def moe_unpermute(y_sorted: torch.Tensor, sorted_order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Inverse of `moe_permute` with the weighted sum: ``out[t] = sum_j weights[t, j] * y[copy (t, j)]``."""
    tokens, k = weights.shape
    inverse = torch.empty_like(sorted_order).scatter_(
        0, sorted_order, torch.arange(sorted_order.numel(), device=sorted_order.device))
    acc = torch.promote_types(y_sorted.dtype, torch.float32)
    y = y_sorted.index_select(0, inverse).to(acc).view(tokens, k, y_sorted.shape[-1])
    return (y * weights.to(acc).unsqueeze(-1)).sum(dim=1).to(y_sorted.dtype)


# -- samples ----------------------------------------------------------------------------------

_ROUTE_CASES = [  # tokens, experts, top_k, n_group, topk_group, score_func, norm, scale, with_bias
    (16, 8, 2, 1, 1, "softmax", False, 1.0, False),
    (32, 64, 6, 1, 1, "sigmoid", True, 2.446, True),
    (24, 32, 8, 8, 4, "sigmoid", True, 2.5, True),
    (7, 16, 4, 4, 2, "sigmoid", False, 1.0, False),
    (1, 4, 1, 1, 1, "softmax", True, 1.0, False),
    (0, 8, 2, 1, 1, "sigmoid", True, 1.0, True),
]


def _route_samples(dtype, device, gen):
    for t, e, k, ng, tg, fn, norm, scale, with_bias in _ROUTE_CASES:
        logits = randn(t, e, dtype=dtype, device=device, generator=gen, scale=2.0)
        bias = randn(e, dtype=torch.float32, device=device, generator=gen, scale=0.1) if with_bias else None
        kwargs = dict(top_k=k, n_group=ng, topk_group=tg, score_func=fn, norm_topk_prob=norm,
                      routed_scaling_factor=scale)
        yield Sample((logits, bias), kwargs, f"T{t}E{e}k{k}g{ng}/{tg}:{fn}", e)
    # exact ties everywhere (logits on a grid of 7 values, exact in every dtype): any tied expert or
    # group may be chosen, and conformance must accept each such choice (`route_choice`)
    for t, e, k, ng, tg, with_bias in [(16, 16, 4, 4, 2, False), (12, 32, 6, 8, 3, True), (9, 8, 3, 1, 1, False)]:
        logits = (torch.randint(-3, 4, (t, e), generator=gen) * 0.5).to(dtype=dtype, device=device)
        bias = (torch.randint(-1, 2, (e,), generator=gen) * 0.25).to(device) if with_bias else None
        kwargs = dict(top_k=k, n_group=ng, topk_group=tg, score_func="sigmoid", norm_topk_prob=True,
                      routed_scaling_factor=2.5)
        yield Sample((logits, bias), kwargs, f"T{t}E{e}k{k}g{ng}/{tg}:ties", e)


def _random_routing(tokens: int, experts: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Distinct experts per token, drawn on the CPU from ``gen``."""
    return torch.rand(tokens, experts, generator=gen).argsort(dim=-1)[:, :k]


def _permute_samples(dtype, device, gen):
    for t, h, e, k in [(16, 32, 8, 2), (33, 64, 64, 6), (1, 8, 4, 1), (0, 16, 4, 2), (9, 17, 3, 3)]:
        x = randn(t, h, dtype=dtype, device=device, generator=gen)
        yield Sample((x, _random_routing(t, e, k, gen).to(device), e), {}, f"T{t}H{h}E{e}k{k}")


def _unpermute_samples(dtype, device, gen):
    for t, h, e, k in [(16, 32, 8, 2), (33, 64, 64, 6), (1, 8, 4, 1), (0, 16, 4, 2), (9, 17, 3, 3)]:
        order = torch.sort(_random_routing(t, e, k, gen).flatten(), stable=True).indices.to(device)
        y = randn(t * k, h, dtype=dtype, device=device, generator=gen)
        w = torch.rand(t, k, generator=gen, dtype=torch.float32).to(device)
        yield Sample((y, order, w), {}, f"T{t}H{h}E{e}k{k}", k)


def _aux_samples(dtype, device, gen):
    # batch, seq, experts, top_k, score_func
    for b, s, e, k, fn in [(2, 16, 8, 2, "sigmoid"), (3, 33, 64, 6, "sigmoid"), (1, 7, 16, 4, "softmax"),
                           (2, 1, 4, 1, "sigmoid"), (2, 130, 256, 8, "sigmoid"), (4, 9, 12, 3, "softmax"),
                           (1, 600, 256, 8, "sigmoid")]:  # more token chunks than the Triton total's tile
        logits = randn(b * s, e, dtype=dtype, device=device, generator=gen, scale=2.0)
        indices = _random_routing(b * s, e, k, gen).to(device)
        yield Sample((logits, indices, b), dict(coef=0.37, score_func=fn), f"B{b}S{s}E{e}k{k}:{fn}", s * e)


OPDEFS = [
    OpDef(name="moe_route",
          signature="moe_route(logits[T, E], bias[E]=None, *, top_k, n_group=1, topk_group=1, "
                    "score_func='sigmoid', norm_topk_prob=True, routed_scaling_factor=1.0) "
                    "-> (indices[T, k], weights[T, k] fp32, tokens_per_expert[E])",
          reference=moe_route, choice=route_choice, samples=_route_samples, grad_inputs=(0,)),
    OpDef(name="moe_permute",
          signature="moe_permute(x[T, H], indices[T, k], num_experts) -> (x_sorted[T*k, H], sorted_order[T*k], "
                    "tokens_per_expert[E])",
          reference=moe_permute, samples=_permute_samples, grad_inputs=(0,)),
    OpDef(name="moe_unpermute",
          signature="moe_unpermute(y_sorted[T*k, H], sorted_order[T*k], weights[T, k]) -> out[T, H]",
          reference=moe_unpermute, samples=_unpermute_samples, grad_inputs=(0, 2)),
    OpDef(name="moe_seq_aux_loss",
          signature="moe_seq_aux_loss(logits[B*S, E], indices[B*S, k], batch, *, coef, score_func='sigmoid') "
                    "-> loss[] fp32",
          reference=moe_seq_aux_loss, samples=_aux_samples, grad_inputs=(0,)),
]
