"""Op level: every OpDef x dtype x sample on a backend, against the float64 reference on the CPU.

For each (op, dtype) the OpDef's samples are drawn from a generator seeded by
``derive_seed(seed, op, dtype)``, so ``--op NAME --dtype D --seed S`` replays exactly the inputs of a
full run. Each sample runs on the backend and, cast to float64 on the CPU (integer tensors as they
are), through the op's reference. Checks per sample:

- ``forward``: every output leaf (integers exactly, floats within ``OpDef.tol`` or within twice the
  error that the reference itself makes when run on the CPU in the dtype under test);
- ``backward``: a seeded random upstream gradient on every differentiable floating output, and the
  gradients of the OpDef's ``grad_inputs`` compared the same way;
- ``determinism``: a second run (forward and backward) must give the same bits, unless the OpDef
  says the op is not deterministic.

Beyond the OpDef's own samples the suite adds, generically: a non-contiguous copy of every sample
(column-major / every-other-element layout, same values), leading-dimension-0 and -1 slices of the
first sample, and a ``nan_inf`` check (a NaN and an Inf planted in the first differentiable input:
the NaN/Inf positions of every floating output must match the reference's).
"""

from __future__ import annotations

import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from .. import ops
from ..backend import Backend, OpFallbackWarning
from ..errors import MissingOpError
from ..ops import OpDef, Sample
from .compare import Comparison, bitwise_equal, compare_all, flatten, to_reference, tree_map
from .manifest import Manifest, dtype_name
from .records import CheckResult

QUICK_DTYPES = (torch.float32, torch.bfloat16)


def derive_seed(seed: int, *parts: str) -> int:
    """A stable 31-bit seed for one part of a run, so that any part can be replayed alone."""
    return zlib.crc32(":".join((str(seed), *parts)).encode()) & 0x7FFFFFFF


def replay_command(backend: str, op: str, dtype: str, seed: int) -> str:
    return f"openseek-hal conform --backend {backend} --level ops --op {op} --dtype {dtype} --seed {seed}"


def error_text(e: BaseException) -> str:
    """One line about an exception, for a report row."""
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _shape_text(args: tuple[Any, ...]) -> str:
    return ",".join("x".join(map(str, a.shape)) or "scalar" for a in args if isinstance(a, torch.Tensor))


# -- sample variants ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    sample: Sample
    label: str
    generic: bool  # made by the suite, not declared by the OpDef: dropped when the reference rejects it


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (transposed storage, or every other element)."""
    if t.dim() >= 2 and t.shape[-1] > 1 and t.shape[-2] > 1:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    out = wide[..., ::2]
    out.copy_(t)
    return out


def _noncontig_variant(sample: Sample) -> Variant | None:
    changed = False
    args = []
    for a in sample.args:
        if isinstance(a, torch.Tensor) and a.dim() >= 1 and a.numel() > 1:
            a, changed = _non_contiguous(a), True
        args.append(a)
    if not changed:
        return None
    return Variant(replace(sample, args=tuple(args)), f"{sample.name}:noncontig", True)


def _leading_variants(sample: Sample) -> Iterator[Variant]:
    """The first sample cut to 0 and to 1 along the leading dimension of its first tensor."""
    first = next((a for a in sample.args if isinstance(a, torch.Tensor)), None)
    if first is None or first.dim() == 0 or first.shape[0] < 2:
        return
    lead = first.shape[0]
    for n in (0, 1):
        args = tuple(a[:n] if isinstance(a, torch.Tensor) and a.dim() >= 1 and a.shape[0] == lead else a
                     for a in sample.args)
        yield Variant(replace(sample, args=args), f"{sample.name}:lead{n}", True)


def variants(samples: list[Sample], quick: bool) -> list[Variant]:
    if quick and len(samples) > 3:
        samples = [*samples[:2], samples[-1]]  # the last sample is usually the declared strided one
    samples = [s if s.name else replace(s, name=f"sample{i}") for i, s in enumerate(samples)]
    out = [Variant(s, s.name, False) for s in samples]
    for i, s in enumerate(samples):
        if quick and i > 0:
            break
        v = _noncontig_variant(s)
        if v is not None:
            out.append(v)
    if samples:
        out.extend(_leading_variants(samples[0]))
    return out


# -- running one sample -------------------------------------------------------------------------

def _leaf(t: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    """A fresh leaf with the same values *and strides* as ``t`` (layout is part of what is tested)."""
    try:
        out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
        out.copy_(t)
    except RuntimeError:  # overlapping strides (an expanded tensor): keep the values, lose the layout
        out = t.detach().clone()
    return out.requires_grad_(requires_grad)


def grad_positions(opdef: OpDef, args: tuple[Any, ...]) -> list[int]:
    if not opdef.differentiable:
        return []
    candidates = range(len(args)) if opdef.grad_inputs is None else opdef.grad_inputs
    return [i for i in candidates
            if i < len(args) and isinstance(args[i], torch.Tensor) and args[i].is_floating_point()]


@dataclass
class Run:
    outputs: list[Any]
    grads: list[torch.Tensor | None] | None  # None: no backward was run
    backward_error: str = ""


def run_once(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], grad_pos: list[int],
             upstream: Callable[[int, torch.Tensor], torch.Tensor] | None, diff_outputs: list[int] | None) -> Run:
    """Call ``fn`` on fresh leaves; when ``upstream`` is given, backpropagate it into ``grad_pos``.

    ``diff_outputs`` lists the output leaves that get an upstream gradient (those of the reference
    that are differentiable); None means: every floating output that requires grad.
    """
    # every tensor is copied, also inside lists (adamw's), so an op that updates in place cannot change the sample
    leaves = tuple(_leaf(a, i in grad_pos) if isinstance(a, torch.Tensor) else tree_map(lambda t: t.detach().clone(), a)
                   for i, a in enumerate(args))
    kw = tree_map(lambda t: t.detach().clone(), kwargs)
    with torch.enable_grad():
        out = flatten(fn(*leaves, **kw))
    if upstream is None or not grad_pos:
        return Run(out, None)
    if diff_outputs is None:
        diff_outputs = [i for i, o in enumerate(out)
                        if isinstance(o, torch.Tensor) and o.is_floating_point() and o.requires_grad]
    try:
        targets = [out[i] for i in diff_outputs]
        missing = [i for i, o in zip(diff_outputs, targets) if not (isinstance(o, torch.Tensor) and o.requires_grad)]
        if missing:
            raise RuntimeError(f"output {missing[0]} does not require grad: the op has no backward")
        grads = torch.autograd.grad(targets, [leaves[i] for i in grad_pos],
                                    [upstream(i, o) for i, o in zip(diff_outputs, targets)], allow_unused=True)
    except Exception as e:  # a broken backward is a finding about the backend, reported per check
        return Run([o.detach() if isinstance(o, torch.Tensor) else o for o in out], None, error_text(e))
    grads = [torch.zeros_like(leaves[i]) if g is None else g for i, g in zip(grad_pos, grads)]
    return Run([o.detach() if isinstance(o, torch.Tensor) else o for o in out], [g.detach() for g in grads])


# -- the op level -------------------------------------------------------------------------------

@dataclass
class OpLevel:
    backend: Backend
    manifest: Manifest
    seed: int
    quick: bool = False
    sample_filter: str = ""  # run only samples whose label starts with this (replay)

    def dtypes_for(self, opdef: OpDef, wanted: list[torch.dtype] | None) -> list[torch.dtype]:
        dtypes = [d for d in opdef.dtypes if wanted is None or d in wanted]
        if self.quick and wanted is None:
            dtypes = [d for d in dtypes if d in QUICK_DTYPES] or dtypes[:1]
        return dtypes

    def run(self, op_names: list[str], wanted_dtypes: list[torch.dtype] | None,
            advance: Callable[[str], None] = lambda _: None) -> list[CheckResult]:
        results: list[CheckResult] = []
        for name in op_names:
            opdef = ops.get(name)
            for dtype in self.dtypes_for(opdef, wanted_dtypes):
                advance(f"{name} {dtype_name(dtype)}")
                results.extend(self.manifest.apply(r) for r in self.run_op_dtype(opdef, dtype))
        return results

    def run_op_dtype(self, opdef: OpDef, dtype: torch.dtype) -> list[CheckResult]:
        dt = dtype_name(dtype)
        seed = derive_seed(self.seed, opdef.name, dt)
        base = dict(level="ops", op=opdef.name, dtype=dt, seed=self.seed,
                    impl="native" if self.backend.has_native(opdef.name) else "fallback",
                    replay=replay_command(self.backend.name, opdef.name, dt, self.seed))
        skip = self.manifest.skip_reason(dt)
        if skip:
            return [CheckResult(**base, check="forward", status="skip", message=skip)]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OpFallbackWarning)
                fn = self.backend.op(opdef.name)
        except MissingOpError as e:
            return [CheckResult(**base, check="forward", status="error", message=str(e))]
        generator = torch.Generator().manual_seed(seed)
        try:
            samples = list(opdef.samples(dtype, self.backend.device.torch_device, generator))
        except Exception as e:
            return [CheckResult(**base, check="forward", status="error",
                                message=f"drawing the samples on the backend's device raised {error_text(e)}")]
        results = []
        for index, variant in enumerate(variants(samples, self.quick)):
            if self.sample_filter and not variant.label.startswith(self.sample_filter):
                continue
            results.extend(self.run_variant(opdef, fn, dtype, variant, derive_seed(seed, str(index)), base))
        nan_sample = next((v for v in variants(samples, False) if not v.generic and _poison_target(opdef, v.sample)
                           is not None and v.label.startswith(self.sample_filter)), None)
        if nan_sample is not None:
            results.append(self.run_nan_inf(opdef, fn, dtype, nan_sample, base))
        return results

    def _reference(self, opdef: OpDef, sample: Sample, grad_pos: list[int], seed: int,
                   backend_outputs: list[Any] | None = None, diff_outputs: list[int] | None = None,
                   fn: Callable[..., Any] | None = None) -> Run:
        """The reference (or ``fn``) on float64 CPU copies; with ``backend_outputs``, also its backward
        from the same upstream gradients the backend got (rounded to the backend's output dtypes)."""
        fn = fn or opdef.reference
        args = tree_map(to_reference, sample.args)
        kwargs = tree_map(to_reference, sample.kwargs)
        if backend_outputs is None:
            return run_once(fn, args, kwargs, grad_pos, None, None)
        return run_once(fn, args, kwargs, grad_pos,
                        lambda i, _: _upstream(seed, i, backend_outputs[i]).cpu().to(torch.float64), diff_outputs)

    @staticmethod
    def _floor(opdef: OpDef, sample: Sample, dtype: torch.dtype, seed: int, got: Run,
               backward_args: tuple[Any, ...], fn: Callable[..., Any] | None = None) -> Run | None:
        """The reference run on the CPU in ``dtype`` itself (same upstream gradients): its error against
        float64 is the dtype's rounding floor. None for float64, or when the CPU cannot run the dtype."""
        if dtype == torch.float64:
            return None
        grad_pos, upstream, diff_outputs = backward_args
        if upstream is not None:
            upstream = lambda i, out: _upstream(seed, i, got.outputs[i]).cpu().to(out.dtype)  # noqa: E731
        try:
            return run_once(fn or opdef.reference, tree_map(lambda t: t.detach().to("cpu", copy=True), sample.args),
                            tree_map(lambda t: t.detach().to("cpu", copy=True), sample.kwargs), grad_pos, upstream,
                            diff_outputs)
        except Exception:  # no floor: the table's tolerance alone applies
            return None

    def run_variant(self, opdef: OpDef, fn: Callable[..., Any], dtype: torch.dtype, variant: Variant, seed: int,
                    base: dict[str, Any]) -> list[CheckResult]:
        sample = variant.sample
        rtol, atol = opdef.tol(sample.tolerance_dtype or dtype, sample.reduction_length)
        info = dict(base, sample=variant.label, shape=_shape_text(sample.args), rtol=rtol, atol=atol,
                    replay=f"{base['replay']} --sample '{variant.label}'")
        grad_pos = grad_positions(opdef, sample.args)
        started = time.perf_counter()
        try:
            expected_fwd = self._reference(opdef, sample, grad_pos, seed)
        except Exception as e:
            if variant.generic:
                return []  # this shape does not apply to the op
            return [CheckResult(**info, check="forward", status="error",
                                message=f"the reference raised {error_text(e)}")]
        diff_outputs = [i for i, o in enumerate(expected_fwd.outputs)
                        if isinstance(o, torch.Tensor) and o.is_floating_point() and o.requires_grad]
        do_backward = bool(grad_pos) and bool(diff_outputs)
        backward_args = (grad_pos, lambda i, o: _upstream(seed, i, o), diff_outputs) if do_backward \
            else ([], None, None)
        try:
            got = run_once(fn, sample.args, sample.kwargs, *backward_args)
        except Exception as e:
            msg = error_text(e)
            out = [CheckResult(**info, check="forward", status="error", message=msg)]
            if do_backward:
                out.append(CheckResult(**info, check="backward", status="error", message=f"forward raised {msg}"))
            return out
        reference = opdef.reference
        # float64 CPU copies of the inputs for the op's hooks (choice, error bounds), made once
        ref_args, ref_kwargs = tree_map(to_reference, sample.args), tree_map(to_reference, sample.kwargs)
        if opdef.choice is not None:  # a discrete choice that ties can flip: compare against the backend's
            try:
                chosen = opdef.choice(ref_args, ref_kwargs,
                                      [o.detach().cpu() if isinstance(o, torch.Tensor) else o for o in got.outputs],
                                      dtype)
            except Exception:  # a malformed choice: the plain comparison reports it
                chosen = None
            if chosen is not None:
                reference = chosen
                expected_fwd = self._reference(opdef, sample, grad_pos, seed, fn=reference)
        floor = self._floor(opdef, sample, dtype, seed, got, backward_args, fn=reference)
        got_fwd, expected, floor_fwd = (opdef.decoded(ref_args, ref_kwargs, outputs) for outputs in
                                        (got.outputs, expected_fwd.outputs, floor.outputs if floor else None))
        norm_rtol = None if sample.ill_conditioned else opdef.norm_tol(sample.tolerance_dtype or dtype)
        scale = None
        if opdef.error_scale is not None:
            try:
                scale = flatten(opdef.error_scale(*ref_args, **ref_kwargs))
            except Exception as e:  # a broken bound is the suite's bug: say so instead of guessing
                return [CheckResult(**info, check="forward", status="error",
                                    message=f"the op's error_scale raised {error_text(e)}")]
        fwd = compare_all(got_fwd, expected, rtol, atol, floor=floor_fwd, norm_rtol=norm_rtol, error_scale=scale)
        results = [self._result(info, "forward", fwd, started)]
        if do_backward:
            started = time.perf_counter()
            if got.grads is None:
                results.append(CheckResult(**info, check="backward", status="fail" if got.backward_error else "error",
                                           message=got.backward_error or "no gradient was computed"))
            else:
                try:
                    expected_bwd = self._reference(opdef, sample, grad_pos, seed, got.outputs, diff_outputs,
                                                   fn=reference)
                    bwd_rtol, bwd_atol = opdef.tol(sample.tolerance_dtype or dtype,
                                                   _backward_reduction(sample, grad_pos, got.outputs))
                    grad_scale = None
                    if opdef.grad_error_scale is not None:
                        ups = [_upstream(seed, i, got.outputs[i]).cpu().to(torch.float64) for i in diff_outputs]
                        per_arg = opdef.grad_error_scale(ref_args, ref_kwargs, ups)
                        grad_scale = [per_arg[i] for i in grad_pos]
                    bwd = compare_all(got.grads, expected_bwd.grads or [], bwd_rtol, bwd_atol, what="grad of input",
                                      floor=floor.grads if floor else None, norm_rtol=norm_rtol,
                                      error_scale=grad_scale)
                except Exception as e:
                    bwd = Comparison(False, message=f"the reference backward raised {error_text(e)}")
                results.append(self._result(info, "backward", bwd, started))
        if opdef.deterministic:
            started = time.perf_counter()
            try:
                again = run_once(fn, sample.args, sample.kwargs, *backward_args)
                same = all(bitwise_equal(a, b) for a, b in zip(got.outputs + (got.grads or []),
                                                                   again.outputs + (again.grads or [])))
                det = Comparison(same, message="" if same else "two runs on the same inputs gave different bits")
            except Exception as e:
                det = Comparison(False, message=f"second run raised {error_text(e)}")
            results.append(self._result(info, "determinism", det, started))
        return results

    def run_nan_inf(self, opdef: OpDef, fn: Callable[..., Any], dtype: torch.dtype, variant: Variant,
                    base: dict[str, Any]) -> CheckResult:
        position = _poison_target(opdef, variant.sample)
        args = list(variant.sample.args)
        poisoned = args[position].detach().clone(memory_format=torch.contiguous_format)
        flat = poisoned.view(-1)
        flat[0], flat[-1] = float("nan"), float("inf")
        args[position] = poisoned
        sample = replace(variant.sample, args=tuple(args))
        rtol, atol = opdef.tol(sample.tolerance_dtype or dtype, sample.reduction_length)
        info = dict(base, check="nan_inf", sample=f"{variant.label}:nan@0,inf@-1 in arg {position}",
                    shape=_shape_text(sample.args), rtol=rtol, atol=atol,
                    replay=f"{base['replay']} --sample '{variant.label}'")
        started = time.perf_counter()
        try:
            expected = self._reference(opdef, sample, [], 0).outputs
        except Exception as e:
            return CheckResult(**info, status="error", message=f"the reference raised {error_text(e)}")
        try:
            got = run_once(fn, sample.args, sample.kwargs, [], None, None).outputs
        except Exception as e:
            return CheckResult(**info, status="error", message=error_text(e))
        # the finite elements are held to the same bound as in the forward check, the op's own error
        # bound included (fp8 GEMMs accumulate with ~14 bits on Hopper: the dtype's rtol alone is too tight)
        scale = None
        ref_args, ref_kwargs = tree_map(to_reference, sample.args), tree_map(to_reference, sample.kwargs)
        if opdef.error_scale is not None:
            try:
                scale = flatten(opdef.error_scale(*ref_args, **ref_kwargs))
            except Exception as e:
                return CheckResult(**info, status="error", message=f"the op's error_scale raised {error_text(e)}")
        expected, got = (opdef.decoded(ref_args, ref_kwargs, outputs) for outputs in (expected, got))
        # integer outputs computed from NaN (say, a top-k over NaN scores) are unspecified: floats only
        floating = [i for i, e in enumerate(expected) if isinstance(e, torch.Tensor) and e.is_floating_point()]
        comparison = compare_all([got[i] for i in floating if i < len(got)], [expected[i] for i in floating],
                                 rtol, atol, error_scale=[scale[i] if i < len(scale) else None for i in floating]
                                 if scale is not None else None)
        return self._result(info, "nan_inf", comparison, started)

    @staticmethod
    def _result(info: dict[str, Any], check: str, c: Comparison, started: float) -> CheckResult:
        info = {k: v for k, v in info.items() if k != "check"}
        return CheckResult(**info, check=check, status="pass" if c.ok else "fail", max_abs_err=c.max_abs_err,
                           max_rel_err=c.max_rel_err, err_ratio=c.err_ratio, message=c.message,
                           duration_s=round(time.perf_counter() - started, 4))


def _backward_reduction(sample: Sample, grad_pos: list[int], outputs: list[Any]) -> int:
    """The reduction length of the backward: the sample's, or more where an input's gradient sums over
    many output elements (a weight shared by every row, an embedding row picked by many ids)."""
    out_numel = sum(o.numel() for o in outputs if isinstance(o, torch.Tensor) and o.is_floating_point())
    fan_in = [-(-out_numel // max(1, sample.args[i].numel())) for i in grad_pos]
    return max([sample.reduction_length, *fan_in])


def _poison_target(opdef: OpDef, sample: Sample) -> int | None:
    """The input that gets the planted NaN/Inf: the first differentiable floating input with 2+ elements."""
    positions = grad_positions(opdef, sample.args) or [
        i for i, a in enumerate(sample.args) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    return next((i for i in positions if sample.args[i].numel() >= 2), None)


def _upstream(seed: int, index: int, out: torch.Tensor) -> torch.Tensor:
    """The seeded upstream gradient for output ``index``, rounded to the output's dtype, on its device."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 7919 * (index + 1)),
                    dtype=torch.float64)
    return g.to(out.dtype).to(out.device)
