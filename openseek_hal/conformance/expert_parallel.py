"""Model-level check of expert parallelism: one training step on EP x DP ranks equals one rank.

`run_case` builds the same small DeepSeek-V3 (MoE layers in the trunk and the MTP block,
group-limited routing, a shared expert, the sequence balance loss) on every rank, shards its routed
experts with `apply_expert_parallel`, gives each rank its slice of one global batch, runs forward
and backward and `average_gradients`, and compares with one rank that runs the whole batch:

- the loss averaged over the ranks;
- every gradient (expert gradients gathered by global expert index);
- the expert loads summed by ``update_expert_bias(world)`` (exact: they are token counts).

``skewed=True`` sets the routing bias so that expert 0 is picked by every token and experts 6 and 7
by none (with 4 EP ranks, the last rank receives no token at all: every split to it is empty).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# Tolerances, from the arithmetic. The run is float64 (u = 1.1e-16) except where the model computes
# in float32 by design, whatever its dtype: the router's logits and scores, hence the routing weights,
# the sequence balance loss and the router's weight gradient (u32 = 6.0e-8). EP changes the order of
# sums (per-rank loss means, gradient sums over tokens and then over ranks) and the row count of each
# matmul, which may change a BLAS kernel's rounding. A float32 sum or dot product over n <= 32 terms
# (tokens of a step per MoE layer, hidden size 32) reordered moves by up to n*u32 = 1.9e-6 of the sum
# of its terms' magnitudes, and the routing weights carry that into the MoE output and so into every
# gradient and the loss; the float64 parts add ~1e-14 at most. RTOL = 1e-5 is that 1.9e-6 with 5x
# for the terms' magnitudes exceeding the result. Real errors are far above it: one of the <= 32
# tokens of a step dropped or sent to the wrong expert, or an expert gradient not divided by the EP
# size, moves the affected gradients by >= 1/32 relative (tokens computed by the wrong expert moved
# them by 2e-2 to 1 and the loss by 2e-4 when we tried). Expert loads are token counts: exact.
RTOL = 1e-5


@dataclass(frozen=True)
class Case:
    ep_size: int
    world_size: int
    skewed: bool = False
    seed: int = 0
    batch: int = 4  # sequences in the global batch (divisible by the world size)
    seq: int = 8
    dispatch: str = "pairs"  # `ExpertParallelExperts`'s: what travels (`expert_parallel.DISPATCH`)
    # the EP ranks' grouped_linear writes NaN where its contract leaves rows unspecified (past sum(counts)),
    # as a grouped GEMM that leaves them unwritten may: the result must not depend on them
    unspecified_rows: bool = False

    @property
    def name(self) -> str:
        dp = self.world_size // self.ep_size
        return (f"ep{self.ep_size}xdp{dp}" + ("-skewed" if self.skewed else "")
                + ("" if self.dispatch == "pairs" else f"-{self.dispatch}")
                + ("-nan-rows" if self.unspecified_rows else ""))


def tiny_overrides() -> dict[str, Any]:
    """A DeepSeek-V3 small enough for 4 CPU ranks in seconds: dense layer 0, MoE layer 1 and MTP,
    8 experts top-2 in 4 groups of which 2 are kept (node-limited routing), one shared expert."""
    return dict(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1,
                n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                num_nextn_predict_layers=1, max_position_embeddings=64)


class _NaNPast(torch.autograd.Function):
    """NaN in the rows from ``used`` on: of the value (``grad=False``) or of the gradient (``grad=True``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, used: int, grad: bool) -> torch.Tensor:
        ctx.used, ctx.grad = used, grad
        if grad:
            return x.view_as(x)
        out = x.clone()
        out[used:] = float("nan")
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple:
        if ctx.grad:
            g = g.clone()
            g[ctx.used:] = float("nan")
        return g, None, None


def nan_past_counts(grouped_linear: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``grouped_linear`` whose output rows and input-gradient rows past ``sum(counts)`` are NaN: the
    worst a kernel may leave where the op's contract says "unspecified" (`openseek_hal.ops.grouped`)."""
    def run(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        used = int(counts.sum())
        return _NaNPast.apply(grouped_linear(_NaNPast.apply(x, used, True), weight, counts), used, False)
    return run


def build(case: Case, backend: str, dtype: torch.dtype):
    from ..models import build_model

    model = build_model("tiny", backend, dtype=dtype, seed=case.seed, **tiny_overrides())
    if case.skewed:
        with torch.no_grad():
            for moe in model.moe_layers():
                bias = moe.gate.e_score_correction_bias
                bias[0] = 1.0  # sigmoid scores lie in (0, 1): a bias of +-1 decides the selection
                bias[6:] = -1.0
    model.train()
    return model


def batch(case: Case, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + case.seed)
    tokens = torch.randint(0, vocab, (case.batch, case.seq + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


@dataclass
class StepResult:
    loss: float
    grads: dict[str, torch.Tensor]  # full-size (expert gradients gathered), on the CPU
    loads: torch.Tensor  # [MoE layers, E], summed over every rank
    ep_ranks_receiving: list[int] | None = None  # tokens each EP rank got in the first MoE layer
    grad_norm: float | None = None  # of the whole model (each expert shard once)

    # tensors cross the launcher's pipe by value (numpy), not as shared-memory handles of a rank
    # process that exits right after sending
    def portable(self) -> dict[str, Any]:
        return dict(loss=self.loss, grads={n: g.numpy() for n, g in self.grads.items()}, loads=self.loads.numpy(),
                    ep_ranks_receiving=self.ep_ranks_receiving, grad_norm=self.grad_norm)

    @classmethod
    def from_portable(cls, d: dict[str, Any]) -> StepResult:
        return cls(d["loss"], {n: torch.from_numpy(g) for n, g in d["grads"].items()},
                   torch.from_numpy(d["loads"]), d["ep_ranks_receiving"], d["grad_norm"])


def reference_step(case: Case, backend: str = "cpu", dtype: torch.dtype = torch.float64) -> StepResult:
    """One rank, the whole batch."""
    model = build(case, backend, dtype)
    ids, labels = batch(case, model.config.vocab_size)
    device = next(model.parameters()).device
    loss = model.loss(ids.to(device), labels.to(device)).total
    loss.backward()
    grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()}
    loads = model.update_expert_bias(None).cpu()
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads.values()])))
    return StepResult(float(loss.detach()), grads, loads, grad_norm=norm)


def rank_step(comm, case: Case, backend: str, dtype_name: str) -> dict[str, Any]:
    """One rank of the EP x DP job (call through `openseek_hal.comm.launch`): `StepResult.portable`."""
    from ..train.expert_parallel import (
        ExpertParallelExperts,
        apply_expert_parallel,
        average_gradients,
        expert_parallel_groups,
        expert_shard,
        gather_experts,
        grad_norm,
    )

    if comm.world_size != case.world_size:
        raise ValueError(f"case {case.name} needs {case.world_size} ranks, got {comm.world_size}")
    dtype = getattr(torch, dtype_name)
    model = build(case, backend, dtype)
    groups = expert_parallel_groups(comm, case.ep_size)
    if groups.ep is not None:
        apply_expert_parallel(model, groups.ep, dispatch=case.dispatch)
        if case.unspecified_rows:
            for moe in model.moe_layers():
                moe.experts._grouped_linear = nan_past_counts(moe.experts._grouped_linear)
    ids, labels = batch(case, model.config.vocab_size)
    per = case.batch // comm.world_size
    rows = slice(comm.rank * per, (comm.rank + 1) * per)
    device = next(model.parameters()).device
    loss = model.loss(ids[rows].to(device), labels[rows].to(device)).total
    loss.backward()
    average_gradients(model, comm, groups.expert_dp)
    norm = float(grad_norm(model, groups.ep))

    mean = loss.detach().to(torch.float64).reshape(1).clone()
    comm.all_reduce(mean, op="avg")
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.detach()
        if expert_shard(p) is not None:
            g = gather_experts(g, groups.ep)
        grads[name] = g.cpu().clone()
    loads = model.update_expert_bias(comm).cpu()
    receiving = None
    experts = next(iter(model.moe_layers())).experts
    if isinstance(experts, ExpertParallelExperts):  # what each EP rank received: proves the skew reached it
        per_rank = loads[0].view(groups.ep_size, -1).sum(dim=1)
        receiving = [int(n) for n in per_rank]
    return StepResult(float(mean), grads, loads, receiving, norm).portable()


def compare(got: StepResult, ref: StepResult) -> list[dict[str, Any]]:
    """One row per quantity: {"what", "error", "bound", "ok"} (errors relative to the reference)."""
    rows = [_row("loss", abs(got.loss - ref.loss) / abs(ref.loss), RTOL)]
    for name, r in ref.grads.items():
        g = got.grads.get(name)
        if g is None or g.shape != r.shape:
            rows.append(dict(what=f"grad {name}", error=float("inf"), bound=RTOL, ok=False,
                             message=f"shape {None if g is None else tuple(g.shape)} vs {tuple(r.shape)}"))
            continue
        scale = float(r.abs().max())
        diff = float((g.double() - r.double()).abs().max())
        # a gradient that is exactly zero (an expert no token picked) must stay exactly zero
        rows.append(_row(f"grad {name}", diff / scale if scale > 0 else diff, RTOL if scale > 0 else 0.0))
    if got.grad_norm is not None and ref.grad_norm is not None:
        rows.append(_row("grad norm", abs(got.grad_norm - ref.grad_norm) / ref.grad_norm, RTOL))
    rows.append(_row("expert loads", float((got.loads - ref.loads).abs().max()), 0.0))
    return rows


def _row(what: str, error: float, bound: float) -> dict[str, Any]:
    return dict(what=what, error=error, bound=bound, ok=error <= bound, message="")


def run_case(case: Case, *, backend: str = "cpu", adaptor: str | None = None, dtype: torch.dtype = torch.float64,
             timeout: float = 60.0) -> tuple[list[dict[str, Any]], list[StepResult]]:
    """Run ``case`` on ``case.world_size`` local ranks and compare every rank with one rank.

    Returns (rows of every rank's comparison, each tagged with its rank; the ranks' results).
    ``adaptor`` None: the backend's own (``Backend.comm_adaptor``).
    """
    from ..comm import launch

    ref = reference_step(case, backend, dtype)
    results = [StepResult.from_portable(r) for r in
               launch(rank_step, case.world_size, backend=backend, adaptor=adaptor, timeout=timeout,
                      args=(case, backend, str(dtype).removeprefix("torch.")))]
    rows = []
    for rank, got in enumerate(results):
        for row in compare(got, ref):
            rows.append(dict(row, rank=rank, case=case.name, adaptor=adaptor or "default"))
    return rows, results
