"""The DeepSeek-V3 model on the HAL: MLA attention, DeepSeekMoE, multi-token prediction.

Every module takes the `Backend` at construction and resolves the ops it calls once
(``backend.op("rms_norm")``); the model never calls a kernel directly, so any backend runs it
unchanged. Plain torch does the rest (linear layers, the per-expert matmuls).

Shapes: ``B`` batch, ``S`` sequence, ``H`` heads, ``E`` routed experts, ``k`` experts per token.

Parameter names are ours (see `state_dict_adapter` for the HF mapping): gate and up projections
are fused (``gate_up_proj``, gate first, as `silu_and_mul` expects) and the routed experts of a
layer are stacked (``experts.gate_up_proj[E, 2I, hidden]``, ``experts.down_proj[E, hidden, I]``).
MTP modules live under ``mtp.{d}`` and share the embedding and output head of the main model.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...backend import Backend
from ...errors import ConfigError
from ...ops.rope_scaling import rope_tables, softmax_scale
from .config import DeepseekV3Config
from .tied import TiedGradient


class _RecomputeState:
    """``active`` while activation recomputation re-runs a forward (see `openseek_hal.train.recompute`)."""

    active = False


RECOMPUTE = _RecomputeState()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, backend: Backend):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self._rms_norm = backend.op("rms_norm")
        self._add_rms_norm = backend.op("add_rms_norm")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``rms_norm(x)``; with ``residual``, ``(rms_norm(x + residual), x + residual)`` in one op."""
        if residual is None:
            return self._rms_norm(x, self.weight, self.eps)
        return self._add_rms_norm(x, residual, self.weight, self.eps)


class _TwoLinears(torch.autograd.Function):
    """``(x @ w1.T, x @ w2.T)``, whose input gradient is one GEMM added onto the other in its epilogue
    (``addmm``) instead of two products that autograd then adds with a separate kernel."""

    @staticmethod
    def forward(ctx, x, w1, w2):
        ctx.save_for_backward(x, w1, w2)
        return F.linear(x, w1), F.linear(x, w2)

    @staticmethod
    def backward(ctx, d1, d2):
        x, w1, w2 = ctx.saved_tensors
        g1, g2 = d1.reshape(-1, d1.shape[-1]), d2.reshape(-1, d2.shape[-1])
        rows = x.reshape(-1, x.shape[-1])
        dx = torch.addmm(g2 @ w2, g1, w1).view(x.shape) if ctx.needs_input_grad[0] else None
        dw1 = g1.t() @ rows if ctx.needs_input_grad[1] else None
        dw2 = g2.t() @ rows if ctx.needs_input_grad[2] else None
        return dx, dw1, dw2


def _two_linears(x: torch.Tensor, a: nn.Module, b: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a(x), b(x))``: as `_TwoLinears` where both are plain linear layers (`_plain_linear`; MLA's query and
    key-value projections read the same normed input), else the layers' own calls."""
    if _plain_linear(a, x) and _plain_linear(b, x):
        return _TwoLinears.apply(x, a.weight, b.weight)
    return a(x), b(x)


class MLA(nn.Module):
    """Multi-head latent attention: low-rank (optionally) queries, a compressed KV latent with its own
    norm, and a decoupled rope part whose key is shared by all heads."""

    def __init__(self, config: DeepseekV3Config, backend: Backend):
        super().__init__()
        c = config
        self.heads, self.nope_dim, self.rope_dim, self.v_dim = (
            c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim)
        self.kv_lora_rank = c.kv_lora_rank
        self.interleaved = c.rope_interleave
        self.scale = softmax_scale(c.qk_head_dim, c.rope_scaling, c.max_position_embeddings)
        q_out = self.heads * c.qk_head_dim
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps, backend)
            self.q_b_proj = nn.Linear(c.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + self.rope_dim, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps, backend)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, self.heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.heads * self.v_dim, c.hidden_size, bias=c.attention_bias)
        self._qkv = backend.op("mla_qkv")
        self._attention = backend.op("causal_attention")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """``cu_seqlens``: document boundaries over the flattened batch (`causal_attention`'s): no query
        attends to a key of another document."""
        b, s, _ = x.shape
        # Activations stay in the projections' (batch, seq, heads, dim) layout and attention gets
        # (batch, heads, seq, dim) views of them: no transposing copy of q, k, v or their gradients
        # (the attention output and its gradient come back in the same layout).
        direct = hasattr(self, "q_proj")
        q, kv_a = _two_linears(x, self.q_proj if direct else self.q_a_proj, self.kv_a_proj_with_mqa)
        if not direct:
            q = self.q_b_proj(self.q_a_layernorm(q))
        latent, k_rope = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(b, s, self.heads, -1)
        # whole query and key heads: the parts without position joined to the rotated parts (the key's
        # shared by every head). The rotation keeps the interleaved pair order where HF de-interleaves;
        # q and k get the same layout, so the scores q.k are the same.
        q, k, v = self._qkv(q.view(b, s, self.heads, -1), kv, k_rope, cos, sin, self.interleaved)
        out = self._attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=self.scale,
                              cu_seqlens=cu_seqlens)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.v_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward with fused gate/up projection (dense layers and shared experts)."""

    def __init__(self, hidden: int, intermediate: int, backend: Backend):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self._silu_and_mul = backend.op("silu_and_mul")

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """``down(silu_and_mul(gate_up(x)))``; given ``add`` (``[tokens, hidden]``), ``add`` plus that as
        ``[tokens, hidden]`` (`from_gate_up`)."""
        return self.from_gate_up(self.gate_up_proj(x), add)

    def from_gate_up(self, gate_up: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """`forward` from the gate/up projection's output on. Where the down projection is a plain bias-free
        layer (`_plain_linear`), its GEMM makes the sum with ``add`` (``addmm``: the epilogue reads ``add``, one
        rounding) instead of an add kernel reading two ``tokens x hidden`` tensors and writing a third."""
        h = self._silu_and_mul(gate_up)
        if add is None:
            return self.down_proj(h)
        if add.dtype == h.dtype and _plain_linear(self.down_proj, h):
            return torch.addmm(add, h.reshape(-1, h.shape[-1]), self.down_proj.weight.t())
        return add + self.down_proj(h).reshape(add.shape)


def _plain_linear(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``layer`` is a bias-free ``nn.Linear`` of ``x``'s dtype, called outside autocast: its product can
    then be made by a GEMM of our choosing (one that also adds, or one of two sharing an input gradient)
    without changing what the layer computes. An FP8 layer, a bias or autocast keep the layer's own call."""
    return (type(layer) is nn.Linear and layer.bias is None and layer.weight.dtype == x.dtype
            and not torch.is_autocast_enabled(x.device.type))


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of bf16 matrices on the tensor cores, the fp32 accumulator returned unrounded."""
    return torch.mm(a, b, out_dtype=torch.float32)


def _split_bf16(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``t`` as two bf16 terms whose sum is ``t`` to 16 bits (relative error <= 2**-16)."""
    high = t.to(torch.bfloat16)
    return high, (t - high.float()).to(torch.bfloat16)


class _BF16RouterLogits(torch.autograd.Function):
    """fp32 router logits of bf16 tokens and a bf16 weight, on the tensor cores.

    The forward is the fp32 reference's arithmetic (bf16 products are exact in fp32; only the order of the
    fp32 sums differs). The backward's upstream gradient is fp32: it is split into two bf16 terms (16
    bits), and the results are rounded to the inputs' bf16, whose rounding (2**-8) is 256 times coarser
    than the split's. The input's gradient is one product over both terms (``[high, low] @ [w; w]``, the
    inner dimension doubled), accumulated in fp32 and rounded once, so no fp32 tokens x hidden partial
    products are written, added and converted (about 270 MB of traffic a MoE layer at OpenSeek-Small's
    8192 tokens).
    """

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return _mm_fp32(x, weight.t())

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return _router_backward(x, weight, grad)


def _router_backward(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_BF16RouterLogits`' gradients (input, weight) for the fp32 upstream ``grad``, both bf16."""
    high, low = _split_bf16(grad.contiguous())
    dx = torch.mm(torch.cat([high, low], dim=1), torch.cat([weight, weight])).to(x.dtype)
    dw = (_mm_fp32(high.t(), x) + _mm_fp32(low.t(), x)).to(weight.dtype)
    return dx, dw


class _RouterLogitsAndLinear(torch.autograd.Function):
    """`_BF16RouterLogits` together with ``x @ other.T``, a bf16 linear layer of the same tokens (the shared
    experts' gate/up projection). The input's gradient of the pair is the router's product with the other
    layer's accumulated onto it by one GEMM (``addmm``), where autograd would add two tokens x hidden
    gradients with a separate kernel."""

    @staticmethod
    def forward(ctx, x, weight, other):
        ctx.save_for_backward(x, weight, other)
        return _mm_fp32(x, weight.t()), F.linear(x, other)

    @staticmethod
    def backward(ctx, grad, d_other):
        x, weight, other = ctx.saved_tensors
        dx, dw = _router_backward(x, weight, grad)
        return torch.addmm(dx, d_other, other), dw, d_other.t() @ x


_FP32_OUT_MM: dict[torch.device, bool] = {}  # per device: does torch's mm give bf16 products an fp32 output


def _fp32_out_mm(device: torch.device) -> bool:
    """Whether ``torch.mm(..., out_dtype=torch.float32)`` runs on ``device``, tried once (eagerly: a traced
    call never tries, it takes the fp32 path unless an eager call found the answer)."""
    if device not in _FP32_OUT_MM:
        if torch.compiler.is_compiling():
            return False
        one = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
        try:
            _FP32_OUT_MM[device] = _mm_fp32(one, one).dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            _FP32_OUT_MM[device] = False
    return _FP32_OUT_MM[device]


def _tensor_core_logits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the router's logits can take `_BF16RouterLogits`: bf16 on a CUDA device whose torch has
    ``mm`` with an fp32 output (the fp32 matmul it replaces runs on the CUDA cores, ~10x slower)."""
    return (x.is_cuda and x.dtype == weight.dtype == torch.bfloat16 and not torch.is_autocast_enabled("cuda")
            and _fp32_out_mm(x.device))


class Router(nn.Module):
    """Expert scores and the aux-loss-free selection bias (``e_score_correction_bias``)."""

    def __init__(self, config: DeepseekV3Config):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts))

    def _apply(self, fn, recurse=True):
        # The bias must stay float32 under model.to(bfloat16): its 1e-3 update steps are below
        # bfloat16's resolution once |bias| > 0.25, and the bias would stop moving.
        super()._apply(fn, recurse)
        self.e_score_correction_bias.data = self.e_score_correction_bias.data.float()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits ``[T, E]`` in float32 (routing decisions must not depend on the activation dtype)."""
        if _tensor_core_logits(x, self.weight):
            return _BF16RouterLogits.apply(x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)
        if torch.is_autocast_enabled(x.device.type):  # autocast would run this matmul in bfloat16
            with torch.autocast(x.device.type, enabled=False):
                return F.linear(x.float(), self.weight.float())
        return F.linear(x.float(), self.weight.float())


class MoE(nn.Module):
    """DeepSeekMoE: shared experts plus top-k of the routed experts (group-limited, bias-steered selection).

    In training mode each forward adds its tokens-per-expert to ``expert_load`` (read and cleared by
    `DeepseekV3.update_expert_bias`) and, when ``seq_aux_loss_coef > 0``, returns the sequence-wise
    balance loss ``alpha * sum_i f_i P_i`` averaged over the batch's sequences.
    """

    def __init__(self, config: DeepseekV3Config, backend: Backend):
        super().__init__()
        c = config
        self.route_kwargs = dict(top_k=c.num_experts_per_tok, n_group=c.n_group, topk_group=c.topk_group,
                                 score_func=c.scoring_func, norm_topk_prob=c.norm_topk_prob,
                                 routed_scaling_factor=c.routed_scaling_factor)
        self.aux_coef = c.seq_aux_loss_coef
        self.gate = Router(c)
        self.experts = Experts(c, backend)
        self.shared_experts = MLP(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts, backend) \
            if c.n_shared_experts else None
        self.register_buffer("expert_load", torch.zeros(c.n_routed_experts), persistent=False)
        self._route = backend.op("moe_route")
        self._aux_loss = backend.op("moe_seq_aux_loss")

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # counts must stay exact: float32 holds integers up to 2**24 per step
        self.expert_load.data = self.expert_load.data.float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, s, h = x.shape
        flat = x.reshape(-1, h)
        mlp = self.shared_experts
        gate_up = None
        if mlp is not None and _tensor_core_logits(flat, self.gate.weight) and _plain_linear(mlp.gate_up_proj, flat):
            # the router and the shared experts' first projection read the same tokens: one input gradient
            logits, gate_up = _RouterLogitsAndLinear.apply(flat, self.gate.weight, mlp.gate_up_proj.weight)
        else:
            logits = self.gate(flat)
        indices, weights, counts = self._route(logits, self.gate.e_score_correction_bias, **self.route_kwargs)
        # The experts module adds the shared experts' output; an expert-parallel one computes it while
        # the tokens travel (`openseek_hal.train.expert_parallel`).
        if mlp is None:
            shared = None
        elif gate_up is not None:
            shared = lambda add=None: mlp.from_gate_up(gate_up, add)  # noqa: E731
        else:
            shared = lambda add=None: mlp(x, add).view(-1, h)  # noqa: E731
        out = self.experts(flat, indices, weights, shared).view(b, s, h)
        aux = None
        if self.training:
            if not RECOMPUTE.active:  # a recomputed forward must not count its tokens twice
                self.expert_load += counts.detach()  # integer counts added into the float32 total
            if self.aux_coef > 0:
                aux = self._aux_loss(logits, indices, b, coef=self.aux_coef,
                                     score_func=self.route_kwargs["score_func"])
        return out, aux


class Experts(nn.Module):
    """The routed experts' weights, stacked, and their grouped computation on permuted tokens.

    ``forward(x, indices, weights, shared)`` returns the routed output plus the shared experts' when
    ``shared`` is given: ``shared()`` is their output, ``shared(add)`` their output plus ``add`` (the sum
    made by their last GEMM). It is a callable so that an expert-parallel replacement can run them while
    its tokens are in flight.
    """

    def __init__(self, config: DeepseekV3Config, backend: Backend):
        super().__init__()
        e, h, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        self._permute = backend.op("moe_permute")
        self._unpermute = backend.op("moe_unpermute")
        self._silu_and_mul = backend.op("silu_and_mul")
        self._grouped_linear = backend.op("grouped_linear")

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                shared: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        x_sorted, order, counts = self._permute(x, indices, self.gate_up_proj.shape[0])
        hidden = self._silu_and_mul(self._grouped_linear(x_sorted, self.gate_up_proj, counts))
        out = self._unpermute(self._grouped_linear(hidden, self.down_proj, counts), order, weights)
        return out if shared is None else shared(out)


class Block(nn.Module):
    """Pre-norm transformer block: MLA then a dense MLP or a MoE.

    ``block(x, cos, sin, pending, cu_seqlens)`` returns ``(x', out, aux)`` and leaves the last residual add to its
    consumer: the block's output is ``x' + out``, which the next block's input norm (or the final norm)
    adds and normalizes in one `add_rms_norm` (the ``pending`` argument). So the residual stream is never
    added on its own, and in backward the norm's kernel adds the residual's gradient instead of a
    separate pass summing the two branches' gradients.
    """

    def __init__(self, config: DeepseekV3Config, layer_index: int, backend: Backend):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend)
        self.self_attn = MLA(config, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend)
        self.is_moe = config.is_moe_layer(layer_index)
        self.mlp = MoE(config, backend) if self.is_moe else MLP(config.hidden_size, config.intermediate_size, backend)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pending: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(x', out, aux)``: the block's output is ``x' + out``; ``pending`` is the previous block's ``out``
        (its residual stream is then ``x + pending``); ``cu_seqlens``: document boundaries for attention.
        Arguments are positional where the block is wrapped (recomputation passes them on as given)."""
        if pending is None:
            h = self.input_layernorm(x)
        else:
            h, x = self.input_layernorm(pending, residual=x)
        attn = self.self_attn(h, cos, sin, cu_seqlens)
        normed, x = self.post_attention_layernorm(attn, residual=x)
        if self.is_moe:
            out, aux = self.mlp(normed)
        else:
            out, aux = self.mlp(normed), None
        return x, out, aux


class MTPModule(nn.Module):
    """One multi-token-prediction depth: ``h' = block(eh_proj([enorm(emb(t_{i+d})), hnorm(h_i)]))``."""

    def __init__(self, config: DeepseekV3Config, depth: int, backend: Backend):
        super().__init__()
        h = config.hidden_size
        self.enorm = RMSNorm(h, config.rms_norm_eps, backend)
        self.hnorm = RMSNorm(h, config.rms_norm_eps, backend)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.block = Block(config, config.num_hidden_layers + depth, backend)
        self.norm = RMSNorm(h, config.rms_norm_eps, backend)  # HF: shared_head.norm

    def forward(self, hidden: torch.Tensor, embedded: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.eh_proj(torch.cat([self.enorm(embedded), self.hnorm(hidden)], dim=-1))
        x, out, aux = self.block(x, cos, sin, None, cu_seqlens)
        return self.norm(out, residual=x)[0], aux


@dataclass
class ModelLoss:
    """The losses of one batch; ``total = main + mtp_loss_weight * mtp + aux`` is what to backpropagate."""

    total: torch.Tensor
    main: torch.Tensor
    mtp: torch.Tensor | None  # mean over the D depths, before the weight
    aux: torch.Tensor | None  # sequence-wise balance loss summed over MoE layers, coefficient included


class DeepseekV3(nn.Module):
    """DeepSeek-V3: ``model(input_ids[B, S]) -> logits[B, S, vocab]`` (MTP is off in this call).

    `forward_with_mtp` also returns the D MTP logits (depth ``d`` at position ``i`` predicts token
    ``i + d + 1``); `loss` computes the main, MTP and balance losses from already-shifted labels.
    """

    def __init__(self, config: DeepseekV3Config, backend: Backend):
        super().__init__()
        self.config = config
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c, i, backend) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, backend)
        self.lm_head = None if c.tie_word_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(c, d, backend) for d in range(c.num_nextn_predict_layers))
        self._embedding = backend.op("embedding")
        self._embedding_add_rows = backend.op("embedding_add_rows")
        self._cross_entropy = backend.op("cross_entropy")
        # the head and its loss in one op where the backend has it (its forward writes the logits'
        # gradient; nothing reads the logits again); else the head, then the backend's cross_entropy
        self._linear_cross_entropy = backend.op("linear_cross_entropy") \
            if backend.has_native("linear_cross_entropy") else None
        self._rope_cache: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    # -- pieces --------------------------------------------------------------------------------
    def _rope_tables(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (seq_len, device)
        if key not in self._rope_cache:
            c = self.config
            self._rope_cache[key] = rope_tables(c.qk_rope_head_dim, seq_len, theta=c.rope_theta,
                                                rope_scaling=c.rope_scaling,
                                                max_position_embeddings=c.max_position_embeddings, device=device)
        return self._rope_cache[key]

    @property
    def _head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self._head_weight)

    def moe_layers(self) -> Iterator[MoE]:
        for block in [*self.layers, *(m.block for m in self.mtp)]:
            if block.is_moe:
                yield block.mlp

    def _embed(self, ids: torch.Tensor, tied: TiedGradient | None) -> torch.Tensor:
        return self._embedding(ids, self.embed_tokens.weight) if tied is None else tied.lookup(self._embedding, ids)

    def _tied_gradient(self) -> TiedGradient | None:
        """A collector of the shared embedding / head weight's gradient when one backward will need it."""
        weight = self.embed_tokens.weight
        if self.lm_head is None and weight.requires_grad and torch.is_grad_enabled():
            return TiedGradient(weight, self._embedding_add_rows)
        return None

    def _trunk(self, input_ids: torch.Tensor, tied: TiedGradient | None = None,
               cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor], tuple]:
        """Final hidden states, the MoE balance losses, and what every block takes besides its input (the
        rope tables and the document boundaries, for the MTP blocks)."""
        cos, sin = self._rope_tables(input_ids.shape[1], input_ids.device)
        x = self._embed(input_ids, tied)
        auxes, out = [], None
        for layer in self.layers:
            x, out, aux = layer(x, cos, sin, out, cu_seqlens)
            if aux is not None:
                auxes.append(aux)
        return (self.norm(x) if out is None else self.norm(out, residual=x)[0]), auxes, (cos, sin, cu_seqlens)

    def _mtp(self, input_ids: torch.Tensor, hidden: torch.Tensor, block_args: tuple,
             auxes: list[torch.Tensor], tied: TiedGradient | None = None) -> list[torch.Tensor]:
        """Hidden states of each MTP depth. Inputs are shifted left one token per depth; the
        positions whose future tokens fall off the end see token 0 and are masked in the loss."""
        out, ids = [], input_ids
        for module in self.mtp:
            ids = F.pad(ids[:, 1:], (0, 1))
            hidden, aux = module(hidden, self._embed(ids, tied), *block_args)
            if aux is not None:
                auxes.append(aux)
            out.append(hidden)
        return out

    # -- public --------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits; ``cu_seqlens`` (document boundaries over the flattened batch, e.g. `eos_boundaries`): each
        token attends only within its document."""
        hidden, _, _ = self._trunk(input_ids, None, cu_seqlens)
        return self.head(hidden)

    def forward_with_mtp(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(logits[B, S, V], [mtp_logits_d[B, S, V] for d in 1..D])``."""
        hidden, auxes, block_args = self._trunk(input_ids, None, cu_seqlens)
        return self.head(hidden), [self.head(h) for h in self._mtp(input_ids, hidden, block_args, auxes)]

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
             cu_seqlens: torch.Tensor | None = None) -> ModelLoss:
        """Losses for next-token ``labels[B, S]`` (``labels[:, i]`` is the target at position ``i``).

        MTP depth ``d`` targets ``labels[:, i + d]``; its last ``d`` positions are ignored. ``cu_seqlens``:
        document boundaries (see `forward`).
        """
        c = self.config
        tied = self._tied_gradient()
        hidden, auxes, block_args = self._trunk(input_ids, tied, cu_seqlens)
        main = self._head_loss(hidden, labels, ignore_index, tied)
        mtp = None
        if len(self.mtp) and c.mtp_loss_weight > 0:
            shifted, losses = labels, []
            for h in self._mtp(input_ids, hidden, block_args, auxes, tied):
                shifted = F.pad(shifted[:, 1:], (0, 1), value=ignore_index)
                losses.append(self._head_loss(h, shifted, ignore_index, tied))
            mtp = torch.stack(losses).mean()
        aux = torch.stack(auxes).sum() if auxes else None
        total = main
        if mtp is not None:
            total = total + c.mtp_loss_weight * mtp
        if aux is not None:
            total = total + aux
        return ModelLoss(total=total, main=main, mtp=mtp, aux=aux)

    def _head_loss(self, hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                   tied: TiedGradient | None = None) -> torch.Tensor:
        """The mean token loss of the output head on ``hidden`` (the logits exist only for this loss)."""
        weight = self._head_weight if tied is None else tied.head_weight()
        if (self._linear_cross_entropy is not None and hidden.dtype == weight.dtype
                and not torch.is_autocast_enabled(hidden.device.type)):
            return self._linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                              ignore_index=ignore_index)
        logits = F.linear(hidden, weight)  # a fast kernel may write the gradient into the logits' storage
        return self._cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index,
                                   inplace_backward=True)

    def num_parameters(self) -> int:
        """Parameters of this module, MTP included (`DeepseekV3Config.num_parameters` gives the other counts)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of `loss`: 6 x the matmul parameters one token uses (top-k experts,
        the output head once per MTP depth too) + attention scores over ``seq_len`` (PaLM appendix B)."""
        c = self.config
        mtp = list(self.mtp) if c.mtp_loss_weight > 0 else []  # loss() skips MTP at weight 0
        vectors = sum(p.numel() for n, p in self.named_parameters() if p.dim() == 1 and not n.startswith("mtp."))
        vectors += sum(p.numel() for m in mtp for p in m.parameters() if p.dim() == 1)  # norms and biases
        head = c.vocab_size * c.hidden_size
        # the embedding is a lookup, not a matmul; the head runs once more per MTP depth
        matmul = c.num_parameters(active=True, include_mtp=bool(mtp)) - vectors
        matmul += len(mtp) * head - (0 if c.tie_word_embeddings else head)
        layers = c.num_hidden_layers + len(mtp)
        return 6 * matmul + 6 * layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * seq_len

    @torch.no_grad()
    def update_expert_bias(self, comm=None) -> torch.Tensor | None:
        """Aux-loss-free balancing, once per optimizer step: ``bias += rate * sign(mean_load - load)``.

        Loads are the tokens routed to each expert since the last call, summed over every rank of
        ``comm`` (a `Communicator` spanning the data/expert-parallel ranks; None: this rank only),
        in one ``all_reduce`` for all layers. Returns the ``[layers, E]`` loads used (None without MoE).
        """
        layers = list(self.moe_layers())
        if not layers:
            return None
        loads = torch.stack([m.expert_load for m in layers])
        if comm is not None:
            comm.all_reduce(loads)
        # every layer at once (a handful of kernels a step, not six per MoE layer)
        steps = self.config.bias_update_rate * torch.sign(loads.mean(dim=1, keepdim=True) - loads)
        torch._foreach_add_([m.gate.e_score_correction_bias for m in layers], list(steps.unbind(0)))
        torch._foreach_zero_([m.expert_load for m in layers])
        return loads

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """DeepSeek-style init: every matrix ~ N(0, initializer_range), norms 1, routing bias 0."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)
        for m in self.moe_layers():
            m.gate.e_score_correction_bias.zero_()
            m.expert_load.zero_()


class FP8Linear(nn.Module):
    """An ``nn.Linear``'s parameters (the same tensors, the same names) computed through the backend's
    ``fp8_linear`` op: e4m3 operands with per-tile scales in forward and both backward GEMMs."""

    def __init__(self, linear: nn.Linear, fp8_linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._fp8_linear = fp8_linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._fp8_linear(x, self.weight)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8"


def require_fp8(backend: Backend) -> None:
    """`ConfigError` unless the backend declares FP8 support (``capabilities().fp8``)."""
    caps = backend.capabilities()
    if not caps.fp8:
        raise ConfigError(f"fp8: true needs a backend with FP8 support; backend '{backend.name}' ({caps.device_name}) "
                          f"declares none (use cuda on a GPU of compute capability 8.9 or newer, or "
                          f"triton-interpret to run the FP8 kernels on a CPU)")


def enable_fp8(model: nn.Module, backend: Backend, exclude: Sequence[str] = ()) -> list[str]:
    """Run the linear layers of attention, the dense MLPs, the shared experts and MTP's projection through
    ``fp8_linear`` and the routed experts through ``fp8_grouped_linear`` (DeepSeek-V3's FP8 recipe). The
    embedding, the output head, the norms and the router stay in the model's dtype, and so does every
    layer whose name matches one of the ``exclude`` globs (`fnmatch`, e.g. ``*.o_proj``, ``*.experts``,
    ``mtp.*``). Parameters are unchanged (the optimizer keeps its higher-precision masters). Returns the
    names of the layers changed.

    Raises `ConfigError` when the backend does not declare FP8 support (``capabilities().fp8``), or when
    a glob matches no layer that FP8 would change (a typo would otherwise exclude nothing, silently).
    """
    require_fp8(backend)
    linear_op, grouped_op = backend.op("fp8_linear"), backend.op("fp8_grouped_linear")
    # (layer name, the module holding it, its attribute there; None: the module is the routed experts)
    layers: list[tuple[str, nn.Module, str | None]] = []
    for name, module in model.named_modules():
        if isinstance(module, Experts):
            layers.append((name, module, None))
            continue
        layers += [(f"{name}.{child_name}" if name else child_name, module, child_name)
                   for child_name, child in module.named_children()
                   if type(child) is nn.Linear and child_name != "lm_head"]
    unused = [g for g in exclude if not any(fnmatch.fnmatchcase(n, g) for n, _, _ in layers)]
    if unused:
        raise ConfigError(f"fp8_exclude: {', '.join(unused)} matches none of the layers fp8 changes "
                          f"(e.g. {', '.join(n for n, _, _ in layers[:3])}, ...)")
    changed = []
    for full, module, child_name in layers:
        if any(fnmatch.fnmatchcase(full, g) for g in exclude):
            continue
        if child_name is None:
            module._grouped_linear = grouped_op
        else:
            setattr(module, child_name, FP8Linear(getattr(module, child_name), linear_op))
        changed.append(full)
    return changed
