"""`OpDef`: what an op *is*, independent of any chip.

An OpDef holds the op's name and signature, a pure-torch reference implementation
(differentiable, dtype-generic: the conformance suite runs it in float64 on the CPU), sample
inputs (edge shapes included), the tolerance per dtype and whether the op is deterministic.
Backends implement ops *by name*; the reference is both the fallback and the ground truth.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

# Relative tolerance per dtype (the numerics policy of DESIGN.md). The absolute tolerance of a
# check is ``atol_per_element[dtype] * reduction_length`` so that long reductions are not held to
# a bound that only short ones can meet.
RTOL: dict[torch.dtype, float] = {
    torch.float64: 1e-7,
    torch.float32: 1.3e-6,
    torch.bfloat16: 1.6e-2,
    torch.float16: 1e-3,
}
ATOL_PER_ELEMENT: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.bfloat16: 1e-3,
    torch.float16: 1e-4,
}
# Norm-wise bound on top of the element-wise one: ``||actual - expected|| <= norm_rtol * ||expected||``
# per output (or twice the reference's own error in the dtype). The element-wise absolute tolerance
# grows with reduction length and would let small elements (a cross entropy's gradient, ~1/(N*V))
# be wrong by large factors; relative to the whole output's magnitude they cannot hide. About five
# units of roundoff of the dtype (bf16: 2**-8), so a 6% error is caught in every dtype; never tighter
# than the element-wise rtol (float64: real kernels keep some fp32 constants, measured 4e-8 on H200).
NORM_RTOL: dict[torch.dtype, float] = {
    torch.float64: 1e-7,
    torch.float32: 1e-5,
    torch.bfloat16: 2e-2,
    torch.float16: 5e-3,
}


def roundoff(dtype: torch.dtype) -> float:
    """The unit roundoff of the dtype an op producing ``dtype`` computes in (float32 for narrower outputs):
    the unit of `OpDef.error_scale`."""
    return torch.finfo(torch.promote_types(dtype, torch.float32)).eps / 2


@dataclass(frozen=True)
class Sample:
    """One call of an op: positional tensors/values, keyword arguments, and a label for reports.

    ``reduction_length`` is the longest reduction the op performs on these inputs (the hidden
    size of a norm, the vocabulary of a cross entropy); it scales the absolute tolerance.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    reduction_length: int = 1
    # a result dominated by cancellation (rms_norm's input gradient at hidden size 1 is about
    # eps / |x|**3): held to the element-wise bounds and the rounding floor, not the norm-wise one
    ill_conditioned: bool = False
    # the dtype whose tolerances hold this sample's outputs, where not the dtype under test: a sample whose
    # compared outputs are all computed and kept in a wider dtype (adamw's fp32 masters, kept as remainders
    # of bf16 weights, and its fp32 moments) is held to that dtype's bounds in every run
    tolerance_dtype: torch.dtype | None = None


SampleFn = Callable[[torch.dtype, torch.device, torch.Generator], Iterable[Sample]]

_REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class ArgSchema:
    """One argument of an op: its name, type (``Tensor``, ``Tensor[]`` for a list, ``| None`` when it
    may be absent, ``int``, ``float``, ``bool``, ``str``; ``float | Tensor`` / ``int | Tensor``: a number
    or a 0-d device tensor), default, and whether it is keyword-only."""

    name: str
    type: str
    default: Any = _REQUIRED
    keyword_only: bool = False

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    def text(self) -> str:
        return f"{self.name}: {self.type}" + ("" if self.required else f" = {self.default!r}")


def _type_text(annotation: Any) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return text.replace("torch.Tensor", "Tensor").replace("Sequence[Tensor]", "Tensor[]")


@dataclass(frozen=True, kw_only=True)
class OpDef:
    name: str
    signature: str
    reference: Callable[..., Any]
    samples: SampleFn
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float64)
    deterministic: bool = True
    # Positions of the arguments that receive gradients in the backward check (None: every floating
    # tensor argument); ``differentiable=False`` for ops with no backward (optimizer steps).
    grad_inputs: tuple[int, ...] | None = None
    differentiable: bool = True
    # Overrides of (rtol, atol_per_element) for this op, by dtype.
    tolerance: dict[torch.dtype, tuple[float, float]] = field(default_factory=dict)
    norm_tolerance: dict[torch.dtype, float] = field(default_factory=dict)
    doc: str = ""
    # Ops with a discrete choice that exact ties can flip (a top-k): ``choice(args, kwargs, outputs,
    # dtype)`` gets the float64 reference inputs and the backend's outputs and returns a reference
    # function that makes the backend's choice, if that choice is correct up to ties (within the
    # rounding of ``dtype``), else None. Conformance then compares against that function.
    choice: Callable[..., Callable[..., Any] | None] | None = None
    # Ops whose outputs can cancel (a moment update ``b*m + (1-b)*g`` near zero): ``error_scale(*args,
    # **kwargs)`` on the float64 reference inputs returns, shaped like the outputs, a bound on each
    # element's rounding error in units of the roundoff of the dtype the op computes in (float32 for
    # narrower outputs): the textbook ``k * sum|terms|`` bound of the pointwise arithmetic that
    # produces it (reductions keep the length-scaled tolerance). A cancelling element is then judged
    # against the size of its terms, not its own near-zero size, which no kernel can promise: a fused
    # multiply-add rounds such an element differently from the reference's two products.
    error_scale: Callable[..., Any] | None = None
    # The same for the backward: ``grad_error_scale(args, kwargs, upstreams)`` (the float64 reference
    # inputs and the upstream gradients of the differentiable outputs) returns one entry per
    # positional argument (None where there is no bound).
    grad_error_scale: Callable[..., list[Any]] | None = None
    # Ops that return some values in an encoded form (adamw's master remainders: int16 bits that stand
    # for an fp32 number with the weights): ``decode(args, kwargs, outputs)`` gets the float64 reference
    # inputs and the flat outputs (the backend's, or the reference's, on the CPU) and returns the flat
    # outputs with those values decoded. Every forward comparison sees the decoded outputs.
    decode: Callable[..., list[Any]] | None = None

    def decoded(self, args: tuple[Any, ...], kwargs: dict[str, Any], outputs: list[Any] | None) -> list[Any] | None:
        """Flat ``outputs`` as they are compared: on the CPU with encoded values decoded (`decode`); as given
        for an op without a decode (and None as None)."""
        if outputs is None or self.decode is None:
            return outputs
        return self.decode(args, kwargs, [o.detach().cpu() if isinstance(o, torch.Tensor) else o for o in outputs])

    def schema(self) -> tuple[ArgSchema, ...]:
        """The op's typed arguments, read from its reference's signature (the contract a kernel implements)."""
        out = []
        for p in inspect.signature(self.reference).parameters.values():
            if p.annotation is inspect.Parameter.empty:
                raise TypeError(f"op {self.name}: argument {p.name} of the reference has no type annotation")
            out.append(ArgSchema(p.name, _type_text(p.annotation), p.default, p.kind is p.KEYWORD_ONLY))
        return tuple(out)

    def schema_text(self) -> str:
        """``name(arg: type = default, *, kw: type, ...)``, one line."""
        parts, star = [], False
        for arg in self.schema():
            if arg.keyword_only and not star:
                parts.append("*")
                star = True
            parts.append(arg.text())
        return f"{self.name}({', '.join(parts)})"

    def norm_tol(self, dtype: torch.dtype) -> float:
        """The norm-wise relative bound (`NORM_RTOL`) for this op's outputs in ``dtype``."""
        return self.norm_tolerance.get(dtype, NORM_RTOL[dtype])

    def tol(self, dtype: torch.dtype, reduction_length: int = 1) -> tuple[float, float]:
        """(rtol, atol) for comparing this op's output in ``dtype`` against the float64 reference."""
        rtol, atol = self.tolerance.get(dtype, (RTOL[dtype], ATOL_PER_ELEMENT[dtype]))
        return rtol, atol * max(1, reduction_length)


def randn(*shape: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator,
          scale: float = 1.0) -> torch.Tensor:
    """Normal samples drawn on the CPU from ``generator`` (so every backend sees the same values)."""
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype=dtype,
                                                                                       device=device)
