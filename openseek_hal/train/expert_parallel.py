"""Expert parallelism (EP) for the DeepSeek-V3 MoE layers, applied from outside the model.

The world of ``N`` ranks is ``D`` data-parallel replicas x expert-parallel groups of ``P`` ranks
(``N = D * P``; DeepSeek-V3 and Megatron-Core's layout). EP groups are contiguous blocks of ranks
(``[k*P, (k+1)*P)``, so on one node when ``P`` fits in it); rank ``r`` of an EP group owns the
global experts ``[r*E/P, (r+1)*E/P)`` of every MoE layer. Attention, dense MLPs, routers and shared
experts are replicated on every rank; the ranks ``q, q+P, q+2P, ...`` hold the same expert shard
(the expert-data-parallel group).

Forward of one MoE layer on one rank (the model is unchanged but for `ExpertParallelExperts`
replacing ``moe.experts``):

1. the router picks experts for the rank's own tokens (so ``expert_load`` counts all E experts);
2. ``moe_permute`` groups the token copies by global expert, hence by destination rank;
3. the per-expert counts go through one even ``all_to_all_single`` (E/P counts to each peer) and,
   with the counts of this rank's own tokens, reach the host in one copy: the only host sync (with
   overlap on CUDA, the shared experts are queued behind the copy and run while the host waits);
4. the tokens go through an uneven ``all_to_all_single`` (async);
5. received rows, ordered (source rank, local expert), are regrouped by local expert with
   ``moe_permute``; ``grouped_linear`` -> ``silu_and_mul`` -> ``grouped_linear`` run the experts;
   ``moe_unpermute`` with unit weights restores the (source rank, local expert) order;
6. the reverse ``all_to_all_single`` brings each token copy home, and ``moe_unpermute`` combines
   them with the routing weights.

Backward mirrors it: each all-to-all's gradient is the all-to-all with the splits swapped. All
traffic goes through the `Communicator`, so every adaptor (torch, nccl, host, hier) runs it.

``dispatch="tokens"`` sends each token once to each rank that holds any of its experts, instead of
one copy per (token, expert) pair (with top-6 of 64 experts on 2 ranks, about 3 copies to the peer
become 1), together with its local expert ids and routing weights for that rank (one small extra
all-to-all). The receiver expands a token to its local experts (a permute with a sentinel group for
the slots that are not its own, cut off at the exact pair count the count exchange already gave),
sums its experts' weighted outputs per token and sends one row back; the sender adds the rows from
each rank in rank order. The same single host sync; the combine is rounded once per rank instead of
once per token, so results differ from ``pairs`` by rounding only.

``dispatch="allgather"`` needs no sizes, hence no host sync: tokens and routing are all-gathered over
the EP group, each rank runs its experts on the picks that are its own (a fixed ``P*T*k``-row buffer
whose used rows are known on the device only; the rows past them are masked), and the weighted
partial outputs are summed back to their owners (an even all-to-all and a sum in rank order). Every
token travels to every rank, which suits small groups on fast links.

Gradients: each rank's loss is the mean over its own tokens, and the global loss is the mean of
the N ranks' losses. An expert's gradient after backward already sums the contributions of its
whole EP group (the all-to-all carries them home), so the trainer sums expert gradients over the
expert-data-parallel group and divides by N, while dense gradients are averaged over all N ranks:
`average_gradients` does both. `expert_parallel_groups` builds the two groups.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..comm import Communicator
from ..device import Device
from ..models.deepseek_v3.config import DeepseekV3Config
from ..models.deepseek_v3.model import DeepseekV3, Experts
from ..ops.moe import expert_counts

# what travels: one row per (token, expert) pair, per (token, rank), or every token to every rank
DISPATCH = ("pairs", "tokens", "allgather")
EXPERT_SHARD_ATTR = "_expert_shard"  # on each sharded parameter: (expert_offset, num_global_experts)


# -- timing --------------------------------------------------------------------------------------
@dataclass
class AllToAllTimes:
    """Seconds one MoE layer spent in its all-to-alls since the last `ExpertParallelExperts.timings`.

    Times are between device events on the compute stream (wall clock on the CPU), so a span that
    overlaps computation counts only where the stream had to wait. ``dispatch_s`` runs from issuing
    the token all-to-all to the tokens being usable; ``dispatch_exposed_s`` is the part of it after
    the shared experts were done (the stream stalled on the transfer). The count exchange and the
    combine are synchronous: fully exposed.
    """

    forwards: int = 0
    counts_s: float = 0.0  # per-expert count exchange + the host sync for the split sizes
    dispatch_s: float = 0.0
    dispatch_exposed_s: float = 0.0
    combine_s: float = 0.0
    backward_s: float = 0.0  # the two gradient all-to-alls of backward (synchronous)

    @property
    def total_s(self) -> float:
        """Forward dispatch + combine, count exchange included."""
        return self.counts_s + self.dispatch_s + self.combine_s

    @property
    def exposed_s(self) -> float:
        return self.counts_s + self.dispatch_exposed_s + self.combine_s

    @property
    def hidden_fraction(self) -> float:
        """Share of the forward all-to-all time hidden behind the shared experts (0 when none ran)."""
        return 1.0 - self.exposed_s / self.total_s if self.total_s > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"forwards": self.forwards, "counts_s": self.counts_s, "dispatch_s": self.dispatch_s,
                "dispatch_exposed_s": self.dispatch_exposed_s, "combine_s": self.combine_s,
                "backward_s": self.backward_s, "total_s": self.total_s, "exposed_s": self.exposed_s,
                "hidden_fraction": self.hidden_fraction}


@dataclass
class _Timer:
    """Event pairs recorded on the compute stream, turned into seconds (one device sync) on demand."""

    device: Device
    pending: list[tuple[str, Any, Any]] = field(default_factory=list)
    times: AllToAllTimes = field(default_factory=AllToAllTimes)

    def mark(self) -> Any:
        if torch.compiler.is_compiling():  # inside a compiled graph an event is not recorded when it runs
            return None
        event = self.device.event(enable_timing=True)
        event.record()
        return event

    def add(self, name: str, start: Any, end: Any) -> None:
        if start is not None and end is not None:  # spans that touch compiled code are not timed
            self.pending.append((name, start, end))

    def collect(self) -> AllToAllTimes:
        if self.pending:
            self.device.synchronize()
        for name, start, end in self.pending:
            setattr(self.times, name, getattr(self.times, name) + start.elapsed_time(end) / 1e3)
        self.pending.clear()
        out, self.times = self.times, AllToAllTimes()
        return out


# -- the all-to-all with autograd ----------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of rows; backward sends the gradients back with the splits swapped.

    With ``handle`` (a list) the forward is asynchronous: the `Work` is appended to it and the
    returned tensor must not be read before ``wait()`` (run it under ``torch.no_grad()``: an adaptor
    that stages through the host copies into the tensor then).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Communicator, out_splits: list[int], in_splits: list[int],
                handle: list | None, timer: _Timer | None) -> torch.Tensor:
        ctx.comm, ctx.out_splits, ctx.in_splits, ctx.timer = comm, out_splits, in_splits, timer
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        work = comm.all_to_all_single(out, x.contiguous(), out_splits, in_splits, async_op=handle is not None)
        if handle is not None:
            handle.append(work)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        def run() -> torch.Tensor:
            out = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
            ctx.comm.all_to_all_single(out, grad.contiguous(), ctx.in_splits, ctx.out_splits)
            return out
        return _timed_backward(ctx.timer, run), None, None, None, None, None


def _timed_backward(timer: _Timer | None, run: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``run()``, its span added to the timer's ``backward_s``."""
    start = timer.mark() if timer is not None else None
    out = run()
    if start is not None:
        timer.add("backward_s", start, timer.mark())
    return out


def all_to_all(x: torch.Tensor, comm: Communicator, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
    """Differentiable uneven ``all_to_all_single`` of the rows of ``x`` (synchronous)."""
    return _AllToAll.apply(x, comm, out_splits, in_splits, None, None)


def _gather_rows(x: torch.Tensor, comm: Communicator, async_op: bool = False) -> tuple[torch.Tensor, Any]:
    """``all_gather`` of the rows of ``x[T, ...]`` into a new ``[P*T, ...]`` (rank-major), and its `Work`."""
    out = x.new_empty((comm.world_size * x.shape[0], *x.shape[1:]))
    return out, comm.all_gather(out, x.contiguous(), async_op=async_op)


def _sum_blocks(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """``x[P*T, ...]``: block j (rows ``[j*T, (j+1)*T)``) goes to rank j, which adds the P blocks it
    receives in rank order (an even all-to-all, then one sum: a reduce-scatter whose order is fixed)."""
    x = x.contiguous()
    received = torch.empty_like(x)
    comm.all_to_all_single(received, x)
    return received.view(comm.world_size, -1, *x.shape[1:]).sum(0)


class _AllGatherRows(torch.autograd.Function):
    """``all_gather`` of the rows of ``x[T, ...]`` into ``[P*T, ...]`` (rank-major); backward: each rank
    gets the sum over ranks of the gradient rows of its own ``T`` (`_sum_blocks`). With ``handle`` (a
    list) the forward is asynchronous, as in `_AllToAll`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Communicator, handle: list | None,
                timer: _Timer | None) -> torch.Tensor:
        ctx.comm, ctx.timer = comm, timer
        out, work = _gather_rows(x, comm, async_op=handle is not None)
        if handle is not None:
            handle.append(work)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        return _timed_backward(ctx.timer, lambda: _sum_blocks(grad, ctx.comm)), None, None, None


class _SumToOwners(torch.autograd.Function):
    """The adjoint of `_AllGatherRows`: ``[P*T, ...]`` partial results -> ``[T, ...]``, each rank's rows
    summed over the ranks (`_sum_blocks`); backward all-gathers the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Communicator, timer: _Timer | None) -> torch.Tensor:
        ctx.comm, ctx.timer = comm, timer
        return _sum_blocks(x, comm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        return _timed_backward(ctx.timer, lambda: _gather_rows(grad, ctx.comm)[0]), None, None


class _MaskGrad(torch.autograd.Function):
    """Identity forward; backward zeroes the gradient rows where ``keep`` is False (rows a grouped GEMM
    left unwritten must not reach the permute's backward, which sums them into tokens)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(keep)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        (keep,) = ctx.saved_tensors
        return grad.masked_fill(~keep, 0), None


# -- the expert-parallel experts -----------------------------------------------------------------
class ExpertParallelExperts(nn.Module):
    """This rank's slice of a MoE layer's routed experts, with token dispatch and combine over ``ep_comm``.

    Parameters keep the names and layout of `Experts` (``gate_up_proj[E/P, 2I, h]``,
    ``down_proj[E/P, h, I]``) and carry ``_expert_shard = (expert_offset, num_global_experts)``.
    ``overlap`` (default True) runs the shared experts while the host waits for the split sizes (on
    CUDA: the device then has work queued when the host resumes) or else while the dispatch
    all-to-all (``allgather``: the tokens' all-gather) is in flight; ``dispatch``: what travels (`DISPATCH`);
    ``timing`` (default False) records device events around the all-to-alls for `timings`.
    """

    def __init__(self, experts: Experts, ep_comm: Communicator, *, overlap: bool = True, timing: bool = False,
                 dispatch: str = "pairs"):
        super().__init__()
        if dispatch not in DISPATCH:
            raise ValueError(f"unknown expert dispatch {dispatch!r}: one of {', '.join(DISPATCH)}")
        self.dispatch = dispatch
        num_global = experts.gate_up_proj.shape[0]
        size = ep_comm.world_size
        if num_global % size:
            raise ValueError(f"{num_global} routed experts do not split over an expert-parallel group of {size}")
        self.ep_comm = ep_comm
        self.num_global_experts = num_global
        self.num_local_experts = num_global // size
        self.expert_offset = ep_comm.rank * self.num_local_experts
        local = slice(self.expert_offset, self.expert_offset + self.num_local_experts)
        self.gate_up_proj = _shard(experts.gate_up_proj, local, num_global)
        self.down_proj = _shard(experts.down_proj, local, num_global)
        # the same HAL ops the full module resolved
        self._permute, self._unpermute = experts._permute, experts._unpermute
        self._silu_and_mul, self._grouped_linear = experts._silu_and_mul, experts._grouped_linear
        self.overlap = overlap
        self.timing = timing
        self._timer: _Timer | None = None

    def extra_repr(self) -> str:
        return (f"experts [{self.expert_offset}, {self.expert_offset + self.num_local_experts}) of "
                f"{self.num_global_experts}, ep rank {self.ep_comm.rank}/{self.ep_comm.world_size}, "
                f"overlap={self.overlap}, dispatch={self.dispatch}")

    def timings(self) -> AllToAllTimes:
        """The all-to-all times since the last call (needs ``timing=True``); syncs the device once."""
        return self._timer.collect() if self._timer is not None else AllToAllTimes()

    def _get_timer(self) -> _Timer | None:
        if not self.timing:
            return None
        if self._timer is None:
            d = self.gate_up_proj.device
            self._timer = _Timer(Device(d.type, d.index))
        return self._timer

    def _exchange_counts(self, counts: torch.Tensor, shared: Callable[..., torch.Tensor] | None,
                         timer: _Timer | None) -> tuple[list[int], list[int], torch.Tensor, torch.Tensor | None, Any]:
        """Send ``counts`` (an even split: one equal block per peer), receive the peers' blocks for
        this rank, and bring both to the host: the layer's one host sync. Returns (sent, received)
        as lists, the received counts on the device, the shared experts' output if they ran while the
        host waited, and the event that closes the count exchange's span."""
        t0 = timer.mark() if timer else None
        counts = counts.to(torch.int64).contiguous()
        recv_counts = torch.empty_like(counts)
        self.ep_comm.all_to_all_single(recv_counts, counts)
        both = torch.cat([counts.reshape(-1), recv_counts.reshape(-1)])
        shared_out = t1 = None
        if self.overlap and shared is not None and both.device.type == "cuda":
            # the one host sync, made late: the counts travel to pinned memory, the shared experts are
            # queued behind them, and the host waits for the counts only, so the device has the shared
            # experts to run while the host learns the sizes and queues the dispatch
            host = torch.empty(both.shape, dtype=both.dtype, pin_memory=True)
            host.copy_(both, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            t1 = timer.mark() if timer else None
            shared_out = shared()
            ready.synchronize()
            both = host
        sizes = both.tolist()  # the host sync (buffers need their sizes) unless it happened above
        if timer:
            if t1 is None:
                t1 = timer.mark()
            timer.add("counts_s", t0, t1)
        return sizes[:len(sizes) // 2], sizes[len(sizes) // 2:], recv_counts, shared_out, t1

    def _dispatch(self, rows: torch.Tensor, recv: list[int], send: list[int], shared_out: torch.Tensor | None,
                  shared: Callable[..., torch.Tensor] | None, timer: _Timer | None,
                  t1: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The uneven all-to-all of ``rows`` (async), the shared experts during it if not run yet."""
        return self._transfer(lambda handle: _AllToAll.apply(rows, self.ep_comm, recv, send, handle, timer),
                              shared_out, shared, timer, t1)

    def _transfer(self, start: Callable[[list], torch.Tensor], shared_out: torch.Tensor | None,
                  shared: Callable[..., torch.Tensor] | None, timer: _Timer | None,
                  t1: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``start(handle)`` issues an asynchronous transfer; the shared experts run while it is in flight
        (with overlap, unless they already ran while the host waited for the split sizes); then wait."""
        handle: list = []
        received = start(handle)
        if self.overlap and shared is not None and shared_out is None:
            shared_out = shared()
        t2 = timer.mark() if timer else None
        with torch.no_grad():  # the transfer fills `received` in place; not an autograd operation
            handle[0].wait()
        if timer:
            t3 = timer.mark()
            timer.add("dispatch_s", t1, t3)
            timer.add("dispatch_exposed_s", t2, t3)
        return received, shared_out

    def _experts(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        hidden = self._silu_and_mul(self._grouped_linear(rows, self.gate_up_proj, counts))
        return self._grouped_linear(hidden, self.down_proj, counts)

    def _combine(self, rows: torch.Tensor, send: list[int], recv: list[int], timer: _Timer | None) -> torch.Tensor:
        t4 = timer.mark() if timer else None
        back = _AllToAll.apply(rows, self.ep_comm, send, recv, None, timer)
        if timer:
            timer.add("combine_s", t4, timer.mark())
            timer.times.forwards += 1
        return back

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                shared: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
        run = {"pairs": self._forward_pairs, "tokens": self._forward_tokens,
               "allgather": self._forward_allgather}[self.dispatch]
        out, shared_out = run(x, indices, weights, shared)
        if shared is not None:
            out = out + shared_out if shared_out is not None else shared(out)
        return out

    def _forward_pairs(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                       shared: Callable[..., torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        size, local_e = self.ep_comm.world_size, self.num_local_experts
        timer = self._get_timer()
        x_sorted, order, counts = self._permute(x, indices, self.num_global_experts)
        # counts[e] rows for global expert e; peer j gets experts [j*L, (j+1)*L), L each: an even split;
        # received: [src rank, local expert] rows this rank will get
        sent, received_counts, recv_counts, shared_out, t1 = self._exchange_counts(counts, shared, timer)
        send = [sum(sent[j * local_e:(j + 1) * local_e]) for j in range(size)]
        recv = [sum(received_counts[j * local_e:(j + 1) * local_e]) for j in range(size)]

        received, shared_out = self._dispatch(x_sorted, recv, send, shared_out, shared, timer, t1)
        # received rows are ordered (source rank, local expert): regroup them by local expert
        # (stable, so each expert's rows stay in source-rank order) with the HAL's permute
        local_ids = torch.repeat_interleave(torch.arange(local_e, device=x.device).repeat(size), recv_counts,
                                            output_size=sum(recv))
        grouped, regroup, local_counts = self._permute(received, local_ids.unsqueeze(1), local_e)
        y = self._experts(grouped, local_counts)
        # back to (source rank, local expert) order: unpermute with unit weights is the inverse permutation
        y = self._unpermute(y, regroup, torch.ones(y.shape[0], 1, dtype=y.dtype, device=y.device))
        y = self._combine(y, send, recv, timer)
        return self._unpermute(y, order, weights), shared_out

    def _forward_tokens(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                        shared: Callable[..., torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        size, local_e = self.ep_comm.world_size, self.num_local_experts
        timer = self._get_timer()
        tokens, k = indices.shape
        dest = torch.div(indices, local_e, rounding_mode="floor")  # the rank of each pick
        need = torch.zeros(tokens, size, dtype=torch.bool, device=x.device).scatter_(1, dest, True)
        # per peer: the pairs for each of its local experts, then the number of tokens it gets
        pairs = expert_counts(indices.reshape(-1), self.num_global_experts).view(size, local_e)
        counts = torch.cat([pairs, need.sum(0).unsqueeze(1).to(pairs.dtype)], dim=1)  # [P, L + 1]
        sent, received_counts, _, shared_out, t1 = self._exchange_counts(counts, shared, timer)
        block = local_e + 1
        send = [sent[j * block + local_e] for j in range(size)]
        recv = [received_counts[j * block + local_e] for j in range(size)]
        valid = sum(received_counts[j * block + e] for j in range(size) for e in range(local_e))
        # the (rank, token) pairs to send, rank-major, tokens in order: a stable sort puts them first
        flat = need.t().reshape(-1)
        sel = torch.argsort((~flat).to(torch.int8), stable=True)[:sum(send)]
        rank_of = torch.div(sel, tokens, rounding_mode="floor")
        token_of = sel - rank_of * tokens
        mine = dest.index_select(0, token_of) == rank_of.unsqueeze(1)  # [sent, k]: the picks on that rank
        ids = torch.where(mine, indices.index_select(0, token_of) - rank_of.unsqueeze(1) * local_e, local_e)
        acc = torch.promote_types(weights.dtype, torch.float32)  # holds the expert ids exactly
        w = torch.where(mine, weights.index_select(0, token_of).to(acc), 0.0)
        meta = _AllToAll.apply(torch.cat([ids.to(acc), w], dim=1), self.ep_comm, recv, send, None, None)
        received, shared_out = self._dispatch(x.index_select(0, token_of), recv, send, shared_out, shared,
                                              timer, t1)
        # each received token to its local experts; the slots of other ranks' experts form group L,
        # sorted last, cut off at the pair count the count exchange gave
        grouped, order, local_counts = self._permute(received, meta[:, :k].detach().long(), local_e + 1)
        y = self._experts(grouped[:valid], local_counts[:local_e])
        y = torch.cat([y, y.new_zeros(grouped.shape[0] - valid, y.shape[1])])
        part = self._unpermute(y, order, meta[:, k:].to(weights.dtype))  # this rank's share of each token
        back = self._combine(part, send, recv, timer)
        # each token's shares from the ranks, added in rank order (no atomics: bitwise reproducible)
        full = back.new_zeros(size * tokens, back.shape[1]).index_copy(0, sel, back)
        return full.view(size, tokens, -1).sum(0), shared_out

    def _forward_allgather(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                           shared: Callable[..., torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every token to every rank of the group, no split sizes, so no host sync: an all-gather of the
        tokens and their routing, each rank's experts on the picks that are its own (the others form a
        sentinel group sorted last), and the weighted partial outputs summed back to their owners.

        The experts' buffer has a slot per (gathered token, pick): ``P*T*k`` rows, of which only the
        first ``sum(counts)`` (known on the device only) are this rank's. `grouped_linear` leaves the
        rows past them unspecified, so the output rows there are zeroed and their gradient rows dropped.
        Needs the same token count on every rank of the group (the trainer's micro-batches are).
        """
        local_e, rank = self.num_local_experts, self.ep_comm.rank
        timer = self._get_timer()
        k = indices.shape[1]
        acc = torch.promote_types(weights.dtype, torch.float32)  # holds the expert ids exactly
        routing = _AllGatherRows.apply(torch.cat([indices.to(acc), weights.to(acc)], dim=1), self.ep_comm,
                                       None, None)
        t1 = timer.mark() if timer else None
        gathered, shared_out = self._transfer(lambda handle: _AllGatherRows.apply(x, self.ep_comm, handle, timer),
                                              None, shared, timer, t1)
        ids = routing[:, :k].detach().long() - rank * local_e
        mine = (ids >= 0) & (ids < local_e)
        grouped, order, counts = self._permute(gathered, torch.where(mine, ids, local_e), local_e + 1)
        keep = (torch.arange(grouped.shape[0], device=x.device) < counts[:local_e].sum()).unsqueeze(1)
        y = self._experts(_MaskGrad.apply(grouped, keep), counts[:local_e]).masked_fill(~keep, 0)
        part = self._unpermute(y, order, torch.where(mine, routing[:, k:], 0.0).to(weights.dtype))
        t4 = timer.mark() if timer else None
        out = _SumToOwners.apply(part, self.ep_comm, timer)
        if timer:
            timer.add("combine_s", t4, timer.mark())
            timer.times.forwards += 1
        return out, shared_out


def _shard(full: nn.Parameter, local: slice, num_global: int) -> nn.Parameter:
    p = nn.Parameter(full.detach()[local].clone(), requires_grad=full.requires_grad)
    setattr(p, EXPERT_SHARD_ATTR, (local.start, num_global))
    return p


# -- applying it -----------------------------------------------------------------------------------
def apply_expert_parallel(model: DeepseekV3, ep_comm: Communicator, *, overlap: bool = True,
                          timing: bool = False, dispatch: str = "pairs") -> None:
    """Shard every MoE layer's routed experts over ``ep_comm`` (this rank's EP group), in place.

    Call it after the weights are initialized or loaded (each rank keeps its slice of the full
    weights, so EP P starts from the same model as EP 1) and before the optimizer is built (the
    expert parameters are new objects). With a group of one rank it changes nothing.
    """
    if ep_comm.world_size == 1:
        return
    for moe in model.moe_layers():
        if isinstance(moe.experts, ExpertParallelExperts):
            raise ValueError("expert parallelism is already applied to this model")
        moe.experts = ExpertParallelExperts(moe.experts, ep_comm, overlap=overlap, timing=timing, dispatch=dispatch)


def expert_parallel_modules(model: nn.Module) -> Iterator[tuple[str, ExpertParallelExperts]]:
    for name, module in model.named_modules():
        if isinstance(module, ExpertParallelExperts):
            yield name, module


def is_expert_param(param: torch.Tensor) -> bool:
    """True for a parameter sharded by `apply_expert_parallel` (reduce over the expert-DP group only)."""
    return getattr(param, EXPERT_SHARD_ATTR, None) is not None


def expert_shard(param: torch.Tensor) -> tuple[int, int] | None:
    """``(expert_offset, num_global_experts)`` of a sharded expert parameter: its rows are the global
    experts ``[offset, offset + param.shape[0])``; None for a replicated parameter."""
    return getattr(param, EXPERT_SHARD_ATTR, None)


def expert_params(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The sharded expert parameters with their names (the same names as without EP)."""
    for name, p in model.named_parameters():
        if is_expert_param(p):
            yield name, p


def gather_experts(local: torch.Tensor, ep_comm: Communicator) -> torch.Tensor:
    """The full ``[E, ...]`` tensor from each EP rank's ``[E/P, ...]`` slice (for checkpoints, tests)."""
    out = local.new_empty((ep_comm.world_size * local.shape[0], *local.shape[1:]))
    ep_comm.all_gather(out, local.contiguous())
    return out


def layer_timings(model: nn.Module) -> dict[str, AllToAllTimes]:
    """Per MoE layer (by module name), the all-to-all times since the last call (``timing=True``)."""
    return {name: m.timings() for name, m in expert_parallel_modules(model)}


def set_timing(model: nn.Module, enabled: bool) -> None:
    for _, m in expert_parallel_modules(model):
        m.timing = enabled


# -- groups and gradients ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpertParallelGroups:
    """This rank's expert-parallel group and expert-data-parallel group (None when it has one rank)."""

    ep: Communicator | None
    expert_dp: Communicator | None
    ep_size: int
    dp_size: int


def expert_parallel_groups(comm: Communicator, ep_size: int) -> ExpertParallelGroups:
    """Split ``comm`` (every rank) into EP groups ``[k*P, (k+1)*P)`` and expert-DP groups ``{q, q+P, ...}``.

    Call it on every rank. One-rank groups are not created (None). An EP group is its own
    communicator even when it spans the world: on the world's, the token all-to-alls would queue
    behind the gradient reduce-scatters and weight all-gathers that overlap the same compute.
    """
    world = comm.world_size
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"expert_parallel={ep_size} does not divide the world size {world}")
    dp_size = world // ep_size
    ep = None
    if ep_size > 1:
        for k in range(dp_size):
            group = comm.new_group(list(range(k * ep_size, (k + 1) * ep_size)))
            ep = group if group is not None else ep
    expert_dp = comm if dp_size == world else None
    if 1 < dp_size < world:
        for q in range(ep_size):
            group = comm.new_group(list(range(q, world, ep_size)))
            expert_dp = group if group is not None else expert_dp
    return ExpertParallelGroups(ep=ep, expert_dp=expert_dp, ep_size=ep_size, dp_size=dp_size)


def average_gradients(model: nn.Module, comm: Communicator | None, expert_dp_comm: Communicator | None) -> None:
    """Make every gradient the gradient of the mean loss over all ranks of ``comm`` (the world).

    Replicated parameters: averaged over ``comm`` (one flat all-reduce). Expert shards: their
    gradient already sums the loss gradients of the whole EP group, so it is summed over
    ``expert_dp_comm`` (the replicas of the shard; None when there are none) and divided by the
    world size (one flat all-reduce).
    """
    world = comm.world_size if comm is not None else 1
    params = [p for p in model.parameters() if p.requires_grad]
    dense = [p for p in params if not is_expert_param(p)]
    experts = [p for p in params if is_expert_param(p)]
    if comm is not None and world > 1:
        _flat_all_reduce(dense, comm, "avg")
    if experts:
        if expert_dp_comm is not None and expert_dp_comm.world_size > 1:
            _flat_all_reduce(experts, expert_dp_comm, "sum")
        for p in experts:
            if p.grad is not None:
                p.grad.div_(world)


def grad_norm(model: nn.Module, ep_comm: Communicator | None) -> torch.Tensor:
    """The L2 norm of the whole model's gradient (after `average_gradients`), the same on every rank.

    Replicated gradients count once; each expert shard counts once, its squared norm summed over the
    EP group (its replicas in other EP groups hold the same values). A float64 scalar tensor.
    """
    dense = torch.zeros((), dtype=torch.float64)
    experts = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is None:
            continue
        sq = p.grad.detach().to(torch.float64).square().sum().cpu()
        if is_expert_param(p):
            experts += sq
        else:
            dense += sq
    if ep_comm is not None and ep_comm.world_size > 1:
        device = getattr(ep_comm, "device", None) or next(model.parameters()).device
        t = experts.reshape(1).to(device)
        ep_comm.all_reduce(t)
        experts = t.cpu()[0]
    return (dense + experts).sqrt()


def _flat_all_reduce(params: list[nn.Parameter], comm: Communicator, op: str) -> None:
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    comm.all_reduce(flat, op=op)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g)
        offset += g.numel()


# -- node-limited routing ------------------------------------------------------------------------------
def max_ranks_per_token(config: DeepseekV3Config, ep_size: int) -> int:
    """An upper bound on the EP ranks one token's copies go to (its all-to-all fan-out).

    Expert groups are contiguous (``E/n_group`` experts each), as are EP shards (``E/P``). When
    the groups nest in the shards or the shards in the groups, a token that keeps ``topk_group``
    groups reaches at most ``topk_group * max(1, P / n_group)`` ranks; otherwise only ``top_k``
    and ``P`` bound it.
    """
    c = config
    bound = min(c.num_experts_per_tok, ep_size)
    if c.n_group > 1 and (c.n_group % ep_size == 0 or ep_size % c.n_group == 0):
        bound = min(bound, c.topk_group * max(1, ep_size // c.n_group))
    return bound
