"""Expert parallelism on CPU ranks (gloo): EP x DP equals one rank with the whole batch.

Each case launches its ranks once (`openseek_hal.conformance.expert_parallel.run_case`): every rank
takes its slice of one global batch, runs forward, backward and `average_gradients`, and the loss
(averaged), every gradient (expert gradients gathered by global index) and the expert loads
(summed over the world by ``update_expert_bias``) are compared with one rank. The tolerance
(`expert_parallel.RTOL`) is derived in that module from float32 routing and float64 elsewhere.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from host_reads import HostReads

from openseek_hal.comm import launch
from openseek_hal.conformance import expert_parallel as epc
from openseek_hal.models import preset
from openseek_hal.ops.grouped import grouped_linear
from openseek_hal.train.expert_parallel import (
    ExpertParallelExperts,
    apply_expert_parallel,
    expert_params,
    layer_timings,
    max_ranks_per_token,
)


def _check(case: epc.Case, adaptor: str = "torch") -> list[epc.StepResult]:
    rows, results = epc.run_case(case, adaptor=adaptor)
    bad = [r for r in rows if not r["ok"]]
    assert not bad, bad[:5]
    # every quantity was compared on every rank
    assert len(rows) == case.world_size * (3 + len(results[0].grads))  # loss, grads, grad norm, loads
    return results


@pytest.mark.parametrize("world_size,ep_size", [(2, 2), (4, 4), (4, 2), (8, 8), (8, 4)],
                         ids=["ep2", "ep4", "ep2xdp2", "ep8", "ep4xdp2"])
def test_expert_parallel_matches_one_rank(world_size, ep_size):
    results = _check(epc.Case(ep_size=ep_size, world_size=world_size, batch=max(4, world_size)))
    # the experts really were split: each EP rank received tokens from the group
    assert all(n > 0 for n in results[0].ep_ranks_receiving)


@pytest.mark.parametrize("world_size,ep_size", [(2, 2), (4, 4)], ids=["ep2", "ep4"])
def test_expert_parallel_with_skewed_routing(world_size, ep_size):
    results = _check(epc.Case(ep_size=ep_size, world_size=world_size, skewed=True))
    loads = results[0].loads
    tokens = epc.Case(ep_size, world_size).batch * epc.Case(ep_size, world_size).seq
    assert (loads[:, 0] == tokens).all()  # every token picked expert 0
    assert (loads[:, 6:] == 0).all()  # nobody picked experts 6 and 7
    if ep_size == 4:  # the last EP rank owns experts 6 and 7: every split to it was empty
        assert results[0].ep_ranks_receiving[-1] == 0


@pytest.mark.parametrize("dispatch", ["tokens", "allgather"])
@pytest.mark.parametrize("world_size,ep_size,skewed", [(2, 2, False), (4, 4, False), (4, 2, False), (4, 4, True)],
                         ids=["ep2", "ep4", "ep2xdp2", "ep4-skewed"])
def test_token_dispatch_matches_one_rank(world_size, ep_size, skewed, dispatch):
    """``dispatch="tokens"`` (one row per (token, rank) travels) and ``"allgather"`` (every token to every
    rank, no split sizes): the same loss, gradients (routing weights' included, through the routing's
    exchange), grad norm and loads as one rank."""
    case = epc.Case(ep_size=ep_size, world_size=world_size, skewed=skewed, batch=max(4, world_size),
                    dispatch=dispatch)
    results = _check(case)
    if skewed:  # the last EP rank owns experts 6 and 7, which nobody picked: it received no token
        assert results[0].ep_ranks_receiving[-1] == 0
    else:
        assert all(n > 0 for n in results[0].ep_ranks_receiving)


@pytest.mark.parametrize("world_size,ep_size", [(2, 2), (4, 2)], ids=["ep2", "ep2xdp2"])
def test_allgather_dispatch_ignores_rows_past_the_counts(world_size, ep_size):
    """The allgather dispatch hands `grouped_linear` a buffer with rows past ``sum(counts)``, which the op
    leaves unspecified (a grouped GEMM leaves them unwritten): with NaN there, forward and backward, the
    step still equals one rank's."""
    _check(epc.Case(ep_size=ep_size, world_size=world_size, batch=max(4, world_size), dispatch="allgather",
                    unspecified_rows=True))


def test_nan_rows_reach_a_layer_that_reads_them():
    """The NaN wrapper is not a no-op: a layer that used rows past the counts would return NaN."""
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 4, dtype=torch.float64)
    y = epc.nan_past_counts(grouped_linear)(x, w, torch.tensor([2, 1]))
    assert y[:3].isfinite().all() and y[3:].isnan().all()
    y.sum().backward()
    assert x.grad[:3].isfinite().all() and x.grad[3:].isnan().all()


def _sync_free_permute(x, indices, num_experts):  # what the cuda backend's permute does: no host sync
    k = indices.shape[1]
    flat = indices.flatten()
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(num_experts, dtype=torch.int64).index_add_(0, flat, torch.ones_like(flat))
    return x.index_select(0, order // k), order, counts


def _sync_free_grouped(x, weight, counts):  # each row's group on the device, every group masked in
    group = torch.searchsorted(counts.cumsum(0), torch.arange(x.shape[0]), right=True)
    return sum((group == e).unsqueeze(1) * torch.nn.functional.linear(x, weight[e]) for e in range(weight.shape[0]))


def _host_syncs(comm, dispatch):
    case = epc.Case(ep_size=2, world_size=2)
    model = epc.build(case, "cpu", torch.float64)
    apply_expert_parallel(model, comm, dispatch=dispatch)
    layer = next(iter(model.moe_layers())).experts
    layer._permute, layer._grouped_linear = _sync_free_permute, _sync_free_grouped
    gen = torch.Generator().manual_seed(comm.rank)
    x = torch.randn(16, model.config.hidden_size, dtype=torch.float64, generator=gen, requires_grad=True)
    indices = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(16)])
    weights = torch.rand(16, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    with HostReads() as reads:
        out = layer(x, indices, weights)
        out.square().sum().backward()
    return reads.seen


def test_allgather_dispatch_never_waits_for_the_device():
    """No operator in the allgather layer's forward or backward needs the host to wait for the device
    (the other dispatches read the split sizes: the detector sees that, so it is not blind). The
    communicator's cross-rank check, which reads host fingerprints, is off as in training."""
    for seen in launch(_host_syncs, 2, args=("allgather",), check=False):
        assert seen == []
    for seen in launch(_host_syncs, 2, args=("tokens",), check=False):
        assert "Tensor.tolist" in seen


def _token_rows(comm):
    """Rows each dispatch sends for the same routing: per (token, expert) pair vs per (token, rank)."""
    case = epc.Case(ep_size=2, world_size=2)
    sent = {}
    for dispatch in ("pairs", "tokens"):
        model = epc.build(case, "cpu", torch.float64)
        apply_expert_parallel(model, comm, dispatch=dispatch)
        layer = next(iter(model.moe_layers())).experts
        rows = []
        original = layer._dispatch
        layer._dispatch = lambda r, *a, _o=original, _rows=rows: (_rows.append(r.shape[0]), _o(r, *a))[1]
        ids, labels = epc.batch(case, model.config.vocab_size)
        model.loss(ids[comm.rank::2], labels[comm.rank::2]).total.backward()
        sent[dispatch] = rows[0]
    return sent


def test_token_dispatch_sends_each_token_once_per_rank():
    case = epc.Case(ep_size=2, world_size=2)
    tokens = case.batch // 2 * case.seq  # each rank's own
    top_k = epc.build(case, "cpu", torch.float64).config.num_experts_per_tok
    for sent in launch(_token_rows, 2):
        # one row per pick (top-2 here), or one per rank a token needs (1 or 2 of the 2 ranks); the seeded
        # routing has tokens whose two experts sit on one rank, so fewer rows travel
        assert sent["pairs"] == tokens * top_k
        assert tokens <= sent["tokens"] < sent["pairs"]


@pytest.mark.parametrize("dispatch", ["pairs", "allgather"])
def test_expert_parallel_on_the_host_adaptor(dispatch):
    _check(epc.Case(ep_size=2, world_size=2, dispatch=dispatch), adaptor="host")


def _overlap_and_timings(comm):
    case = epc.Case(ep_size=2, world_size=2)
    model = epc.build(case, "cpu", torch.float64)
    apply_expert_parallel(model, comm, timing=True)
    ids, labels = epc.batch(case, model.config.vocab_size)
    ids, labels = ids[comm.rank::2], labels[comm.rank::2]
    overlapped = model.loss(ids, labels).total
    for moe in model.moe_layers():
        moe.experts.overlap = False
    serial = model.loss(ids, labels).total
    serial.backward()
    times = {name: t.as_dict() for name, t in layer_timings(model).items()}
    names = {name: (tuple(p.shape), p._expert_shard) for name, p in expert_params(model)}
    return float(overlapped.detach()), float(serial.detach()), times, names, layer_timings(model)[
        next(iter(times))].forwards


def test_overlap_changes_nothing_and_timings_are_reported():
    out = launch(_overlap_and_timings, 2)
    for rank, (overlapped, serial, times, names, after_reset) in enumerate(out):
        assert overlapped == serial  # the shared experts' place in the schedule changes no bit
        assert set(times) == {"layers.1.mlp.experts", "mtp.0.block.mlp.experts"}
        for t in times.values():
            assert t["forwards"] == 2
            assert t["counts_s"] > 0 and t["combine_s"] > 0 and t["backward_s"] > 0
            assert 0 <= t["dispatch_exposed_s"] <= t["dispatch_s"]
            assert 0 <= t["hidden_fraction"] <= 1
        assert after_reset == 0  # timings() hands the counters over and starts again
        # same names as without EP, first dim E/P, marked with (offset, global E)
        assert names["layers.1.mlp.experts.gate_up_proj"] == ((4, 32, 32), (4 * rank, 8))
        assert names["mtp.0.block.mlp.experts.down_proj"] == ((4, 32, 16), (4 * rank, 8))


def test_one_rank_group_is_a_no_op_and_uneven_split_is_refused():
    model = epc.build(epc.Case(1, 1), "cpu", torch.float64)
    before = {n: p for n, p in model.named_parameters()}
    apply_expert_parallel(model, SimpleNamespace(rank=0, world_size=1))
    assert {n: p for n, p in model.named_parameters()} == before
    assert not any(isinstance(m.experts, ExpertParallelExperts) for m in model.moe_layers())
    with pytest.raises(ValueError, match="do not split"):
        apply_expert_parallel(model, SimpleNamespace(rank=0, world_size=3))


def test_node_limited_routing_bounds_the_fan_out():
    v3 = preset("deepseek-v3")  # 256 experts top-8, 8 groups top-4
    assert max_ranks_per_token(v3, 8) == 4  # one group per rank: at most topk_group ranks
    assert max_ranks_per_token(v3, 64) == 8  # 8 ranks per group: bounded by top_k only
    assert max_ranks_per_token(v3, 4) == 4  # two groups per rank
    assert max_ranks_per_token(v3, 16) == 8  # 2 ranks per group: 4 groups x 2 ranks, and top_k
    small = preset("tiny", n_group=4, topk_group=1)
    assert max_ranks_per_token(small, 4) == 1 and max_ranks_per_token(small, 2) == 1
    assert max_ranks_per_token(preset("tiny", n_group=1, topk_group=1), 4) == 2  # top_k


def test_all_to_all_timer_skips_spans_inside_compiled_code(monkeypatch):
    """Under torch.compile an event in the graph is not recorded when it runs: such spans are left out
    (reading them would raise), the others still count."""
    from openseek_hal.device import Device
    from openseek_hal.train.expert_parallel import _Timer

    timer = _Timer(Device("cpu"))
    start, end = timer.mark(), timer.mark()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    inside = timer.mark()
    assert inside is None
    timer.add("combine_s", inside, end)
    timer.add("dispatch_s", start, end)
    assert [name for name, _, _ in timer.pending] == ["dispatch_s"]
