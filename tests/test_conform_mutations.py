"""Mutation test: planted faults in every op must each make `conform` fail, in fp32 and in bf16.

Each fault is the reference with one bug a kernel author could make: generic ones applied to every op
(an output off by 1/16, an input gradient off by 1/16, the output shifted by one position) and ones
specific to an op (an argument ignored, a term dropped, a wrong reduction length, an off-by-one
boundary). A backend that only delegates to the references must pass. The op level runs with its
default samples in fp32 and in bf16 only, so every fault is caught without float64 (a chip may
have none).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from openseek_hal import ops
from openseek_hal.backend import register_backend, unregister_backend
from openseek_hal.backends.cpu import CPUBackend
from openseek_hal.conformance import SuiteConfig, run_suite
from openseek_hal.ops import fp8 as fp8_ops
from openseek_hal.ops.attention import document_ids

DTYPES = [torch.float32, torch.bfloat16]
OFF = 1.0 + 1.0 / 16  # a 6% error: far outside every band, far inside what a bug does


def _ref(name: str) -> Callable[..., Any]:
    return ops.get(name).reference


def _bind(name: str, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    bound = inspect.signature(_ref(name)).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound


def _map_float_outputs(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(out, torch.Tensor):
        return fn(out) if out.is_floating_point() else out
    if isinstance(out, (tuple, list)):
        return type(out)(_map_float_outputs(o, fn) for o in out)
    return out


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


# -- generic faults -----------------------------------------------------------------------------
def output_scaled(name: str) -> Callable[..., Any]:
    def fn(*args, **kwargs):
        return _map_float_outputs(_ref(name)(*args, **kwargs), lambda t: t * OFF)
    return fn


def gradient_scaled(name: str) -> Callable[..., Any]:
    def fn(*args, **kwargs):
        args = tuple(_ScaleGrad.apply(a, OFF) if isinstance(a, torch.Tensor) and a.requires_grad else a for a in args)
        return _ref(name)(*args, **kwargs)
    return fn


def shifted(name: str) -> Callable[..., Any]:
    def roll(t: torch.Tensor) -> torch.Tensor:
        return t.roll(1, dims=0) if t.dim() and t.shape[0] > 1 else t

    def fn(*args, **kwargs):
        out = _ref(name)(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return _map_float_outputs(out, roll)
        first = next(i for i, o in enumerate(out) if isinstance(o, torch.Tensor) and o.is_floating_point())
        return type(out)(roll(o) if i == first else o for i, o in enumerate(out))
    return fn


GENERIC = {"output_scaled": output_scaled, "gradient_scaled": gradient_scaled, "shifted": shifted}


def _generic_applies(fault: str, name: str) -> bool:
    opdef = ops.get(name)
    if fault == "gradient_scaled":
        return opdef.differentiable
    if fault == "shifted":  # adamw's outputs are lists in the caller's order; a loss is one number
        return name not in ("adamw", "cross_entropy", "linear_cross_entropy", "sum_of_squares", "moe_seq_aux_loss")
    return True


# -- op-specific faults -------------------------------------------------------------------------
def _with(name: str, **changes: Any) -> Callable[..., Any]:
    """The reference with some arguments replaced (an ignored or misread argument)."""
    def fn(*args, **kwargs):
        bound = _bind(name, args, kwargs)
        for key, change in changes.items():
            bound.arguments[key] = change(bound.arguments[key]) if callable(change) else change
        return _ref(name)(*bound.args, **bound.kwargs)
    return fn


def _adamw_remainders_ignored(*args, **kwargs):
    """Masters kept as remainders updated as if the bf16 weights were the whole master."""
    remainders = kwargs.pop("param_remainders", None)
    out = _ref("adamw")(*args, **kwargs)
    if remainders is None:
        return out
    return out[0], out[1], out[2], [torch.zeros_like(r) for r in remainders]


def _adamw_remainders_rounded_to_even(*args, **kwargs):
    """The weight rounded to nearest even and the remainder taken from it: an exact half rounded down
    needs +2**15, which wraps in int16 (the master then moves by one bf16 unit)."""
    remainders = kwargs.get("param_remainders")
    out = _ref("adamw")(*args, **kwargs)
    if remainders is None:
        return out
    masters = [ops.optim.join_master(w, r) for w, r in zip(out[0], out[3])]
    weights = [m.to(torch.bfloat16) for m in masters]
    rests = [(m.view(torch.int32) - (w.view(torch.int16).to(torch.int32) << 16)).to(torch.int16)
             for m, w in zip(masters, weights)]
    return [w.to(p.dtype) for w, p in zip(weights, out[0])], out[1], out[2], rests


def _mla_key_rope_unrotated(q, kv, k_rope, cos, sin, interleaved=False):
    """The shared rotary key joined as it came from the projection (the query's part still rotated)."""
    q_out, _, v = _ref("mla_qkv")(q, kv, k_rope, cos, sin, interleaved)
    b, s, h, _ = q.shape
    nope = q.shape[-1] - k_rope.shape[-1]
    k_out = torch.cat([kv[..., :nope], k_rope.unsqueeze(2).expand(b, s, h, k_rope.shape[-1])], dim=-1)
    return q_out, k_out, v


def _mla_value_one_late(q, kv, k_rope, cos, sin, interleaved=False):
    """v read one element late (the key's last element in, the value's last out)."""
    q_out, k_out, _ = _ref("mla_qkv")(q, kv, k_rope, cos, sin, interleaved)
    nope = q.shape[-1] - k_rope.shape[-1]
    return q_out, k_out, kv[..., nope - 1:-1]


def _ce_mean_over_all_rows(logits, target, ignore_index=-100, reduction="mean", z_loss=0.0, inplace_backward=False):
    total = ops.get("cross_entropy").reference(logits, target, ignore_index, "sum", z_loss)
    return total if reduction == "sum" else total / max(1, target.numel())


def _lce_mean_over_all_rows(x, weight, target, ignore_index=-100, z_loss=0.0):
    total = ops.get("cross_entropy").reference(F.linear(x, weight), target, ignore_index, "sum", z_loss)
    return total / max(1, target.numel())


def _attention_sees_next_token(q, k, v, scale=None, cu_seqlens=None):
    s = q.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    mask = torch.ones(s, k.shape[-2], dtype=torch.bool, device=q.device).tril(diagonal=1)  # one step ahead
    if cu_seqlens is not None:
        doc = document_ids(cu_seqlens, q.shape[0], s)
        mask = mask & (doc[:, :, None] == doc[:, None, :])[:, None]
    return (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v.double()).to(q.dtype)


def _boundaries_one_late(cu):
    """Every inner document boundary one token later (a prefix-sum off by one)."""
    if cu is None or cu.numel() < 3:
        return cu
    cu = cu.clone()
    cu[1:-1] = torch.minimum(cu[1:-1] + 1, cu[-1])
    return cu


def _swapped_halves(x):
    gate, up = x.chunk(2, dim=-1)
    return _ref("silu_and_mul")(torch.cat([up, gate], dim=-1))


def _counts_off_by_one(x, weight, counts):
    counts = counts.clone()
    if counts.numel() > 1 and counts[0] > 0:
        counts[0] -= 1
        counts[1] += 1
    return _ref("grouped_linear")(x, weight, counts)


def _embedding_next_row(ids, weight):
    return _ref("embedding")((ids + 1) % weight.shape[0], weight)


def _add_rms_norm_without_residual(x, residual, weight, eps=1e-6):
    return _ref("rms_norm")(x, weight, eps), x + residual


def _unpermute_unweighted(y_sorted, sorted_order, weights):
    return _ref("moe_unpermute")(y_sorted, sorted_order, torch.ones_like(weights))


def _permute_reversed_within_expert(x, indices, num_experts):
    # the rows of each expert in reverse token order: a sort that is not stable
    k = indices.shape[-1]
    flat = indices.flatten()
    key = flat * flat.numel() + (flat.numel() - 1 - torch.arange(flat.numel(), device=flat.device))
    order = torch.sort(key).indices
    return x.index_select(0, order // k), order, torch.bincount(flat, minlength=num_experts)


def _quantize_first_scale_doubled(x, tile="1x128"):
    q, scale = _ref("fp8_quantize")(x, tile)
    scale = scale.clone()
    if scale.numel():
        scale.view(-1)[0] *= 2
    return q, scale


def _quantize_ties_away_from_zero(x, tile="1x128"):
    """Round half away from zero instead of half to even (the ties of the samples must catch it)."""
    q, scale = _ref("fp8_quantize")(x, tile)
    y = (x.float().double() / fp8_ops.expand_scale(scale.double(), *x.shape)).float().double()
    a = y.abs().clamp(max=fp8_ops.FP8_MAX)
    _, e = torch.frexp(a)
    ulp = torch.ldexp(torch.ones_like(a), (e - 1).clamp(min=-6) - 3)
    return torch.copysign(torch.floor(a / ulp + 0.5) * ulp, y).to(q.dtype), scale


def _gemm_first_a_scale_doubled(a_q, a_scale, b_q, b_scale, out_dtype="bfloat16"):
    a_scale = a_scale.clone()
    if a_scale.numel():
        a_scale.view(-1)[0] *= 2
    return _ref("fp8_gemm")(a_q, a_scale, b_q, b_scale, out_dtype)


def _gemm_b_scales_read_padded(a_q, a_scale, b_q, b_scale, out_dtype="bfloat16"):
    """B's 128x128 scales read as cuBLAS reads an unpadded ``[K/128, N/128]`` view: block (nb, kb) at
    ``nb * round_up(K/128, 4) + kb`` of the storage (wrapped: past its end is other memory)."""
    nb, kb = b_scale.shape
    if b_scale.shape[0] == b_q.shape[0] and b_q.shape[0] > 1:  # B per 1x128: another layout
        return _ref("fp8_gemm")(a_q, a_scale, b_q, b_scale, out_dtype)
    flat = b_scale.reshape(-1)
    idx = (torch.arange(nb)[:, None] * (-(-kb // 4) * 4) + torch.arange(kb)[None, :]) % flat.numel()
    return _ref("fp8_gemm")(a_q, a_scale, b_q, flat[idx.to(flat.device)], out_dtype)


def _drop_k_tail(q):
    k = q.shape[-1]
    if k % 128 == 0 or k < 128:
        return q
    wide = q.to(torch.float64)
    wide[..., k // 128 * 128:] = 0
    return wide.to(q.dtype)


def _gemm_k_tail_dropped(a_q, a_scale, b_q, b_scale, out_dtype="bfloat16"):
    return _ref("fp8_gemm")(_drop_k_tail(a_q), a_scale, b_q, b_scale, out_dtype)


def _boundary_off_by_one(counts):
    """The first expert with tokens gives its last row to the next expert (an off-by-one expert boundary)."""
    counts = counts.clone()
    nonzero = (counts > 0).nonzero()
    if nonzero.numel() and int(nonzero[0]) + 1 < counts.numel():
        i = int(nonzero[0])
        counts[i] -= 1
        counts[i + 1] += 1
    return counts


def _grouped_gemm_boundary_off_by_one(a_q, a_scale, b_q, b_scale, counts, out_dtype="bfloat16"):
    return _ref("fp8_grouped_gemm")(a_q, a_scale, b_q, b_scale, _boundary_off_by_one(counts), out_dtype)


def _grouped_gemm_expert_scales_reversed(a_q, a_scale, b_q, b_scale, counts, out_dtype="bfloat16"):
    return _ref("fp8_grouped_gemm")(a_q, a_scale, b_q, b_scale.flip(0), counts, out_dtype)


class _DropTailGrad(torch.autograd.Function):
    """Identity forward; the backward loses the gradient of the last, partial 128-wide tile (a masking bug)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        k = g.shape[-1]
        if k % 128 and k > 128:
            g = g.clone()
            g[..., k // 128 * 128:] = 0
        return g


def _linear_first_tile_doubled(x, weight):
    bump = torch.zeros_like(x)
    flat = bump.view(-1, x.shape[-1])
    if flat.shape[0]:
        flat[0, :128] = x.detach().reshape(-1, x.shape[-1])[0, :128]
    return _ref("fp8_linear")(x + bump, weight)


def _linear_dx_tail_dropped(x, weight):
    return _ref("fp8_linear")(_DropTailGrad.apply(x) if x.requires_grad else x, weight)


def _grouped_linear_boundary_off_by_one(x, weight, counts):
    return _ref("fp8_grouped_linear")(x, weight, _boundary_off_by_one(counts))


def _grouped_linear_dx_tail_dropped(x, weight, counts):
    return _ref("fp8_grouped_linear")(_DropTailGrad.apply(x) if x.requires_grad else x, weight, counts)


def _add_rows_last_wins(total, ids, rows):
    """Repeated ids not summed: each id's row gets only its last token's row (a plain scatter)."""
    out = total.clone()
    flat = rows.reshape(-1, total.shape[1]).to(total.dtype)
    out.index_put_((ids.reshape(-1),), out[ids.reshape(-1)] + flat)
    return out


def _add_rows_table_ignored(total, ids, rows):
    """The rows put into a fresh zero table: the head's gradient already in ``total`` is lost."""
    return _ref("embedding_add_rows")(torch.zeros_like(total), ids, rows)


SPECIFIC: dict[str, dict[str, Callable[..., Any]]] = {
    "rms_norm": {"eps_ignored": _with("rms_norm", eps=lambda e: e * 1e4)},
    "add_rms_norm": {"residual_not_returned": _add_rms_norm_without_residual,
                     "eps_ignored": _with("add_rms_norm", eps=lambda e: e * 1e4)},
    "silu_and_mul": {"halves_swapped": _swapped_halves},
    "rope": {"layout_ignored": _with("rope", interleaved=lambda i: not i)},
    "cross_entropy": {"z_loss_ignored": _with("cross_entropy", z_loss=0.0),
                      "ignore_index_ignored": _with("cross_entropy", ignore_index=-12345),
                      "mean_over_all_rows": _ce_mean_over_all_rows},
    "linear_cross_entropy": {"z_loss_ignored": _with("linear_cross_entropy", z_loss=0.0),
                             "ignore_index_ignored": _with("linear_cross_entropy", ignore_index=-12345),
                             "mean_over_all_rows": _lce_mean_over_all_rows},
    "embedding": {"off_by_one_row": _embedding_next_row},
    "embedding_add_rows": {"last_wins": _add_rows_last_wins, "table_ignored": _add_rows_table_ignored},
    "mla_qkv": {"layout_flipped": _with("mla_qkv", interleaved=lambda i: not i),
                "key_rope_unrotated": _mla_key_rope_unrotated, "value_one_late": _mla_value_one_late},
    "causal_attention": {"scale_ignored": _with("causal_attention", scale=None),
                         "mask_off_by_one": _attention_sees_next_token,
                         "cu_seqlens_ignored": _with("causal_attention", cu_seqlens=None),
                         "cu_seqlens_off_by_one": _with("causal_attention", cu_seqlens=_boundaries_one_late)},
    "moe_route": {"scaling_factor_ignored": _with("moe_route", routed_scaling_factor=1.0),
                  "normalisation_ignored": _with("moe_route", norm_topk_prob=lambda n: not n),
                  "bias_ignored": _with("moe_route", bias=None),
                  "groups_ignored": _with("moe_route", n_group=1, topk_group=1)},
    "moe_permute": {"unstable_order": _permute_reversed_within_expert},
    "moe_unpermute": {"weights_ignored": _unpermute_unweighted},
    "moe_seq_aux_loss": {"sequences_pooled": _with("moe_seq_aux_loss", batch=1),
                         "first_pick_only": _with("moe_seq_aux_loss", indices=lambda i: i[:, :1]),
                         "score_func_swapped": _with("moe_seq_aux_loss", score_func=lambda f: {
                             "sigmoid": "softmax", "softmax": "sigmoid"}[f])},
    "grouped_linear": {"boundary_off_by_one": _counts_off_by_one},
    "adamw": {"weight_decay_ignored": _with("adamw", weight_decay=0.0),
              "grad_scale_ignored": _with("adamw", grad_scale=None),
              "no_bias_correction": _with("adamw", step=lambda s: 10**6),
              "remainders_ignored": _adamw_remainders_ignored,
              "remainders_rounded_to_even": _adamw_remainders_rounded_to_even},
    "fp8_quantize": {"one_tile_scale_doubled": _quantize_first_scale_doubled,
                     "ties_away_from_zero": _quantize_ties_away_from_zero,
                     "tile_kind_ignored": _with("fp8_quantize", tile=lambda t: "1x128")},
    "fp8_gemm": {"one_tile_scale_doubled": _gemm_first_a_scale_doubled, "k_tail_dropped": _gemm_k_tail_dropped,
                 "b_scales_read_padded": _gemm_b_scales_read_padded},
    "fp8_grouped_gemm": {"boundary_off_by_one": _grouped_gemm_boundary_off_by_one,
                         "expert_scales_reversed": _grouped_gemm_expert_scales_reversed},
    "fp8_linear": {"one_tile_scale_doubled": _linear_first_tile_doubled, "dx_tail_dropped": _linear_dx_tail_dropped},
    "fp8_grouped_linear": {"boundary_off_by_one": _grouped_linear_boundary_off_by_one,
                           "dx_tail_dropped": _grouped_linear_dx_tail_dropped},
    "sum_of_squares": {"first_tensor_dropped": lambda tensors: _ref("sum_of_squares")(tensors[1:]),
                       "norm_returned": lambda tensors: _ref("sum_of_squares")(tensors).sqrt()},
}

CASES = [(name, fault, functools.partial(make, name)) for name in ops.REGISTRY for fault, make in GENERIC.items()
         if _generic_applies(fault, name)]
CASES += [(name, fault, functools.partial(lambda impl: impl, impl)) for name, faults in SPECIFIC.items()
          for fault, impl in faults.items()]


def _suite(name: str, impl: Callable[..., Any] | None, dtype: torch.dtype):
    natives = {} if impl is None else {name: impl}
    cls = type("Mutant", (CPUBackend,), {
        "name": f"mutant-{name}", "native_ops": lambda self: {**CPUBackend.native_ops(self), **natives}})
    register_backend(cls)
    try:
        return run_suite(SuiteConfig(backend=cls.name, levels=("ops",), ops=[name], dtypes=[dtype], seed=0))
    finally:
        unregister_backend(cls.name)


def test_every_op_has_specific_faults():
    assert set(SPECIFIC) == set(ops.REGISTRY)


@pytest.mark.parametrize("name", sorted(ops.REGISTRY))
def test_a_delegating_backend_passes(name):
    for dtype in DTYPES:
        result = _suite(name, None, dtype)
        assert result.ok, [(c.sample, c.check, c.message) for c in result.failures()][:3]


@pytest.mark.parametrize(("name", "fault", "make"), CASES, ids=[f"{n}-{f}" for n, f, _ in CASES])
def test_planted_fault_fails_conformance(name, fault, make):
    for dtype in DTYPES:
        result = _suite(name, make(), dtype)
        assert not result.ok, f"{name} with fault {fault} passed conformance in {dtype}"
        assert {c.op for c in result.failures()} == {name}
