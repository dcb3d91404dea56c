"""The distributed optimizer's dtypes on one rank: weight-dtype gradient buffers and bf16 moments.

These runs share every input and every operation, so their results are compared exactly where the
arithmetic is the same, and with bounds from bf16's unit roundoff (2**-8) where it is not.
"""

from __future__ import annotations

import pytest
import torch

from openseek_hal.backend import get_backend
from openseek_hal.train.zero import DistributedOptimizer, named_spaces

LR = 1e-2


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).to(dtype)


def _opt(model: torch.nn.Module, **kw) -> DistributedOptimizer:
    return DistributedOptimizer(named_spaces(model, None, None, lambda p: False), get_backend("cpu"), world=None,
                                lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **kw)


def _train(model: torch.nn.Module, opt: DistributedOptimizer, steps: int, clip: float | None = None,
           micro: int = 1) -> list[float]:
    gen = torch.Generator().manual_seed(1)
    dtype = next(model.parameters()).dtype
    norms = []
    for _ in range(steps):
        opt.start_step(micro)
        for _ in range(micro):
            model(torch.randn(4, 16, generator=gen).to(dtype)).square().mean().backward()
            opt.next_micro_batch()
        opt.finish_gradients()
        norms.append(float(opt.step(LR, clip).grad_norm))
    return norms


def test_one_micro_batch_keeps_bf16_gradients_and_updates_as_fp32_buffers_do():
    wide_model, narrow_model = _model(torch.bfloat16), _model(torch.bfloat16)
    wide, narrow = _opt(wide_model), _opt(narrow_model, grad_dtype=torch.bfloat16)
    assert {b.grad_buffer.dtype for b in wide.buckets} == {torch.float32}
    # one rank, one micro-batch: no buffer, the update reads autograd's bf16 gradients in place
    assert all(b.grad_buffer is None for b in narrow.buckets)
    assert narrow.memory_bytes()["gradients"] == sum(2 * p.numel() for p in narrow_model.parameters())
    # a bf16 gradient widened to fp32 is the same number: the unclipped updates are identical
    _train(wide_model, wide, 3)
    _train(narrow_model, narrow, 3)
    for p, q in zip(wide_model.parameters(), narrow_model.parameters(), strict=True):
        assert torch.equal(p, q)
    for a, b in zip(wide.buckets, narrow.buckets, strict=True):
        assert torch.equal(a.master, b.master) and torch.equal(a.exp_avg_sq, b.exp_avg_sq)


def test_a_bucket_without_buffer_reads_autograds_gradients_and_zero_for_a_parameter_without_one():
    model = _model(torch.bfloat16)
    opt = _opt(model, grad_dtype=torch.bfloat16)
    first, unused = model[0].weight, model[2].bias
    x = torch.randint(-4, 5, (4, 16)).to(torch.bfloat16)  # small integers: every sum is exact
    opt.start_step(1)
    (model[0](x).sum() + model[2].weight.sum()).backward()  # model[2].bias gets no gradient
    expected = x.float().sum(0).expand(32, 16).to(torch.bfloat16)
    opt.finish_gradients()
    grads = {id(p): g for b in opt.buckets for p_id, g in b.grads.items() for p in [first, unused] if id(p) == p_id}
    assert torch.equal(grads[id(first)], expected)
    assert torch.equal(grads[id(unused)], torch.zeros_like(unused))
    assert first.grad is None  # handed to the optimizer, not kept twice
    before = unused.detach().clone()
    opt.step(LR, None)
    assert all(not b.grads for b in opt.buckets)  # freed with the update
    # a zero gradient: only the weight decay moves it (no decay on a bias: it stays)
    assert torch.equal(unused, before)


def test_gradient_norm_of_bf16_buffers_matches_fp32_buffers_within_the_summation_bound():
    wide_model, narrow_model = _model(torch.bfloat16), _model(torch.bfloat16)
    wide, narrow = _opt(wide_model), _opt(narrow_model, grad_dtype=torch.bfloat16)
    n = sum(p.numel() for p in wide_model.parameters())
    # clipped hard: every step's update depends on the norm; the same values summed in another order
    # differ by at most n * 2**-24 relative (fp32 accumulation), the weights by what that does to lr*coef
    a, b = _train(wide_model, wide, 1, clip=1e-3), _train(narrow_model, narrow, 1, clip=1e-3)
    assert a[0] > 1e-2
    assert b == pytest.approx(a, rel=n * 2.0**-24)


def test_accumulation_refuses_weight_dtype_gradient_buffers():
    model = _model(torch.bfloat16)
    opt = _opt(model, grad_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="accumulating 2 micro-batches needs torch.float32 gradient buffers"):
        _train(model, opt, 1, micro=2)


def test_bf16_moments_are_the_fp32_moments_rounded_and_move_the_weights_within_bf16_roundoff():
    ref_model, bf_model = _model(torch.float32), _model(torch.float32)
    ref, bf = _opt(ref_model), _opt(bf_model, moment_dtype=torch.bfloat16)
    assert {b.exp_avg.dtype for b in bf.buckets} == {b.exp_avg_sq.dtype for b in bf.buckets} == {torch.bfloat16}
    # fp32 weights are their own master: the state is the moments, 2 + 2 bytes per element, not 4 + 4
    assert bf.memory_bytes()["optimizer"] * 2 == ref.memory_bytes()["optimizer"]
    _train(ref_model, ref, 1)
    _train(bf_model, bf, 1)
    # step 1 updates with the unrounded moments, then stores them rounded
    for p, q in zip(ref_model.parameters(), bf_model.parameters(), strict=True):
        assert torch.equal(p, q)
    for a, b in zip(ref.buckets, bf.buckets, strict=True):
        assert torch.equal(a.exp_avg.to(torch.bfloat16), b.exp_avg)
        assert torch.equal(a.exp_avg_sq.to(torch.bfloat16), b.exp_avg_sq)
    before = [p.detach().clone() for p in ref_model.parameters()]
    _train(ref_model, ref, 1)
    _train(bf_model, bf, 1)
    # step 2: the stored moments are off by at most 2**-8 relative, so m/sqrt(v) by under 2 * 2**-8 of
    # itself, and |m/sqrt(v)| <= 2 after two bias-corrected steps: the update differs by < lr * 2**-6
    for p, q, p0 in zip(ref_model.parameters(), bf_model.parameters(), before, strict=True):
        assert (p - p0).abs().max() > 10 * LR * 2.0**-6  # the bound is far below one update
        assert (p - q).abs().max() <= LR * 2.0**-6


def _exchanged_gradients(comm, steps):
    """Each rank's shard sums after one backward, for both exchanges, from bf16 weights and gradients
    (every rank sees other data), and the exact float64 sums of the ranks' bf16 gradients."""
    from openseek_hal.train.zero import named_spaces as spaces

    out = {}
    for exchange in ("reduce_scatter", "all_to_all"):
        model = _model(torch.bfloat16)
        opt = DistributedOptimizer(spaces(model, comm, comm, lambda p: False), get_backend("cpu"), world=comm,
                                   lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, bucket_mb=0.001,
                                   grad_dtype=torch.bfloat16, exchange=exchange)
        gen = torch.Generator().manual_seed(100 + comm.rank)
        sums = []
        for _ in range(steps):
            opt.start_step(1)
            model(torch.randn(4, 16, generator=gen).to(torch.bfloat16)).square().mean().backward()
            opt.next_micro_batch()
            wire = {b.grad_buffer.dtype for b in opt.buckets}
            opt.finish_gradients()
            sums.append([b.step_grad.clone() for b in opt.buckets])
            opt.step(LR, None)
        everyone = []
        for b in opt.buckets:  # the last step's bf16 buffers of every rank, summed exactly
            gathered = b.grad_buffer.new_empty(comm.world_size * b.numel)
            comm.all_gather(gathered, b.grad_buffer)
            shard = gathered.view(comm.world_size, comm.world_size, -1)[:, comm.rank]
            everyone.append((shard.double().sum(0), shard.double().abs().sum(0)))
        out[exchange] = ([[t.numpy() for t in s] for s in sums], wire,
                         [(e.numpy(), a.numpy()) for e, a in everyone],
                         [p.detach().float().numpy() for p in model.parameters()])
    return out


@pytest.mark.parametrize("ranks", [2, 4])
def test_all_to_all_exchange_sums_bf16_gradients_in_fp32(ranks):
    """``exchange="all_to_all"``: the buckets travel in bf16 and each owner sums the copies in fp32. On
    2 ranks that is the float32 reduce-scatter's sum exactly (one addition of two bf16 numbers), so the
    trained weights are identical; on 4 the order may differ, and each sum is within the recursive
    summation bound (3 roundings of 2**-24 relative to the sum of magnitudes) of the exact float64 sum."""
    from openseek_hal.comm import launch

    for rank_out in launch(_exchanged_gradients, ranks, args=(3,)):
        rs_sums, rs_wire, _, rs_weights = rank_out["reduce_scatter"]
        a2a_sums, a2a_wire, exact, a2a_weights = rank_out["all_to_all"]
        assert rs_wire == {torch.float32} and a2a_wire == {torch.bfloat16}  # half the bytes on the wire
        for (ref, magnitude), got in zip(exact, a2a_sums[-1], strict=True):
            assert str(got.dtype) == "float32"
            assert (abs(got.astype("float64") - ref) <= (ranks - 1) * 2.0 ** -24 * magnitude).all()
        if ranks == 2:
            for a, b in zip(rs_sums, a2a_sums, strict=True):
                assert all((x == y).all() for x, y in zip(a, b, strict=True))
            assert all((x == y).all() for x, y in zip(rs_weights, a2a_weights, strict=True))


def _set_grads(model: torch.nn.Module, step: int) -> None:
    """The same gradients for every model built by `_model` (no forward: the runs compared must not feed
    their own weights back into their gradients)."""
    gen = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def _step_with_grads(model: torch.nn.Module, opt: DistributedOptimizer, steps: int) -> None:
    for step in range(steps):
        opt.start_step(1)
        _set_grads(model, step)
        for p in model.parameters():  # the hooks run on backward's accumulation; call them as autograd would
            for hook in p._post_accumulate_grad_hooks.values():
                hook(p)
        opt.finish_gradients()
        opt.step(LR, 1.0)


def _masters(opt: DistributedOptimizer) -> list[torch.Tensor]:
    return [values["master"] for _, values in opt.state_segments()]


def test_master_remainders_are_the_fp32_masters_exactly_in_half_the_memory():
    """Masters kept as remainders of the bf16 weights take the same updates bit for bit (same arithmetic,
    the same fp32 numbers stored otherwise); each weight is its master's upper half rounded to nearest,
    where the whole-master run rounds to nearest even: the two weights differ only at exact halves."""
    from openseek_hal.ops.optim import split_master

    full_model, split_model = _model(torch.bfloat16), _model(torch.bfloat16)
    full = _opt(full_model, grad_dtype=torch.bfloat16)
    split = _opt(split_model, grad_dtype=torch.bfloat16, master_remainder=True)
    assert all(b.master is None and b.remainder.dtype == torch.int16 for b in split.buckets)
    n = sum(p.numel() for p in full_model.parameters())
    moments = 2 * 4 * sum(b.shard_numel for b in full.buckets)
    assert full.memory_bytes()["optimizer"] - moments == 4 * sum(b.shard_numel for b in full.buckets) >= 4 * n
    assert split.memory_bytes()["optimizer"] - moments == 2 * sum(b.shard_numel for b in split.buckets)
    _step_with_grads(full_model, full, 5)
    _step_with_grads(split_model, split, 5)
    for a, b in zip(_masters(full), _masters(split), strict=True):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    for a, b in zip(full.buckets, split.buckets, strict=True):
        assert torch.equal(a.exp_avg, b.exp_avg) and torch.equal(a.exp_avg_sq, b.exp_avg_sq)
    moved = 0
    for (seg, values), p in zip(split.state_segments(), [s.param for s in full.segments()], strict=True):
        master = values["master"]
        weight = seg.param.detach().view(-1)[seg.param_offset:seg.param_offset + seg.numel]
        assert torch.equal(weight.view(torch.int16), split_master(master)[0].view(torch.int16))
        rounded = p.detach().view(-1)[seg.param_offset:seg.param_offset + seg.numel]
        assert torch.equal(rounded, master.to(torch.bfloat16))
        tie = (master.view(torch.int32) & 0xFFFF) == 0x8000
        assert torch.equal(weight[~tie], rounded[~tie])
        moved += int((master != master.to(torch.bfloat16).float()).sum())
    assert moved > n // 2  # the masters carry bits the weights do not: the remainders are in use


def test_master_remainders_apply_only_to_bf16_weights_with_fp32_masters():
    opt = _opt(_model(torch.float32), master_remainder=True)  # fp32 weights are their own masters
    assert all(b.remainder is None and b.aliased for b in opt.buckets)


def test_master_remainders_load_from_and_save_to_whole_fp32_masters():
    """Optimizer state moves between the two forms through `state_segments` / `load_segment` (what a
    checkpoint does): masters equal bitwise, and a loaded remainder sets the weight to the master's upper
    half."""
    full_model, split_model = _model(torch.bfloat16), _model(torch.bfloat16)
    full = _opt(full_model, grad_dtype=torch.bfloat16)
    _step_with_grads(full_model, full, 3)
    split = _opt(split_model, grad_dtype=torch.bfloat16, master_remainder=True)
    for seg, (_, values) in zip(split.segments(), full.state_segments(), strict=True):
        for key, value in values.items():
            split.load_segment(seg, key, value.clone())
    split.step_count = full.step_count
    split.gather_weights()
    for a, b in zip(_masters(full), _masters(split), strict=True):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    back_model = _model(torch.bfloat16)
    back = _opt(back_model, grad_dtype=torch.bfloat16)
    for seg, (_, values) in zip(back.segments(), split.state_segments(), strict=True):
        for key, value in values.items():
            back.load_segment(seg, key, value)
    back.gather_weights()
    for p, q in zip(full_model.parameters(), back_model.parameters(), strict=True):
        assert torch.equal(p, q)
    _step_with_grads(full_model, full, 2)
    _step_with_grads(split_model, split, 2)
    for a, b in zip(_masters(full), _masters(split), strict=True):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def _float64_norm_of_bf16_shards(comm):
    """A float64 run reducing in bf16: the optimizer's gradient norm, and the same norm from the reduced
    shards converted to float64 (exactly) and summed in float64 here."""
    from openseek_hal.train.zero import named_spaces as spaces

    model = _model(torch.float64)
    opt = DistributedOptimizer(spaces(model, comm, comm, lambda p: False), get_backend("cpu"), world=comm,
                               lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, bucket_mb=0.001,
                               master_dtype=torch.float64, reduce_dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(7 + comm.rank)
    opt.start_step(1)
    model(torch.randn(4, 16, generator=gen, dtype=torch.float64)).square().mean().backward()
    opt.next_micro_batch()
    opt.finish_gradients()
    assert {b.step_grad.dtype for b in opt.buckets} == {torch.bfloat16}
    mine = torch.stack([b.step_grad.double().square().sum() for b in opt.buckets]).sum().reshape(1)
    comm.all_reduce(mine, op="sum")
    norm = opt.grad_norm()
    return norm.dtype, float(norm), float(mine[0].sqrt() * opt._scale)


def test_a_float64_run_sums_bf16_reduced_gradients_in_float64():
    """The norm's squares of bf16-reduced shards in a float64 run are summed in float64: within float64
    roundoff of the float64 sum (a float32 sum would be off by ~1e-8 of the norm)."""
    from openseek_hal.comm import launch

    for dtype, got, want in launch(_float64_norm_of_bf16_shards, 2):
        assert dtype == torch.float64
        assert abs(got - want) <= 1e-13 * want
