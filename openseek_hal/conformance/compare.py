"""Comparing what a backend computed with what the float64 reference computed.

Floating tensors pass when every element satisfies ``|actual - expected| <= atol + rtol * |expected|``
(given ``norm_rtol``, also ``||actual - expected|| <= norm_rtol * ||expected||`` over the tensor)
or lies within twice the *rounding floor* (the error of the reference itself run in the dtype under
test, when the caller supplies that run), and NaN / +-Inf sit at exactly the same positions (NaN
where the reference has NaN is correct, not an error). Integer and boolean tensors must be equal
element for element; non-tensor outputs must be equal. One `Comparison` sums up a whole (possibly
nested) output so that a report row can say which output and which element was worst.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..ops.opdef import NORM_RTOL, roundoff


@dataclass
class Comparison:
    ok: bool
    max_abs_err: float | None = None
    max_rel_err: float | None = None
    message: str = ""
    # the worst |actual - expected| / (atol + rtol * |expected|): below 1 passes; how close to the bound
    err_ratio: float | None = None


def tree_map(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """Apply ``fn`` to every tensor inside tuples, lists and dict values of ``obj``."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(tree_map(fn, o) for o in obj)
    if isinstance(obj, dict):
        return {k: tree_map(fn, v) for k, v in obj.items()}
    return obj


def to_reference(t: torch.Tensor) -> torch.Tensor:
    """The reference's copy of an input: floating tensors become float64 on the CPU, others move as they are.

    Always a copy, so an op that updates its inputs in place (an optimizer step) cannot change the sample.
    """
    return t.detach().to(device="cpu", dtype=torch.float64 if t.is_floating_point() else t.dtype, copy=True)


def flatten(obj: Any) -> list[Any]:
    """The leaves of a nested output, in order (a single tensor is a one-leaf output)."""
    if isinstance(obj, (tuple, list)):
        return [leaf for o in obj for leaf in flatten(o)]
    return [obj]


def _worst(a: torch.Tensor, e: torch.Tensor) -> tuple[float, float]:
    finite = torch.isfinite(a) & torch.isfinite(e)
    if not finite.any():
        return 0.0, 0.0
    diff = (a - e).abs()[finite]
    rel = diff / e.abs()[finite].clamp(min=torch.finfo(torch.float64).tiny)
    return float(diff.max()), float(rel.max())


def compare_tensor(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float,
                   floor: torch.Tensor | None = None, norm_rtol: float | None = None,
                   error_scale: torch.Tensor | None = None) -> Comparison:
    if tuple(actual.shape) != tuple(expected.shape):
        return Comparison(False, message=f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    if not expected.is_floating_point():
        if actual.is_floating_point() or actual.is_complex():
            return Comparison(False, message=f"dtype {actual.dtype}, expected an integer tensor")
        a, e = actual.detach().cpu().to(expected.dtype), expected
        bad = int((a != e).sum())
        if bad:
            first = tuple(int(i) for i in (a != e).nonzero()[0])
            return Comparison(False, message=f"{bad} of {e.numel()} integer elements differ "
                                             f"(first at {first}: {a[first].item()} vs {e[first].item()})")
        return Comparison(True, 0.0, 0.0)
    if not actual.is_floating_point():
        return Comparison(False, message=f"dtype {actual.dtype}, expected a floating tensor")
    a, e = actual.detach().cpu().to(torch.float64), expected.detach().cpu().to(torch.float64)
    max_abs, max_rel = _worst(a, e)
    nan_a, nan_e = a.isnan(), e.isnan()
    if not torch.equal(nan_a, nan_e):
        missing, extra = int((nan_e & ~nan_a).sum()), int((nan_a & ~nan_e).sum())
        return Comparison(False, max_abs, max_rel,
                          f"NaN mismatch: {extra} NaN where the reference is not, {missing} missing")
    inf_e = e.isinf()
    if not torch.equal(a.isinf(), inf_e) or not torch.equal(a[inf_e], e[inf_e]):
        return Comparison(False, max_abs, max_rel, "+-Inf at different positions than the reference")
    finite = ~(nan_e | inf_e)
    allowed = atol + rtol * e.abs()
    floor_err = None
    if floor is not None and floor.shape == e.shape and floor.is_floating_point():
        # the op computed in this dtype by the reference itself errs this much: no backend can be asked
        # to do much better (bf16 sums that cancel, say)
        floor_err = (floor.detach().cpu().to(torch.float64) - e).abs()
        floor_err = torch.where(floor_err.isfinite(), floor_err, torch.zeros_like(e))
        allowed = torch.maximum(allowed, 2 * floor_err)
    bound = None
    if error_scale is not None and error_scale.shape == e.shape:
        # the op's own rounding-error bound (OpDef.error_scale), in units of the roundoff of the dtype
        # it computes in; the rounding of a narrower output is the element-wise rtol's
        bound = error_scale.detach().cpu().to(torch.float64).abs() * roundoff(actual.dtype)
        bound = torch.where(bound.isfinite(), bound, torch.zeros_like(e))
        allowed = torch.maximum(allowed, bound)
    excess = torch.where(finite, (a - e).abs() / allowed, torch.zeros_like(e))
    ratio = float(excess.max()) if excess.numel() else 0.0
    bad = excess > 1
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        return Comparison(False, max_abs, max_rel,
                          f"{int(bad.sum())} of {e.numel()} elements out of tolerance "
                          f"(first at {idx}: {a[idx].item():.6g} vs {e[idx].item():.6g})", ratio)
    if norm_rtol is not None and finite.any():
        # a tensor kept in a wider or narrower dtype than the one under test (fp32 routing weights
        # of a bf16 op, say) is held to the bound of the less precise of the two
        norm_rtol = max(norm_rtol, NORM_RTOL.get(actual.dtype, norm_rtol))
        ref_norm = float(e[finite].norm())
        if ref_norm > 0:
            err_norm = float((a - e)[finite].norm())
            allowed_norm = norm_rtol * ref_norm
            if floor_err is not None:
                allowed_norm = max(allowed_norm, 2 * float(floor_err[finite].norm()))
            if bound is not None:
                allowed_norm = max(allowed_norm, float(bound[finite].norm()))
            ratio = max(ratio, err_norm / allowed_norm if allowed_norm > 0 else float(err_norm > 0) * 2)
            if err_norm > allowed_norm:
                return Comparison(False, max_abs, max_rel,
                                  f"norm-wise error {err_norm / ref_norm:.3g} of the reference's norm "
                                  f"(tolerance {allowed_norm / ref_norm:.3g})", ratio)
    return Comparison(True, max_abs, max_rel, err_ratio=ratio)


def compare_leaf(actual: Any, expected: Any, rtol: float, atol: float, floor: Any = None,
                 norm_rtol: float | None = None, error_scale: Any = None) -> Comparison:
    if isinstance(expected, torch.Tensor):
        if not isinstance(actual, torch.Tensor):
            return Comparison(False, message=f"got {type(actual).__name__}, expected a tensor")
        return compare_tensor(actual, expected, rtol, atol, floor if isinstance(floor, torch.Tensor) else None,
                              norm_rtol, error_scale if isinstance(error_scale, torch.Tensor) else None)
    if expected is None and actual is None:
        return Comparison(True)
    if actual != expected:
        return Comparison(False, message=f"got {actual!r}, expected {expected!r}")
    return Comparison(True)


def compare_all(actual: list[Any], expected: list[Any], rtol: float, atol: float,
                what: str = "output", floor: list[Any] | None = None, norm_rtol: float | None = None,
                error_scale: list[Any] | None = None) -> Comparison:
    """Compare leaf lists; the result carries the worst errors and the first failing leaf's message."""
    if len(actual) != len(expected):
        return Comparison(False, message=f"{len(actual)} {what}s, expected {len(expected)}")
    worst_abs: float | None = None
    worst_rel: float | None = None
    worst_ratio: float | None = None
    failure = ""
    for i, (a, e) in enumerate(zip(actual, expected)):
        c = compare_leaf(a, e, rtol, atol, floor[i] if floor is not None and i < len(floor) else None, norm_rtol,
                         error_scale[i] if error_scale is not None and i < len(error_scale) else None)
        if c.max_abs_err is not None:
            worst_abs = max(worst_abs or 0.0, c.max_abs_err)
            worst_rel = max(worst_rel or 0.0, c.max_rel_err or 0.0)
        if c.err_ratio is not None:
            worst_ratio = max(worst_ratio or 0.0, c.err_ratio)
        if not c.ok and not failure:
            failure = f"{what} {i}: {c.message}" if len(expected) > 1 else c.message
    return Comparison(not failure, worst_abs, worst_rel, failure, worst_ratio)


def bitwise_equal(a: Any, b: Any) -> bool:
    """Same bits, NaN included (two runs of a deterministic op must agree exactly)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
        if a.is_floating_point() and a.numel():
            width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
            return torch.equal(a.view(width), b.view(width))
        return torch.equal(a, b)
    return a == b
