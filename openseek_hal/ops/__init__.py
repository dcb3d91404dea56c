"""The op set: every op's `OpDef` (reference, samples, tolerance), looked up by name.

Triton kernels shared by every Triton-capable backend live beside the OpDefs in this package.
"""

from __future__ import annotations

from . import activation, attention, cross_entropy, embedding, fp8, grouped, mla, moe, norm, optim, rope
from .opdef import ATOL_PER_ELEMENT, RTOL, OpDef, Sample

REGISTRY: dict[str, OpDef] = {
    op.name: op
    for module in (norm, activation, rope, mla, cross_entropy, embedding, attention, moe, grouped, optim, fp8)
    for op in module.OPDEFS
}


def get(name: str) -> OpDef:
    """The OpDef called ``name``; KeyError listing the known ops otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown op '{name}' (known: {', '.join(sorted(REGISTRY))})") from None


def names() -> list[str]:
    return sorted(REGISTRY)


__all__ = ["ATOL_PER_ELEMENT", "REGISTRY", "RTOL", "OpDef", "Sample", "get", "names"]
