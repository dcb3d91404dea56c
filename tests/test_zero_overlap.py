"""The distributed optimizer's side streams (the ``overlap_update`` update; the gradient norm's per-bucket
sums during backward), checked on the CPU.

The CPU has one stream, so the real path never runs here. These tests give the optimizer a recording
stand-in for a device's stream and events and check the protocol the GPU relies on: the side stream
starts only after the compute stream's gradients and norm, every update of a bucket runs on it, and
the compute stream waits for a bucket's update before the next forward reads its weights and before
its gradient buffer is written again. The arithmetic is the serial update's, so the weights must be
bitwise equal to a run without the overlap.
"""

from __future__ import annotations

import itertools

import torch

from openseek_hal.backend import get_backend
from openseek_hal.train.zero import DistributedOptimizer, named_spaces

LR = 1e-2


class _Log:
    def __init__(self) -> None:
        self.entries: list[tuple] = []
        self.current = "main"
        self.ids = itertools.count()


class _Event:
    def __init__(self, log: _Log) -> None:
        self.log, self.id = log, next(log.ids)

    def record(self, stream: _Stream | None = None) -> None:
        self.log.entries.append(("record", self.id, stream.name if stream is not None else self.log.current))

    def wait(self, stream: _Stream | None = None) -> None:
        self.log.entries.append(("wait", self.id, stream.name if stream is not None else self.log.current))

    def elapsed_time(self, end: _Event) -> float:
        return 0.0


class _Stream:
    name = "side"

    def __init__(self, log: _Log) -> None:
        self.log = log

    def wait_event(self, event: _Event) -> None:
        event.wait(self)

    def __enter__(self) -> _Stream:
        self.log.current = self.name
        return self

    def __exit__(self, *exc) -> None:
        self.log.current = "main"


class _Device:
    type = "fake"

    def __init__(self, log: _Log) -> None:
        self.log = log

    def event(self, enable_timing: bool = False) -> _Event:
        return _Event(self.log)


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8),
                               torch.nn.Linear(8, 8)).to(torch.bfloat16)


def _optimizer(model: torch.nn.Module, log: _Log | None) -> DistributedOptimizer:
    # a tiny bucket cap: every parameter gets its own bucket, so the order of the waits is visible
    opt = DistributedOptimizer(named_spaces(model, None, None, lambda p: False), get_backend("cpu"), world=None,
                               lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, bucket_mb=1e-4,
                               grad_dtype=torch.bfloat16)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    opt.gather_before_use(linears)
    if log is not None:
        opt._side, opt._device = _Stream(log), _Device(log)
        adamw = opt._adamw

        def logged(params, *args, **kw):
            log.entries.append(("adamw", log.current, params[0].data_ptr()))
            return adamw(params, *args, **kw)

        opt._adamw = logged
        for i, m in enumerate(linears):  # registered after the optimizer's waits: runs after them
            m.register_forward_pre_hook(lambda mod, args, i=i: log.entries.append(("forward", i)))
    return opt


def _train(model: torch.nn.Module, opt: DistributedOptimizer, steps: int, log: _Log | None = None) -> None:
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        if log is not None:
            log.entries.append(("step", step))
        opt.start_step(1)
        model(torch.randn(4, 16, generator=gen).to(torch.bfloat16)).square().mean().backward()
        opt.finish_gradients()
        if log is not None:
            log.entries.append(("norm",))
        opt.update(LR, 0.5)  # a clip that acts: the scale the side stream reads is a computed tensor
        opt.wait_weights(lazy=True)


def test_side_stream_update_gives_the_serial_weights_bitwise():
    serial_model, side_model = _model(), _model()
    serial, side = _optimizer(serial_model, None), _optimizer(side_model, _Log())
    _train(serial_model, serial, 4)
    _train(side_model, side, 4, side._side.log)
    for p, q in zip(serial_model.parameters(), side_model.parameters(), strict=True):
        assert torch.equal(p, q)
    for a, b in zip(serial.buckets, side.buckets, strict=True):
        assert torch.equal(a.master, b.master) and torch.equal(a.exp_avg, b.exp_avg)
    assert side.update_span is not None and serial.update_span is None


def test_side_stream_protocol_orders_every_update_between_its_waits():
    model = _model()
    log = _Log()
    opt = _optimizer(model, log)
    _train(model, opt, 3, log)
    entries = log.entries
    buckets_of_linear = [sorted({opt._param_bucket[id(p)].index for p in m.parameters()})
                         for m in model if isinstance(m, torch.nn.Linear)]

    def bucket_at(ptr: int) -> int:
        return next(b.index for b in opt.buckets if 0 <= ptr - b.param_buffer.data_ptr()
                    < b.param_buffer.numel() * b.param_buffer.element_size())

    assert len(opt.buckets) >= 4
    step_starts = [i for i, e in enumerate(entries) if e[0] == "step"]
    for s, start in enumerate(step_starts):
        end = step_starts[s + 1] if s + 1 < len(step_starts) else len(entries)
        part = entries[start:end]
        norm = next(i for i, e in enumerate(part) if e == ("norm",))
        # the side stream waits for an event recorded on the compute stream after the norm was queued
        ready = next(e for e in part[norm:] if e[0] == "record")
        assert ready[2] == "main"
        assert ("wait", ready[1], "side") in part
        first_wait = part.index(("wait", ready[1], "side"))
        updates = [(i, e) for i, e in enumerate(part) if e[0] == "adamw"]
        assert updates and all(e[1] == "side" and i > first_wait for i, e in updates)
        # each bucket: its updates, then its done event recorded on the side stream
        done_of = {}
        for i, e in updates:
            bucket = bucket_at(e[2])
            done = next(x for x in part[i:] if x[0] == "record" and x[2] == "side")
            done_of[bucket] = done[1]
        assert set(done_of) == {b.index for b in opt.buckets}
        if s + 1 == len(step_starts):
            break
        # the next step: before each layer's forward, the compute stream waited for its buckets' updates
        nxt = entries[end:step_starts[s + 2] if s + 2 < len(step_starts) else len(entries)]
        for layer, indices in enumerate(buckets_of_linear):
            fwd = nxt.index(("forward", layer))
            for index in indices:
                assert ("wait", done_of[index], "main") in nxt[:fwd], (s, layer, index)


def test_cpu_ignores_the_overlap():
    model = _model()
    opt = DistributedOptimizer(named_spaces(model, None, None, lambda p: False), get_backend("cpu"), world=None,
                               lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, overlap_update=True)
    assert opt._side is None
    _train(model, opt, 1)
    assert opt.update_span is None


class _NormStream(_Stream):
    name = "norm"


def test_bucket_norms_run_beside_backward_and_the_update_waits_for_them():
    """Each complete bucket's sum of squares runs on the norm stream after an event the compute stream
    recorded when the bucket completed; the compute stream waits for every one of them before the first
    update. The sums are the serial ones, so the weights are bitwise a run without the stream's."""
    serial_model, model = _model(), _model()
    serial = _optimizer(serial_model, None)
    log = _Log()
    opt = _optimizer(model, None)
    opt._norm_side, opt._device = _NormStream(log), _Device(log)
    squares = opt._sum_of_squares

    def logged_squares(tensors):
        log.entries.append(("squares", log.current))
        return squares(tensors)

    opt._sum_of_squares = logged_squares
    adamw = opt._adamw

    def logged(params, *args, **kw):
        log.entries.append(("adamw", log.current))
        return adamw(params, *args, **kw)

    opt._adamw = logged
    _train(serial_model, serial, 3)
    log.entries.clear()
    _train(model, opt, 3, log)
    for p, q in zip(serial_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)
    entries = log.entries
    starts = [i for i, e in enumerate(entries) if e[0] == "step"] + [len(entries)]
    for a, b in zip(starts, starts[1:]):
        part = entries[a:b]
        sums = [i for i, e in enumerate(part) if e[0] == "squares"]
        assert len(sums) == len(opt.buckets) and all(part[i][1] == "norm" for i in sums)
        first_update = next(i for i, e in enumerate(part) if e[0] == "adamw")
        assert all(e[1] == "main" for e in part if e[0] == "adamw")
        assert max(sums) < part.index(("norm",))  # all during backward, before `update`
        for i in sums:
            waited = part[i - 1]  # the norm stream waited for the compute stream's event just before
            assert waited[0] == "wait" and waited[2] == "norm" and ("record", waited[1], "main") in part[:i - 1]
            done = part[i + 1]
            assert done[0] == "record" and done[2] == "norm"
            assert ("wait", done[1], "main") in part[i + 1:first_update]
