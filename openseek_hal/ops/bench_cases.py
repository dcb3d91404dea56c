"""The op benchmark's cases: shapes (OpenSeek-Small, DeepSeek-V3), inputs, bytes moved, and the baselines.

Each case is one op at one shape. Its implementations all take the op's signature: ``ours`` (the
backend's op), ``eager`` (the OpDef reference, i.e. plain torch), ``compile`` (``torch.compile`` of
the reference; for AdamW, torch's own fused multi-tensor kernel instead) and, when installed,
``flaggems`` and ``liger`` (adapters to their APIs; a library without that op, or without a
backward for it, is simply absent from that row).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import get
from .optim import split_master
from .rope_scaling import rope_tables

# name: (hidden, vocab, tokens, experts, top_k, n_group, topk_group, moe_intermediate)
PRESETS: dict[str, dict[str, int]] = {
    "openseek-small": dict(hidden=1280, vocab=151872, tokens=4096, experts=64, top_k=6, n_group=1, topk_group=1,
                           ffn=2 * 1280, heads=10),
    "deepseek-v3": dict(hidden=7168, vocab=129280, tokens=4096, experts=256, top_k=8, n_group=8, topk_group=4,
                        ffn=2048, heads=128),
}


@dataclass
class Case:
    op: str
    label: str  # preset and shape, e.g. "deepseek-v3 16384x7168"
    make: Callable[[torch.device], tuple[tuple, dict]]
    grad_args: tuple[int, ...]  # argument positions that take gradients (empty: forward only)
    fwd_bytes: int
    bwd_bytes: int
    flops: int = 0  # forward FLOPs, for ops that are not memory-bound (attention): rows then give TFLOP/s
    bwd_flops: int = 0
    fused_fwd_bwd: bool = False  # time forward+backward together (cross entropy, attention)
    compile_baseline: bool = True  # False where a stronger torch baseline is given instead
    eager_baseline: bool = True  # False where the reference is no baseline (attention's S x S in fp32)
    baselines: dict[str, Callable[..., Any]] = field(default_factory=dict)
    # what "ours" times, if not the backend's op: ``ours(interpret)`` returns the implementation
    ours: Callable[[bool], Callable[..., Any]] | None = None


def _optional(module: str) -> Any | None:
    try:
        return importlib.import_module(module)
    except Exception:  # an optional baseline that cannot be imported is skipped
        return None


@functools.cache
def flag_gems() -> Any | None:
    return _optional("flag_gems")


@functools.cache
def liger() -> dict[str, Any]:
    found = {}
    for name, (module, attr) in {
        "rms_norm": ("liger_kernel.ops.rms_norm", "LigerRMSNormFunction"),
        "add_rms_norm": ("liger_kernel.ops.fused_add_rms_norm", "LigerFusedAddRMSNormFunction"),
        "silu_and_mul": ("liger_kernel.ops.swiglu", "LigerFusedGateUpSiLUMulFunction"),
        "cross_entropy": ("liger_kernel.ops.cross_entropy", "LigerCrossEntropyFunction"),
    }.items():
        mod = _optional(module)
        if mod is not None and hasattr(mod, attr):
            found[name] = getattr(mod, attr)
    return found


def _external_baselines(op: str) -> dict[str, Callable[..., Any]]:
    out: dict[str, Callable[..., Any]] = {}
    fg, lg = flag_gems(), liger()
    if fg is not None:
        if op == "rms_norm":
            out["flaggems"] = lambda x, w, eps=1e-6: fg.rms_norm(x, [x.shape[-1]], w, eps)
        elif op == "silu_and_mul":
            out["flaggems"] = lambda x: fg.silu_and_mul(*x.chunk(2, dim=-1))
        elif op == "cross_entropy":
            out["flaggems"] = lambda x, t, **kw: fg.cross_entropy_loss(x, t, None, "mean", -100, 0.0)
    if op in lg:
        fn = lg[op]
        if op == "rms_norm":
            out["liger"] = lambda x, w, eps=1e-6: fn.apply(x, w, eps, 0.0, "llama", False)
        elif op == "add_rms_norm":
            out["liger"] = lambda x, r, w, eps=1e-6: fn.apply(x, r, w, eps)
        elif op == "silu_and_mul":
            out["liger"] = lambda x: fn.apply(x)
        elif op == "cross_entropy":
            out["liger"] = lambda x, t, **kw: fn.apply(x, t, None, -100, 0.0, 0.0, "mean")[0]
    return out


def _randn(*shape: int, dtype=torch.bfloat16, device, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, device=device, dtype=torch.float32).mul_(scale).to(dtype)


def attention_flops(b: int, h: int, s: int, dqk: int, dv: int) -> tuple[int, int]:
    """(forward, backward) FLOPs of causal attention: 2 per multiply-add over the ``s(s+1)/2`` visible
    pairs; forward ``q k^T`` and ``P v``; backward, as flash-attn counts it, the recomputed ``q k^T``
    plus ``dV``, ``dP``, ``dQ``, ``dK`` (2.5x the forward when ``dqk == dv``)."""
    pairs = b * h * s * (s + 1) // 2
    return 2 * pairs * (dqk + dv), 2 * pairs * (3 * dqk + 2 * dv)


def _head_then_cross_entropy(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                             z_loss: float = 0.0) -> torch.Tensor:
    """The output head's matmul, then our cross entropy kernel writing the logits' gradient in place: the
    two-op path that ``linear_cross_entropy`` replaces."""
    from .kernel_loader import kernel_table

    ce = kernel_table(x.device.type == "cpu")["cross_entropy"]
    return ce(torch.nn.functional.linear(x, weight), target, ignore_index, "mean", z_loss, inplace_backward=True)


def _flash_kernel(interpret: bool) -> Callable[..., Any]:
    from .kernel_loader import kernel_table

    return kernel_table(interpret)["causal_attention"]


def flex_attention_baseline(compiled: bool = True) -> Callable[..., Any] | None:
    """FlexAttention (torch >= 2.5) with a causal (and, given ``cu_seqlens``, document) block mask, or None."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    from .attention import document_ids

    if compiled:
        # the benches time the backward several times on one graph (retain_graph=True), which compiled
        # backwards with donated buffers refuse; donation saves memory, not time
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
    fn = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    masks: dict[tuple, Any] = {}

    def run(q, k, v, scale=None, cu_seqlens=None):
        s = q.shape[-2]
        key = (s, str(q.device), None if cu_seqlens is None else tuple(cu_seqlens.tolist()))
        if key not in masks:
            if cu_seqlens is None:
                def mask_mod(b, h, qi, ki):
                    return qi >= ki
                masks[key] = create_block_mask(mask_mod, None, None, s, s, device=q.device)
            else:
                doc = document_ids(cu_seqlens, q.shape[0], s).to(q.device)

                def mask_mod(b, h, qi, ki):
                    return (qi >= ki) & (doc[b, qi] == doc[b, ki])
                masks[key] = create_block_mask(mask_mod, q.shape[0], None, s, s, device=q.device)
        return fn(q, k, v, block_mask=masks[key], scale=scale)

    return run


def attention_case(label: str, b: int, h: int, s: int, dqk: int = 192, dv: int = 128, dtype=torch.bfloat16,
                   docs: int = 0, compiled_flex: bool = True) -> Case:
    """Causal attention on (B,H,S,D) views of (B,S,H,D) tensors (the model's layout): our flash kernel
    against torch's SDPA and FlexAttention. ``docs > 0``: ``docs`` equal documents per row (cu_seqlens)."""
    from .attention import sdpa_causal_attention

    def make(dev):
        q, k = (_randn(b, s, h, dqk, device=dev, dtype=dtype).transpose(1, 2) for _ in range(2))
        v = _randn(b, s, h, dv, device=dev, dtype=dtype).transpose(1, 2)
        kwargs: dict[str, Any] = {"scale": dqk ** -0.5}
        if docs:
            kwargs["cu_seqlens"] = torch.arange(0, b * s + 1, s // docs, device=dev, dtype=torch.int32)
        return (q, k, v), kwargs

    fwd, bwd = attention_flops(b, h, s, dqk, dv)
    if docs:  # only the pairs inside a document
        fwd, bwd = (f * ((s // docs) * (s // docs + 1) // 2 * docs) // (s * (s + 1) // 2) for f in (fwd, bwd))
    elt = torch.finfo(dtype).bits // 8
    io = b * h * s * (2 * dqk + 2 * dv) * elt  # q, k, v read, o written
    baselines: dict[str, Callable[..., Any]] = {"sdpa": sdpa_causal_attention}
    flex = flex_attention_baseline(compiled_flex)
    if flex is not None:
        baselines["flex" if compiled_flex else "flex-eager"] = flex
    return Case("causal_attention", f"{label} {b}x{h}x{s} qk{dqk} v{dv}" + (f" {docs} docs" if docs else ""), make,
                (0, 1, 2), io, 2 * io, flops=fwd, bwd_flops=bwd, fused_fwd_bwd=True, compile_baseline=False,
                eager_baseline=False, baselines=baselines, ours=_flash_kernel)


def zipf_ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """``n`` token ids drawn with probability ~ 1/rank (a text-like draw: the most frequent id a few hundred
    times in 8192 tokens, most ids never), on the CPU."""
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(1.0 / torch.arange(1, vocab + 1, dtype=torch.float64), n, replacement=True,
                             generator=g)


def _index_put_rows(total: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """What ``embedding_add_rows`` replaced: torch's sort-based ``index_put_(accumulate=True)``."""
    return total.index_put_((ids.reshape(-1),), rows.reshape(-1, total.shape[1]).to(total.dtype), accumulate=True)


def embedding_add_rows_case(preset: str, n: int, vocab: int, dim: int) -> Case:
    """``n`` rows added into a ``vocab x dim`` bf16 table, against ``index_put_``. Bytes: the rows read and the
    distinct table rows they touch read and written."""
    ids = zipf_ids(n, vocab)
    touched = int(ids.unique().numel())

    def make(dev):
        return (_randn(vocab, dim, device=dev), ids.to(dev), _randn(n, dim, device=dev)), {}

    return Case("embedding_add_rows", f"{preset} {n} ids ({touched} distinct) -> {vocab}x{dim}", make, (),
                (n + 2 * touched) * dim * 2, 0, compile_baseline=False, eager_baseline=False,
                baselines={"index_put_": _index_put_rows})


def _cases_for(preset: str, p: dict[str, int]) -> list[Case]:
    bf = 2
    t = p["tokens"] * 4  # a micro-batch of 4 sequences
    h, v, e, k = p["hidden"], p["vocab"], p["experts"], p["top_k"]
    cases = []
    for rows, hidden, label in ([(t, h, f"{preset} {t}x{h}")]
                                + ([(16384, 4096, "reference 16384x4096")] if preset == "deepseek-v3" else [])):
        cases.append(Case("rms_norm", label, functools.partial(
            lambda dev, r, hd: ((_randn(r, hd, device=dev), _randn(hd, device=dev, scale=0.1) + 1), {}),
            r=rows, hd=hidden), (0, 1), 2 * rows * hidden * bf, 3 * rows * hidden * bf))
        cases.append(Case("add_rms_norm", label, functools.partial(
            lambda dev, r, hd: ((_randn(r, hd, device=dev), _randn(r, hd, device=dev),
                                 _randn(hd, device=dev, scale=0.1) + 1), {}), r=rows, hd=hidden),
            (0, 1, 2), 4 * rows * hidden * bf, 4 * rows * hidden * bf))
    for rows, d, label in [(t, p["ffn"], f"{preset} {t}x2*{p['ffn']}"), (16384, 4096, "reference 16384x2*4096")][
            : 1 if preset == "openseek-small" else 2]:
        cases.append(Case("silu_and_mul", label, functools.partial(
            lambda dev, r, dd: ((_randn(r, 2 * dd, device=dev, scale=2.0),), {}), r=rows, dd=d),
            (0,), 3 * rows * d * bf, 5 * rows * d * bf))
    heads, seq = p["heads"], p["tokens"]
    for interleaved in (False, True):
        numel = 4 * heads * seq * 64
        cases.append(Case("rope", f"{preset} 4x{heads}x{seq}x64 {'interleaved' if interleaved else 'half'}",
                          functools.partial(lambda dev, hh, s, il: (
                              (_randn(4, hh, s, 64, device=dev), *rope_tables(64, s, device=dev)),
                              {"interleaved": il}), hh=heads, s=seq, il=interleaved),
                          (0,), 2 * numel * bf, 2 * numel * bf))
    # MLA's q, k, v from the projections (nope 128, rope 64, v 128), as the model calls it: q and kv viewed from
    # the projections' (B, S, H * D) outputs, the shared rotary key a strided tail of the compressed projection
    width, kv_width = heads * 192, heads * 256
    cases.append(Case("mla_qkv", f"{preset} 4x{seq}x{heads} qk 128+64 v 128", functools.partial(
        lambda dev, hh, s: ((_randn(4, s, hh * 192, device=dev).view(4, s, hh, 192),
                             _randn(4, s, hh * 256, device=dev).view(4, s, hh, 256),
                             _randn(4, s, 512 + 64, device=dev)[..., 512:], *rope_tables(64, s, device=dev)),
                            {"interleaved": True}), hh=heads, s=seq),
        (0, 1, 2), 4 * seq * (width + heads * 128 + 64 + 2 * width) * bf,
        4 * seq * (2 * width + heads * 128 + width + kv_width + 64) * bf))
    rows = 8192 if preset == "deepseek-v3" else 4096
    cases.append(Case("cross_entropy", f"{preset} {rows}x{v}", functools.partial(
        lambda dev, r, vv: ((_randn(r, vv, device=dev, scale=3.0),
                             torch.randint(0, vv, (r,), device=dev)), {}), r=rows, vv=v),
        (0,), rows * v * bf, 2 * rows * v * bf, fused_fwd_bwd=True))
    # the output head and its loss over a training step's 8192 tokens, against the two-op path it replaces
    cases.append(Case("linear_cross_entropy", f"{preset} 8192x{h}->{v}", functools.partial(
        lambda dev, hh, vv: ((_randn(8192, hh, device=dev), _randn(vv, hh, device=dev, scale=hh ** -0.5),
                              torch.randint(0, vv, (8192,), device=dev)), {}), hh=h, vv=v),
        (0, 1), 8192 * v * bf, 2 * 8192 * v * bf, flops=2 * 8192 * h * v, bwd_flops=4 * 8192 * h * v,
        fused_fwd_bwd=True, eager_baseline=False, baselines={"head+cross_entropy": _head_then_cross_entropy}))
    # a tied embedding's gradient rows added into the head's dense gradient (8192 tokens of a text-like draw)
    cases.append(embedding_add_rows_case(preset, 8192, v, h))
    route_kw = dict(top_k=k, n_group=p["n_group"], topk_group=p["topk_group"], score_func="sigmoid",
                    norm_topk_prob=True, routed_scaling_factor=2.5)
    cases.append(Case("moe_route", f"{preset} {t}x{e} top{k}", functools.partial(
        lambda dev, tt, ee, kw: ((_randn(tt, ee, device=dev, dtype=torch.float32),
                                  _randn(ee, device=dev, dtype=torch.float32, scale=0.1)), kw),
        tt=t, ee=e, kw=route_kw), (0,), t * e * 4 + t * k * 16, 2 * t * e * 4 + t * k * 12))
    tok = p["tokens"]

    def routing(dev, tt):
        return torch.rand(tt, e, device=dev).argsort(dim=-1)[:, :k].contiguous()

    cases.append(Case("moe_permute", f"{preset} {tok}x{h} E{e} top{k}", functools.partial(
        lambda dev, tt: ((_randn(tt, h, device=dev), routing(dev, tt), e), {}), tt=tok),
        (0,), (tok + tok * k) * h * bf, (tok * k + tok) * h * bf))

    def unpermute_inputs(dev, tt):
        order = torch.sort(routing(dev, tt).flatten(), stable=True).indices
        return (_randn(tt * k, h, device=dev), order, torch.rand(tt, k, device=dev)), {}

    cases.append(Case("moe_unpermute", f"{preset} {tok}x{h} E{e} top{k}",
                      functools.partial(unpermute_inputs, tt=tok), (0, 2),
                      (tok * k + tok) * h * bf, (tok + 2 * tok * k) * h * bf))
    # the sequence-wise balance loss of a micro-batch of 2 sequences (float32 router logits)
    cases.append(Case("moe_seq_aux_loss", f"{preset} 2x{tok} E{e} top{k}", functools.partial(
        lambda dev, tt: ((_randn(tt, e, device=dev, dtype=torch.float32), routing(dev, tt), 2),
                         {"coef": 1e-4}), tt=2 * tok),
        (0,), 2 * tok * (e * 4 + k * 8), 2 * tok * (2 * e * 4)))
    # MLA attention (qk 192 = 128 + 64 rope, v 128), bf16, S = 4096: a micro-batch of 4 sequences for
    # OpenSeek-Small's 10 heads, one sequence for DeepSeek-V3's 128; and packed documents (8 per row)
    batch = 4 if preset == "openseek-small" else 1
    cases.append(attention_case(preset, batch, p["heads"], p["tokens"]))
    cases.append(attention_case(preset, batch, p["heads"], p["tokens"], docs=8))
    return cases


def _adamw_case(params_millions: int, remainders: bool = False) -> Case:
    n = params_millions * 1_000_000
    sizes = [n // 64] * 64  # 64 tensors: a model's parameters in one multi-tensor step

    def make(dev):
        masters = [torch.randn(s, device=dev) for s in sizes]
        tensors = ([m.to(torch.bfloat16) for m in masters], [_randn(s, device=dev) for s in sizes],
                   [torch.zeros(s, device=dev) for s in sizes], [torch.zeros(s, device=dev) for s in sizes])
        hyper = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=10)
        if remainders:  # the same masters as (bf16 weight, int16 remainder) pairs
            pairs = [split_master(m) for m in masters]
            return ([w for w, _ in pairs], *tensors[1:]), dict(hyper, param_remainders=[r for _, r in pairs])
        return tensors, dict(hyper, master_params=masters)

    if remainders:  # bf16 weight and int16 remainder read+write, bf16 grad read, fp32 m/v read+write
        return Case("adamw", f"{params_millions}M params bf16 + fp32 master as remainders, 64 tensors", make, (),
                    n * (4 + 4 + 2 + 2 * 8), 0, compile_baseline=False)

    grads32: dict[int, list[torch.Tensor]] = {}

    def torch_fused(params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, step,
                    master_params):
        # torch's fused AdamW needs grads in the masters' dtype: convert once per input set, untimed.
        g32 = grads32.setdefault(id(grads[0]), [g.float() for g in grads])
        steps = [torch.tensor(float(step), device=g32[0].device) for _ in g32]
        torch._fused_adamw_(master_params, g32, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2,
                            weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)
        torch._foreach_copy_(params, master_params)

    # bf16 param write, bf16 grad read, fp32 master/m/v read+write
    return Case("adamw", f"{params_millions}M params bf16+fp32 master, 64 tensors", make, (),
                n * (2 + 2 + 3 * 8), 0, compile_baseline=False, baselines={"torch-fused": torch_fused})


def _fp8_quantize(x: torch.Tensor, tile: str) -> tuple[torch.Tensor, torch.Tensor]:
    if x.device.type == "cuda":
        from .kernel_loader import load_kernels

        return load_kernels(False).fp8.quantize(x, tile)
    from .fp8 import fp8_quantize

    return fp8_quantize(x, tile)


def expert_counts(tokens: int, top_k: int, experts: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Tokens per expert of a random top-k routing (each token's k experts distinct), as int32 on ``device``."""
    g = torch.Generator().manual_seed(seed)
    picks = torch.rand(tokens, experts, generator=g).argsort(dim=-1)[:, :top_k]
    return torch.bincount(picks.flatten(), minlength=experts).to(torch.int32).to(device)


def fp8_gemm_case(m: int, n: int, k: int, label: str) -> Case:
    """The block-scaled FP8 GEMM (inputs quantized outside the timing) against torch's bf16 matmul (cuBLAS)."""
    bf16: dict[str, torch.Tensor] = {}

    def make(dev):
        a, b = _randn(m, k, device=dev), _randn(n, k, device=dev, scale=k ** -0.5)
        bf16["a"], bf16["b"] = a, b
        return (*_fp8_quantize(a, "1x128"), *_fp8_quantize(b, "128x128"), "bfloat16"), {}

    return Case("fp8_gemm", label, make, (), m * k + n * k + 2 * m * n, 0, flops=2 * m * n * k,
                compile_baseline=False, eager_baseline=False,
                baselines={"torch-bf16": lambda *a, **kw: torch.matmul(bf16["a"], bf16["b"].T)})


def fp8_grouped_gemm_case(tokens: int, top_k: int, experts: int, n: int, k: int, label: str) -> Case:
    """The grouped FP8 GEMM of the routed experts against ``torch._grouped_mm`` in bf16, same routing."""
    bf16: dict[str, Any] = {}
    rows = tokens * top_k

    def make(dev):
        from .grouped import grouped_mm_linear

        x, w = _randn(rows, k, device=dev), _randn(experts, n, k, device=dev, scale=k ** -0.5)
        counts = expert_counts(tokens, top_k, experts, dev)
        bf16["args"], bf16["fn"] = (x, w, counts), grouped_mm_linear
        return (*_fp8_quantize(x, "1x128"), *_fp8_quantize(w, "128x128"), counts, "bfloat16"), {}

    return Case("fp8_grouped_gemm", label, make, (), rows * k + experts * n * k + 2 * rows * n, 0,
                flops=2 * rows * n * k, compile_baseline=False, eager_baseline=False,
                baselines={"torch-grouped-mm-bf16": lambda *a, **kw: bf16["fn"](*bf16["args"])})


def fp8_linear_case(m: int, n: int, k: int, label: str) -> Case:
    """The fp8 layer (quantization included) forward and backward against ``F.linear`` in bf16."""
    def make(dev):
        return (_randn(m, k, device=dev), _randn(n, k, device=dev, scale=k ** -0.5)), {}

    return Case("fp8_linear", label, make, (0, 1), 2 * (m * k + n * k + m * n), 4 * (m * k + n * k + m * n),
                flops=2 * m * n * k, bwd_flops=4 * m * n * k, compile_baseline=False, eager_baseline=False,
                baselines={"torch-bf16": torch.nn.functional.linear})


def fp8_grouped_linear_case(tokens: int, top_k: int, experts: int, n: int, k: int, label: str) -> Case:
    """The routed experts' fp8 layer forward and backward against `grouped_mm_linear` (bf16 ``torch._grouped_mm``)."""
    from .grouped import grouped_mm_linear

    rows = tokens * top_k

    def make(dev):
        return (_randn(rows, k, device=dev), _randn(experts, n, k, device=dev, scale=k ** -0.5),
                expert_counts(tokens, top_k, experts, dev)), {}

    io = 2 * (rows * k + experts * n * k + rows * n)
    return Case("fp8_grouped_linear", label, make, (0, 1), io, 2 * io, flops=2 * rows * n * k,
                bwd_flops=4 * rows * n * k, compile_baseline=False, eager_baseline=False,
                baselines={"torch-grouped-mm-bf16": grouped_mm_linear})


def fp8_quantize_case(m: int, k: int, tile: str) -> Case:
    """Tile quantization (memory-bound): bf16 read, fp8 and the float32 scales written."""
    def make(dev):
        return (_randn(m, k, device=dev), tile), {}

    scales = (m if tile == "1x128" else -(-m // 128)) * -(-k // 128) * 4
    return Case("fp8_quantize", f"{m}x{k} {tile}", make, (), 3 * m * k + scales, 0, compile_baseline=True)


def fp8_cases() -> list[Case]:
    """Issue #13's FP8 shapes: GEMM 8192^3; OpenSeek-Small's routed experts (64 experts, hidden 1280,
    expert intermediate 896, 8192 tokens x top-6): gate_up (N 1792, K 1280) and down (N 1280, K 896)."""
    small = PRESETS["openseek-small"]
    e, h, ffn, top_k, tokens = small["experts"], small["hidden"], 896, small["top_k"], 8192
    return [fp8_quantize_case(8192, 8192, "1x128"), fp8_quantize_case(8192, 8192, "128x128"),
            fp8_gemm_case(8192, 8192, 8192, "8192^3 1x128/128x128"),
            fp8_grouped_gemm_case(tokens, top_k, e, 2 * ffn, h, f"openseek-small gate_up {tokens}x{top_k} E{e}"),
            fp8_grouped_gemm_case(tokens, top_k, e, h, ffn, f"openseek-small down {tokens}x{top_k} E{e}"),
            fp8_linear_case(8192, 8192, 8192, "8192^3"),
            fp8_grouped_linear_case(tokens, top_k, e, 2 * ffn, h, f"openseek-small gate_up {tokens}x{top_k} E{e}")]


def cases(op: str | None = None) -> list[Case]:
    """Every case (or those of ``op``), with the external baselines that are installed."""
    out = [c for preset, p in PRESETS.items() for c in _cases_for(preset, p)]
    out += [_adamw_case(256), _adamw_case(256, remainders=True)] + fp8_cases()
    if op is not None:
        get(op)  # a clear KeyError for an unknown op name
        out = [c for c in out if c.op == op]
    for c in out:
        c.baselines.update(_external_baselines(c.op))
    return out
