"""Triton kernels of the op set, with their autograd wrappers, shared by every Triton-capable backend.

Import this package through `openseek_hal.ops.kernel_loader` (not directly) so that a backend gets
either compiled kernels or, for ``triton-interpret``, a copy of this package built in Triton's
interpreter mode. `KERNELS` maps op names to implementations with the OpDefs' signatures.
"""

from __future__ import annotations

from collections.abc import Callable

from . import activation, adamw, attention, cross_entropy, embedding, fp8, mla, moe, norm, reduce, rope

KERNELS: dict[str, Callable] = {
    "rms_norm": norm.rms_norm,
    "add_rms_norm": norm.add_rms_norm,
    "silu_and_mul": activation.silu_and_mul,
    "rope": rope.rope,
    "mla_qkv": mla.mla_qkv,
    "cross_entropy": cross_entropy.cross_entropy,
    "embedding_add_rows": embedding.embedding_add_rows,
    "linear_cross_entropy": cross_entropy.linear_cross_entropy,
    "moe_route": moe.moe_route,
    "moe_permute": moe.moe_permute,
    "moe_unpermute": moe.moe_unpermute,
    "moe_seq_aux_loss": moe.moe_seq_aux_loss,
    "adamw": adamw.adamw,
    "sum_of_squares": reduce.sum_of_squares,
    "causal_attention": attention.causal_attention,
    "fp8_quantize": fp8.fp8_quantize,
    "fp8_gemm": fp8.fp8_gemm,
    "fp8_grouped_gemm": fp8.fp8_grouped_gemm,
    "fp8_linear": fp8.fp8_linear,
    "fp8_grouped_linear": fp8.fp8_grouped_linear,
}
