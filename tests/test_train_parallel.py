"""The parallel trainer on gloo ranks: ZeRO-1, accumulation, schedules, sharded checkpoints and resharding.

Runs that add gradient terms in different orders (ranks, micro-batches) are compared in float64.
AdamW turns a gradient difference dg into an update difference of at most lr * dg / eps / (1 - beta1)
for an element whose second moment is near eps, and dg <= n * u * |g| (n summed terms, u = 2**-53,
|g| <= 1 after clipping); `weight_bound` is that, per step.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from rich.console import Console

from openseek_hal.backend import get_backend
from openseek_hal.comm import launch
from openseek_hal.errors import ConfigError, UserError
from openseek_hal.train.checkpoint import CheckpointReader
from openseek_hal.train.config import TrainConfig, load_config
from openseek_hal.train.schedule import lr_at
from openseek_hal.train.trainer import train
from openseek_hal.train.zero import DistributedOptimizer, named_spaces

TINY = {"global_batch_size": 8, "seq_len": 32, "lr": 1e-2, "warmup_steps": 2, "tokenizer_vocab_size": 512,
        "sample_tokens": 4, "eval_batches": 1, "log_every": 2, "model.num_hidden_layers": 2,
        "dtype": "fp64", "bucket_mb": 0.05}  # small buckets: several per space, launched during backward


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENSEEK_HAL_CACHE", str(tmp_path / "cache"))


def _cfg(out, **kw) -> TrainConfig:
    return load_config(None, {**TINY, "out": str(out), **kw})


def _quiet() -> Console:
    return Console(file=open("/dev/null", "w"))  # noqa: SIM115


def _train_rank(comm, cfg, resume):
    return train(cfg, comm=comm, resume=resume, console=_quiet())


def _train(cfg: TrainConfig, ranks: int = 1, resume=None):
    if ranks == 1:
        return train(cfg, resume=resume, console=_quiet())
    return launch(_train_rank, ranks, args=(cfg, resume), timeout=120)[0]


def weight_bound(cfg: TrainConfig, steps: int) -> float:
    n_terms = cfg.global_batch_size * cfg.seq_len
    return steps * cfg.lr * n_terms * 2.0**-53 / cfg.eps / (1 - cfg.beta1)


def _assert_same_weights(a, b, bound):
    wa, wb = CheckpointReader(a).full_state_dict(), CheckpointReader(b).full_state_dict()
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=bound, msg=name)


@pytest.mark.parametrize("ranks,exchange", [(2, "reduce_scatter"), (4, "reduce_scatter"), (8, "reduce_scatter"),
                                            (4, "all_to_all")])
def test_zero1_ranks_match_one_rank_with_the_whole_batch(tmp_path, ranks, exchange):
    steps = 3
    one = _train(_cfg(tmp_path / "one", steps=steps))
    many = _train(_cfg(tmp_path / "many", steps=steps, grad_exchange=exchange), ranks)
    bound = weight_bound(_cfg(tmp_path), steps)
    assert bound < 1e-5  # far below one update (lr = 1e-2): the comparison means something
    assert many.losses == pytest.approx(one.losses, rel=1e-9)
    _assert_same_weights(tmp_path / "one", tmp_path / "many", bound)
    # ZeRO-1: each rank holds 1/ranks of the optimizer state (the buckets are padded to a multiple of ranks)
    assert many.extra["optimizer_bytes"] <= one.extra["optimizer_bytes"] / ranks + 64 * 16 * 16 * ranks


def test_accumulation_matches_one_big_batch(tmp_path):
    steps = 3
    big = _train(_cfg(tmp_path / "big", steps=steps))
    accumulated = _train(_cfg(tmp_path / "acc", steps=steps, micro_batch_size=2))
    assert accumulated.extra["accumulation"] == 4
    assert accumulated.losses == pytest.approx(big.losses, rel=1e-9)
    _assert_same_weights(tmp_path / "big", tmp_path / "acc", weight_bound(_cfg(tmp_path), steps))


@pytest.mark.parametrize("exchange", ["reduce_scatter", "all_to_all"])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_distributed_optimizer_matches_torch_adamw(clip, exchange):
    """Two steps of the sharded optimizer on 2 ranks equal torch.optim.AdamW on the averaged gradient,
    clipped by its global norm as ``torch.nn.utils.clip_grad_norm_`` does (gradients reduce-scattered,
    or exchanged by all-to-all and summed by their owner)."""
    results = launch(_zero_step, 2, args=(clip, exchange), timeout=60)
    ref_params, grads = _reference_model()
    decay = [p for p in ref_params if p.dim() >= 2]
    no_decay = [p for p in ref_params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    norms = []
    for step in range(2):
        for p, g in zip(ref_params, grads[step]):
            p.grad = g.clone()
        norms.append(float(torch.nn.utils.clip_grad_norm_(ref_params, clip if clip is not None else math.inf)))
        opt.step()
    if clip is not None:
        assert min(norms) > 10 * clip  # the clip is active in both steps
    for got, got_norms in results:
        assert got_norms == pytest.approx(norms, rel=1e-12)
        for p, q in zip(got, ref_params):
            torch.testing.assert_close(torch.from_numpy(p), q.detach(), rtol=1e-12, atol=1e-14)


def _reference_model():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in ((7, 5), (3,), (130, 3), (1,))]
    grads = [[torch.randn_like(p) * 0.1 for p in params] for _ in range(2)]
    return params, grads


def _zero_step(comm, clip, exchange="reduce_scatter"):
    params, grads = _reference_model()
    model = torch.nn.Module()
    for i, p in enumerate(params):
        model.register_parameter(f"p{i}", p)
    opt = DistributedOptimizer(named_spaces(model, comm, comm, lambda p: False), get_backend("cpu"), world=comm,
                               lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, bucket_mb=0.0005,
                               master_dtype=torch.float64, reduce_dtype=torch.float64, exchange=exchange)
    assert len(opt.buckets) > 1
    norms = []
    for step in range(2):
        opt.start_step(1)
        # each rank's loss gradient is half of the sum, so the average over 2 ranks is the reference gradient
        loss = sum((p * (g * (1 + comm.rank) / 1.5)).sum() for p, g in zip(model.parameters(), grads[step]))
        loss.backward()
        opt.finish_gradients()
        norms.append(float(opt.step(1e-2, clip).grad_norm))
    return [p.detach().numpy().copy() for p in model.parameters()], norms  # tensors do not survive the rank's exit


def _zero_bf16_steps(comm, remainder):
    """Three steps of the sharded optimizer over bf16 weights; each rank returns its owned masters (decoded)
    and every weight."""
    params, grads = _reference_model()
    model = torch.nn.Module()
    for i, p in enumerate(params):
        model.register_parameter(f"p{i}", torch.nn.Parameter(p.detach().to(torch.bfloat16)))
    opt = DistributedOptimizer(named_spaces(model, comm, comm, lambda p: False), get_backend("cpu"), world=comm,
                               lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, bucket_mb=0.0005,
                               grad_dtype=torch.bfloat16, master_remainder=remainder)
    assert len(opt.buckets) > 1 and all((b.remainder is not None) == remainder for b in opt.buckets)
    for step in range(3):
        opt.start_step(1)
        loss = sum((p.float() * (g[step % 2].float() * (1 + comm.rank))).sum()
                   for p, g in zip(model.parameters(), zip(*grads)))
        loss.backward()
        opt.finish_gradients()
        opt.step(1e-2, 1.0)
    masters = {(s.name, s.param_offset): v["master"].view(torch.int32).numpy().copy()
               for s, v in opt.state_segments()}
    return masters, [p.detach().view(torch.int16).numpy().copy() for p in model.parameters()]


def test_zero1_masters_kept_as_remainders_over_two_ranks_are_the_whole_masters():
    """ZeRO-1 over 2 ranks with bf16 weights: each rank's shard of masters kept as remainders of its slice of
    the weights is bitwise the whole-master run's, and the all-gathered weights are the masters' upper
    halves on both ranks."""
    from openseek_hal.ops.optim import split_master

    whole = launch(_zero_bf16_steps, 2, args=(False,), timeout=60)
    split = launch(_zero_bf16_steps, 2, args=(True,), timeout=60)
    for (whole_masters, _), (split_masters, _) in zip(whole, split, strict=True):
        assert whole_masters.keys() == split_masters.keys() and whole_masters
        for key, bits in whole_masters.items():
            assert (bits == split_masters[key]).all(), key
    for masters, weights in split:  # each rank's owned masters against its (gathered) weights
        for (name, offset), bits in masters.items():
            weight = torch.from_numpy(weights[int(name[1:])]).view(-1)[offset:offset + bits.size]
            assert torch.equal(weight, split_master(torch.from_numpy(bits).view(torch.float32))[0].view(torch.int16))
    assert all((a == b).all() for a, b in zip(split[0][1], split[1][1], strict=True))  # the same weights everywhere


class _DeferredGathers:
    """A communicator whose async all-gathers run only when waited for: a handle that is dropped
    instead of waited leaves the weights ungathered, deterministically (with a real transport the
    same bug is a race that shows only with some thread counts)."""

    def __init__(self, comm):
        self._comm = comm

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def all_gather(self, output, input, async_op=False):
        if not async_op:
            return self._comm.all_gather(output, input)
        comm = self._comm

        class _Work:
            def wait(self):
                comm.all_gather(output, input)
        return _Work()


def _lazy_gather_steps(comm):
    """Three steps of two modules that each wait for their own weights on first use (the trainer's
    ``gather_before_use``), the gradient of each rank's half of the batch; returns the weights."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5, dtype=torch.float64), torch.nn.Linear(5, 3, dtype=torch.float64))
    x = torch.randn(8, 6, dtype=torch.float64)
    wrapped = _DeferredGathers(comm) if comm is not None else None
    opt = DistributedOptimizer(named_spaces(model, wrapped, wrapped, lambda p: False), get_backend("cpu"),
                               world=wrapped, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                               bucket_mb=0.00003, master_dtype=torch.float64, reduce_dtype=torch.float64)
    assert len(opt.buckets) > 1
    opt.gather_before_use(list(model))
    rows = slice(4 * comm.rank, 4 * comm.rank + 4) if comm is not None else slice(None)
    for _ in range(3):
        opt.start_step(1)
        model(x[rows]).pow(2).mean().backward()
        opt.finish_gradients()
        opt.update(1e-2, None)
        opt.wait_weights(lazy=True)
    opt.wait_weights()
    return [p.detach().numpy().copy() for p in model.parameters()]


def test_weight_gathers_in_flight_survive_the_next_step():
    """The weights' all-gathers launched by one step are waited for by the next step's modules: a step
    boundary that dropped the handles left the weights of the other ranks' shards stale."""
    ref = _lazy_gather_steps(None)
    for got in launch(_lazy_gather_steps, 2, timeout=60):
        for p, q in zip(got, ref):
            # the mean over 8 rows is two means over 4 averaged: a few roundings, amplified by AdamW
            np.testing.assert_allclose(p, q, rtol=0, atol=weight_bound(_cfg("."), 3))


def test_schedules():
    cfg = load_config(None, {"steps": 100, "warmup_steps": 10, "lr": 1.0, "min_lr_ratio": 0.1})
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    wsd_fields = {"steps": 100, "warmup_steps": 10, "lr": 1.0, "min_lr_ratio": 0.1, "lr_schedule": "wsd",
                  "decay_fraction": 0.2}
    wsd = load_config(None, wsd_fields)
    assert [lr_at(s, wsd) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]  # stable until the last 20 steps
    assert lr_at(80, wsd) == pytest.approx(1.0 - 0.9 * 1 / 20)  # linear decay to 0.1 at the last step
    assert lr_at(89, wsd) == pytest.approx(1.0 - 0.9 * 10 / 20)
    assert lr_at(99, wsd) == pytest.approx(0.1)
    sqrt = load_config(None, {**wsd_fields, "decay_shape": "sqrt"})
    assert lr_at(84, sqrt) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(5 / 20)))
    const = load_config(None, {"steps": 10, "warmup_steps": 2, "lr": 0.5, "lr_schedule": "constant"})
    assert [lr_at(s, const) for s in range(4)] == [0.25, 0.5, 0.5, 0.5]


def test_resume_is_bitwise_exact(tmp_path):
    straight = _train(_cfg(tmp_path / "a", steps=6, save_every=3, dtype="fp32"))
    resumed = _train(_cfg(tmp_path / "b", steps=6, dtype="fp32"), resume=tmp_path / "a" / "checkpoints" / "step_000003")
    assert resumed.losses == straight.losses


def test_reshard_4_to_2_to_1(tmp_path):
    """A checkpoint written by 4 ranks resumes on 2 and on 1; the next steps match the 4-rank run."""
    four = _train(_cfg(tmp_path / "four", steps=4, save_every=2), 4)
    ckpt = tmp_path / "four" / "checkpoints" / "step_000002"
    assert len(list(ckpt.glob("rank_*.safetensors"))) == 4
    two = _train(_cfg(tmp_path / "two", steps=3, save_every=0), 2, resume=ckpt)
    assert two.losses[:2] == four.losses[:2]  # the history comes from the checkpoint
    assert two.losses[2] == pytest.approx(four.losses[2], rel=1e-9)
    one = _train(_cfg(tmp_path / "one", steps=4), 1, resume=tmp_path / "two")
    assert one.losses[3] == pytest.approx(four.losses[3], rel=1e-9)
    _assert_same_weights(tmp_path / "four", tmp_path / "one", weight_bound(_cfg(tmp_path), 4))


def test_resume_refuses_changes_that_break_exactness(tmp_path):
    _train(_cfg(tmp_path / "a", steps=4, save_every=2))
    ckpt = tmp_path / "a" / "checkpoints" / "step_000002"
    with pytest.raises(ConfigError, match="seed differs"):
        _train(_cfg(tmp_path / "b", steps=4, seed=1), resume=ckpt)
    with pytest.raises(ConfigError, match="steps=1 is below the checkpoint's step 2"):
        _train(_cfg(tmp_path / "b", steps=1), resume=ckpt)
    # resuming an older checkpoint into its own run folder would replace step_000004
    with pytest.raises(UserError, match="already holds checkpoint step_000004"):
        _train(_cfg(tmp_path / "a", steps=4), resume=ckpt)
    # so would a fresh run into it
    with pytest.raises(UserError, match="already holds checkpoint"):
        _train(_cfg(tmp_path / "a", steps=4))
    assert CheckpointReader(tmp_path / "a").step == 4  # untouched


@pytest.mark.parametrize("ranks,ep,dispatch", [(2, 2, "pairs"), (4, 2, "pairs"), (2, 2, "tokens"),
                                               (2, 2, "allgather")])
def test_expert_parallel_training_matches_one_rank(tmp_path, ranks, ep, dispatch):
    """EP 2 (and EP 2 x DP 2; and EP 2 sending one row per token and rank, or every token to every rank)
    trains the same model as one rank with the whole batch, and its checkpoint (expert shards written by
    their owners) holds the same full weights."""
    steps = 3
    one = _train(_cfg(tmp_path / "one", steps=steps))
    ep_run = _train(_cfg(tmp_path / "ep", steps=steps, expert_parallel=ep, expert_dispatch=dispatch), ranks)
    # the router runs in float32 whatever the weights' dtype: losses agree to float32 rounding of the
    # routing weights (relative 2**-24 per term, a few terms per token), far below one step's change
    assert ep_run.losses == pytest.approx(one.losses, rel=1e-6)
    assert ep_run.extra["world_size"] == ranks
    ckpt = CheckpointReader(tmp_path / "ep")
    assert ckpt.manifest["expert_parallel"] == ep
    wa, wb = CheckpointReader(tmp_path / "one").full_state_dict(), ckpt.full_state_dict()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6, msg=name)


def test_expert_parallel_checkpoint_reshards_between_ep_sizes(tmp_path):
    """EP 2 -> EP 1 and EP 1 -> EP 2 on resume: the next step matches the uninterrupted run."""
    ep2 = _train(_cfg(tmp_path / "ep2", steps=3, save_every=2, expert_parallel=2), 2)
    to_one = _train(_cfg(tmp_path / "to1", steps=3), 1, resume=tmp_path / "ep2" / "checkpoints" / "step_000002")
    assert to_one.losses[2] == pytest.approx(ep2.losses[2], rel=1e-6)
    one = _train(_cfg(tmp_path / "one", steps=3, save_every=2))
    to_two = _train(_cfg(tmp_path / "to2", steps=3, expert_parallel=2), 2,
                    resume=tmp_path / "one" / "checkpoints" / "step_000002")
    assert to_two.losses[2] == pytest.approx(one.losses[2], rel=1e-6)
    # convert gathers the expert shards of the EP 2 run into one Hugging Face checkpoint
    from openseek_hal.cli import main
    from openseek_hal.models import load_hf

    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--from", "run", "--to", "hf", str(tmp_path / "ep2"), str(tmp_path / "hf")])
    assert exit_info.value.code == 0
    hf = load_hf(tmp_path / "hf", "cpu", dtype=torch.float64).state_dict()
    full = CheckpointReader(tmp_path / "ep2").full_state_dict()
    assert hf.keys() == full.keys()
    for name, value in full.items():
        assert torch.equal(hf[name], value.to(hf[name].dtype)), name


def test_a_locked_run_folder_is_refused_naming_the_holder(tmp_path):
    from openseek_hal.fileio import FolderLock

    with FolderLock(tmp_path / "run", what="run folder"):
        with pytest.raises(UserError, match=r"run folder .* is in use by pid \d+ on "):
            _train(_cfg(tmp_path / "run", steps=1))
    _train(_cfg(tmp_path / "run", steps=1, save=False))  # released with the holder


def test_resume_onto_another_model_shape_names_the_tensor(tmp_path):
    from openseek_hal.models import build_model
    from openseek_hal.train.checkpoint import load_checkpoint

    _train(_cfg(tmp_path / "a", steps=1))
    vocab = CheckpointReader(tmp_path / "a").params["embed_tokens.weight"]["shape"][0]
    other = build_model("tiny", "cpu", vocab_size=vocab, num_hidden_layers=2, hidden_size=64, init=False)
    with pytest.raises(UserError, match=r"does not match the model: embed_tokens.weight is \[\d+, 128\] there"):
        load_checkpoint(tmp_path / "a", other)


def test_metrics_are_strict_json_and_a_resume_drops_replayed_rows(tmp_path):
    import json

    from openseek_hal.train.metrics import MetricsLogger

    with MetricsLogger(tmp_path) as m:
        for step in (1, 2, 3):
            m.log(step, {"loss": float("nan") if step == 2 else 1.0})
    with MetricsLogger(tmp_path, resume_step=1) as m:  # resumed from step 1: steps 2 and 3 are replayed
        m.log(2, {"loss": 0.5})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
    with MetricsLogger(tmp_path) as m:
        m.log(1, {"loss": float("inf")})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": None}


def test_a_parameter_without_gradient_this_step_reduces_as_zero():
    """Gradient buffers are overwritten by each step's first gradient, not cleared: one that gets no
    gradient in a step must count as zero, not as last step's value."""
    used, unused = torch.nn.Parameter(torch.ones(3, 4)), torch.nn.Parameter(torch.ones(5))
    model = torch.nn.Module()
    model.register_parameter("used", used)
    model.register_parameter("unused", unused)
    opt = DistributedOptimizer(named_spaces(model, None, None, lambda p: False), get_backend("cpu"), world=None,
                               lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    for step, params in enumerate(([used, unused], [used])):
        opt.start_step(1)
        sum((p * (step + 2)).sum() for p in params).backward()
        opt.finish_gradients()
        grads = {name: opt.buckets[0].grad_buffer[o:o + p.numel()].clone() for name, p, o in opt.buckets[0].params}
        opt.step(0.1, None)
    assert torch.equal(grads["used"], torch.full((12,), 3.0)) and torch.equal(grads["unused"], torch.zeros(5))


def _train_rank_with_own_seed(comm, cfg):
    import dataclasses

    return train(dataclasses.replace(cfg, seed=comm.rank), comm=comm, console=_quiet())


def test_ranks_started_with_different_configs_fail_at_start(tmp_path):
    with pytest.raises(ConfigError, match="rank 1 started with another configuration than rank 0"):
        launch(_train_rank_with_own_seed, 2, args=(_cfg(tmp_path / "run", steps=1),), timeout=60)


def test_eight_ranks_expert_parallel_4_by_data_parallel_2_match_one_rank(tmp_path):
    """The largest layout CI can afford: 8 gloo ranks, routed experts in EP groups of 4, 2 replicas each."""
    steps = 2
    one = _train(_cfg(tmp_path / "one", steps=steps))
    eight = _train(_cfg(tmp_path / "eight", steps=steps, expert_parallel=4), 8)
    assert eight.extra["world_size"] == 8
    assert eight.losses == pytest.approx(one.losses, rel=1e-6)  # the router's float32 (see the EP test above)
    wa = CheckpointReader(tmp_path / "one").full_state_dict()
    wb = CheckpointReader(tmp_path / "eight").full_state_dict()
    bound = weight_bound(_cfg(tmp_path), steps)  # Adam's amplification of the reduction order, as for ZeRO-1
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=bound, msg=name)


def _share_choices(comm):
    from openseek_hal.backends.cpu import CPUBackend
    from openseek_hal.train.trainer import share_op_choices

    class Choosy(CPUBackend):
        name = "cpu-choosy"

        def __init__(self):
            super().__init__()
            self.choices = {"fp8_gemm": [{"M": 8, "N": 128, "K": 128, "b_tile": "128x128", "out_dtype": "bfloat16",
                                          "choice": "cublas" if comm.rank == 0 else "triton", "ms": {}, "errors": {}}]}
            self.preset = []

        def op_choices(self):
            return self.choices

        def preset_op_choices(self, choices):
            self.preset.append(choices)

    backend = Choosy()
    share_op_choices(backend, comm)
    return backend.preset


def test_every_rank_takes_rank_0s_kernel_choices():
    from openseek_hal.comm import launch

    presets = launch(_share_choices, 3)
    assert presets[0] == []  # rank 0 keeps its own
    for got in presets[1:]:
        assert [r["choice"] for r in got[0]["fp8_gemm"]] == ["cublas"]
