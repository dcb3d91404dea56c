"""ZeRO-1 data parallelism over the HAL's `Communicator` (Megatron's distributed optimizer).

Parameters live in flat, contiguous per-bucket buffers (each parameter is a view), in the run's
weight dtype (bf16 on accelerators). A bucket that is reduced, or that accumulates micro-batches,
has a gradient buffer: in the master dtype (fp32) when micro-batches are accumulated; when a step
has one micro-batch, in the dtype the bucket is reduced in (a bucket that is not reduced then has
none: see below). A post-accumulate-grad hook copies
(first micro-batch) or adds (later ones) a parameter's ``.grad`` into it and frees ``.grad``. On the
last micro-batch of a step, a bucket whose parameters all have their gradient is reduce-scattered at
once (in the reduce dtype), asynchronously, so communication overlaps the rest of backward; buckets
are launched strictly in their fixed order, so every rank issues the same collectives in the same
order whatever order its autograd finishes them in.

With ``exchange="all_to_all"`` a bucket travels in its buffer's dtype instead (bf16 with one micro-batch:
autograd's gradients, copied without conversion): an even all-to-all hands every rank the other ranks'
copies of its shard, and the rank adds them in the reduce dtype, in rank order. Float32 sums of bf16
gradients are then exact to float32 rounding as with a float32 reduce-scatter, at half its traffic.

The buffers hold gradient *sums*; the averaging factor and the clipping coefficient are one
device scalar handed to the backend's ``adamw`` (``grad_scale``), and the global norm is computed
on the device too, so the step makes no pass over the gradients just to scale them and never
waits for the host.

A bucket that no collective touches, in an optimizer built for one micro-batch per step
(``grad_dtype``), has no gradient buffer at all: the hook keeps the gradient autograd made and the
update reads it in place, one `adamw` call over the bucket's parameters, so the step neither copies
the gradients nor holds them twice (on one GPU: a copy of every gradient and the buffers' memory, 2
bytes a parameter in bf16, saved).

Every replica rank owns ``1/N`` of each bucket (padded to a multiple of N): the fp32 master copy
of those elements and their AdamW moments (in the master dtype, or bf16 as DeepSeek-V3 keeps them,
``moment_dtype``). With ``master_remainder`` (bf16 weights, fp32 masters) a master is not kept whole:
the rank's slice of the bf16 weights is its upper half and an int16 *remainder* the rest (see
`openseek_hal.ops.optim`), the same fp32 number in 2 bytes instead of 4, and the update reads and
writes 2 bytes of master a parameter fewer (its bf16 result is the weight itself). After the step a
rank writes its updated slice into
the parameter buffer (rounded to the weight dtype) and the buckets are all-gathered, last bucket
first; with `gather_before_use` each module waits for its own weights when the next forward calls
it. With one rank the same code runs with no communication and the shard is the whole bucket.

With ``overlap_update`` (accelerators), the buckets that no collective touches (every bucket of a
one-rank run; the routed experts of an expert-parallel run without expert replicas) are updated on a
side stream instead: the update is queued after the norm, and each module of the next forward waits
(a stream wait, not a host wait) only for its own buckets, exactly like for a weight all-gather, so
the memory-bound update runs beside the next forward's first layers. The kernels and their inputs
are the same, so the weights are bitwise those of the serial update.

Parameters fall in *spaces*: the dense parameters (and shared experts) are replicated on every
rank and reduced over all of them; the routed experts of an expert-parallel run are replicated
only over the ranks that hold the same expert shard. Each space has its own communicator; both
average over the whole world (an expert shard's gradient already sums the tokens of its EP group).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..backend import Backend
from ..comm import Communicator, Work
from ..ops.fp8 import weights_updated
from ..ops.optim import join_master, split_master

ALIGN = 64  # elements: every parameter starts on a 128-byte boundary in bf16
EXCHANGES = ("reduce_scatter", "all_to_all")  # how a bucket's gradient sums reach the shard owners


@dataclass
class Segment:
    """The part of one parameter that a rank's shard of a bucket covers."""

    name: str
    param: nn.Parameter
    bucket_offset: int  # where this part starts in the bucket
    shard_offset: int  # where it starts in the rank's shard
    param_offset: int  # where it starts in the parameter's flattened elements
    numel: int
    decay: bool
    bucket: int = 0  # the index of the bucket it is in


@dataclass
class Bucket:
    index: int
    space: str
    comm: Communicator | None
    params: list[tuple[str, nn.Parameter, int]]  # (name, param, offset in the bucket)
    numel: int  # padded to a multiple of the space's world size
    param_buffer: torch.Tensor = field(repr=False)
    grad_buffer: torch.Tensor | None = field(repr=False)  # None: the bucket keeps autograd's gradients
    # the gradients autograd made this step, by parameter id (buckets without a gradient buffer)
    grads: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    shard_start: int = 0
    shard_numel: int = 0
    segments: list[Segment] = field(default_factory=list)
    pending: int = 0
    aliased: bool = False  # the master is the weight itself (weights already in the master dtype)
    decay_end: int = 0  # bucket offset where the parameters without weight decay start
    work: Work | None = None  # the gradients' reduce-scatter in flight (waited in finish_gradients)
    # the weights' all-gather in flight: waited before the weights are first read and before the shard
    # is written again; it may outlive the step that launched it (a block waits on first use), so no
    # step boundary may drop it
    gather: Work | None = None
    # this rank's summed shard (reduce dtype): the reduce-scatter's output, or the all-to-all's copies added up
    reduced: torch.Tensor | None = field(default=None, repr=False)
    send: torch.Tensor | None = field(default=None, repr=False)  # the exchange's input, alive until it is done
    received: torch.Tensor | None = field(default=None, repr=False)  # all-to-all: every rank's copy of the shard
    master: torch.Tensor | None = field(default=None, repr=False)
    # with a master remainder: the int16 low halves of the fp32 masters whose upper halves are the
    # param shard itself (``master`` is then None)
    remainder: torch.Tensor | None = field(default=None, repr=False)
    exp_avg: torch.Tensor | None = field(default=None, repr=False)
    exp_avg_sq: torch.Tensor | None = field(default=None, repr=False)
    # a bucket without a gradient buffer: its gradients' sum of squares, taken as soon as the bucket is
    # complete (on accelerators on a side stream, beside the rest of backward), and that work's event
    squares: torch.Tensor | None = field(default=None, repr=False)
    squares_done: Any = None

    @property
    def direct(self) -> bool:
        """Whether this bucket keeps autograd's gradients instead of a gradient buffer."""
        return self.grad_buffer is None

    @property
    def grad_shard(self) -> torch.Tensor:
        return self.grad_buffer[self.shard_start:self.shard_start + self.shard_numel]

    @property
    def step_grad(self) -> torch.Tensor:
        """The summed gradient of this rank's shard: the reduce-scatter's output, or the buffer's own slice."""
        return self.reduced if self.reduced is not None else self.grad_shard

    @property
    def param_shard(self) -> torch.Tensor:
        return self.param_buffer[self.shard_start:self.shard_start + self.shard_numel]


@dataclass
class StepStats:
    """Device scalars (read them when logging, not every step: reading waits for the device)."""

    grad_norm: torch.Tensor  # of the averaged gradient, before clipping
    clip_coef: torch.Tensor


class DeviceSchedule:
    """The learning rate and the step number in device memory (0-d float64 tensors), written before each
    step (a fill: no copy from the host): an update captured in a device graph reads them there, so a
    replay applies each step's own values."""

    def __init__(self, device: torch.device):
        self.lr = torch.zeros((), dtype=torch.float64, device=device)
        self.step = torch.zeros((), dtype=torch.float64, device=device)

    def set(self, lr: float, step: int) -> None:
        self.lr.fill_(lr)
        self.step.fill_(step)


class _SideWork:
    """A bucket's update queued on the side stream; ``wait()`` makes the current stream wait for it
    (no host wait) and then lets go of the compute-stream tensors the update read."""

    def __init__(self, event: Any, keep: tuple[Any, ...]):
        self._event, self._keep = event, keep

    def wait(self) -> None:
        self._event.wait()
        self._keep = ()


class DistributedOptimizer:
    """AdamW with ZeRO-1 sharding and bucketed, overlapped gradient reduce-scatter.

    ``spaces`` maps a space name to ``(communicator or None, [(name, param), ...])``; ``world`` is
    the communicator spanning every rank (the global gradient norm, the averaging factor), None
    for one process. Call `start_step` before the first backward of a step with the number of
    micro-batches, `finish_gradients` after the last backward, then `step`.
    """

    def __init__(self, spaces: dict[str, tuple[Communicator | None, list[tuple[str, nn.Parameter]]]],
                 backend: Backend, *, world: Communicator | None, lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float, bucket_mb: float = 128.0, master_dtype: torch.dtype = torch.float32,
                 reduce_dtype: torch.dtype = torch.float32, moment_dtype: torch.dtype | None = None,
                 grad_dtype: torch.dtype | None = None,
                 no_decay: Callable[[str, nn.Parameter], bool] | None = None, overlap_update: bool = False,
                 exchange: str = "reduce_scatter", master_remainder: bool = False):
        """``moment_dtype`` defaults to ``master_dtype``. The gradient buffers are in the wider of the
        master and weight dtypes, which accumulation needs, unless ``grad_dtype`` is given (the weight
        dtype, when every step has one micro-batch: `start_step` then refuses more): a bucket that is
        reduced then takes the reduce dtype, so that the hook's copy is the only conversion on the way
        to the wire, and one that is not reduced has no buffer (the update reads autograd's gradients,
        in ``grad_dtype``). ``overlap_update``: see the module docstring (ignored on the CPU, which has
        one stream). ``exchange``: ``"reduce_scatter"`` reduces each bucket in ``reduce_dtype`` on the wire;
        ``"all_to_all"`` sends every rank its shard of the bucket in the buffer's own dtype (with
        ``grad_dtype``, the weights': bf16) and each rank sums the copies it receives in ``reduce_dtype``,
        in rank order: the sums of a float32 reduction at the traffic of the weights' dtype.
        ``master_remainder``: keep each fp32 master as the remainder of its bf16 weight (module docstring);
        it applies where the weights are bf16 and the masters fp32, elsewhere masters are kept whole."""
        if exchange not in EXCHANGES:
            raise ValueError(f"unknown gradient exchange {exchange!r}: one of {', '.join(EXCHANGES)}")
        self.exchange = exchange
        self.backend, self.world = backend, world
        self.world_size = world.world_size if world is not None else 1
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.master_dtype, self.reduce_dtype = master_dtype, reduce_dtype
        self.moment_dtype = moment_dtype or master_dtype
        self.grad_dtype = grad_dtype
        self.master_remainder = master_remainder
        self.step_count = 0
        self._adamw = backend.op("adamw")
        self._sum_of_squares = backend.op("sum_of_squares")  # float64 sums for float64 gradients, else float32
        self._no_decay = no_decay or (lambda name, p: p.dim() < 2)
        self._micro_batches, self._micro = 1, 0
        self._next_launch = 0
        self._hooks: list[Any] = []
        self._lazy: set[int] = set()  # buckets whose all-gather a block waits for on first use
        self._seen: set[int] = set()  # parameters whose gradient this step has written
        device = backend.device
        self._device = device
        self._side = device.stream() if overlap_update and device.type != "cpu" else None
        # the gradient norm's partial sums of complete buckets run here during backward (accelerators)
        self._norm_side = device.stream() if device.type != "cpu" else None
        self.update_span: tuple[Any, Any] | None = None  # timing events around the side stream's update
        self.buckets: list[Bucket] = []
        for space, (comm, named) in spaces.items():
            self._build_buckets(space, comm, named, int(bucket_mb * 2**20))
        self._param_bucket = {id(p): b for b in self.buckets for _, p, _ in b.params}
        for b in self.buckets:
            for _, p, offset in b.params:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._make_hook(b, offset)))

    # -- layout --------------------------------------------------------------------------------
    def _build_buckets(self, space: str, comm: Communicator | None, named: list[tuple[str, nn.Parameter]],
                       cap_bytes: int) -> None:
        """Group ``named`` into buckets (`bucket_groups`) and make their buffers."""
        groups = bucket_groups(named, cap_bytes)
        # inside a bucket the decayed parameters come first: a rank's shard is then at most two runs of
        # elements (decayed, not decayed), each updated by one `adamw` call whatever the parameter count
        groups = [sorted(g, key=lambda item: self._no_decay(*item)) for g in groups]
        n = comm.world_size if comm is not None else 1
        for members in groups:
            offsets, total = [], 0
            for _, p in members:
                offsets.append(total)
                total += -(-p.numel() // ALIGN) * ALIGN
            total = -(-total // n) * n
            p0 = members[0][1]
            param_buffer = torch.zeros(total, dtype=p0.dtype, device=p0.device)
            grad_dtype = torch.promote_types(self.master_dtype, p0.dtype)
            reduced = comm is not None and comm.world_size > 1
            if self.grad_dtype is not None:  # one micro-batch: the dtype that goes on the wire
                wire = self.reduce_dtype if self.exchange == "reduce_scatter" else self.grad_dtype
                grad_dtype = wire if reduced else self.grad_dtype
            direct = self.grad_dtype is not None and not reduced
            grad_buffer = None if direct else torch.zeros(total, dtype=grad_dtype, device=p0.device)
            params = []
            for (name, p), offset in zip(members, offsets):
                if p.dtype != p0.dtype:
                    raise ValueError(f"parameter {name} is {p.dtype}, the others {p0.dtype}")
                view = param_buffer[offset:offset + p.numel()].view_as(p)
                view.copy_(p.detach())
                p.data = view
                params.append((name, p, offset))
            decayed = [offset for (name, p), offset in zip(members, offsets) if not self._no_decay(name, p)]
            split = offsets[len(decayed)] if len(decayed) < len(members) else total
            b = Bucket(index=len(self.buckets), space=space, comm=comm, params=params, numel=total,
                       param_buffer=param_buffer, grad_buffer=grad_buffer, decay_end=split)
            rank = comm.rank if comm is not None else 0
            b.shard_numel = total // n
            b.shard_start = rank * b.shard_numel
            self._segments(b)
            self._init_state(b)
            self.buckets.append(b)

    def _segments(self, b: Bucket) -> None:
        lo, hi = b.shard_start, b.shard_start + b.shard_numel
        for name, p, offset in b.params:
            start, end = max(lo, offset), min(hi, offset + p.numel())
            if start < end:
                b.segments.append(Segment(name=name, param=p, bucket_offset=start, shard_offset=start - lo,
                                          param_offset=start - offset, numel=end - start,
                                          decay=not self._no_decay(name, p), bucket=b.index))

    def _init_state(self, b: Bucket) -> None:
        shard = b.param_shard
        b.aliased = shard.dtype == self.master_dtype
        if self.master_remainder and shard.dtype == torch.bfloat16 and self.master_dtype == torch.float32:
            b.remainder = torch.zeros(b.shard_numel, dtype=torch.int16, device=shard.device)  # master = weight
        else:
            b.master = shard if b.aliased else shard.to(self.master_dtype)
        b.exp_avg = torch.zeros(b.shard_numel, dtype=self.moment_dtype, device=shard.device)
        b.exp_avg_sq = torch.zeros_like(b.exp_avg)

    def _communicates(self, b: Bucket) -> bool:
        return b.comm is not None and b.comm.world_size > 1

    # -- gradients -----------------------------------------------------------------------------
    def _make_hook(self, b: Bucket, offset: int) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            if param.grad is None:
                return
            with torch.no_grad():
                if b.direct:  # one micro-batch a step: keep autograd's gradient (the update reads it flat)
                    b.grads[id(param)] = param.grad.contiguous()
                    self._seen.add(id(param))
                else:
                    view = b.grad_buffer[offset:offset + param.numel()].view_as(param)
                    if id(param) in self._seen:
                        view.add_(param.grad)
                    else:  # the step's first gradient overwrites: the buffer needs no clearing between steps
                        view.copy_(param.grad)
                        self._seen.add(id(param))
            param.grad = None
            if self._micro == self._micro_batches - 1:
                b.pending -= 1
                self._launch_ready()
        return hook

    def start_step(self, micro_batches: int) -> None:
        """Expect ``micro_batches`` backwards before `finish_gradients`."""
        if micro_batches > 1:  # sums need buffers at least as wide as the master weights
            for b in self.buckets:
                held = self.grad_dtype if b.direct else b.grad_buffer.dtype
                if b.direct or (held != self.master_dtype
                                and torch.promote_types(held, self.master_dtype) == self.master_dtype):
                    raise ValueError(f"accumulating {micro_batches} micro-batches needs {self.master_dtype} "
                                     f"gradient buffers, not {held} gradients of an optimizer built for one "
                                     "(grad_dtype)")
        self._micro_batches = micro_batches
        self._micro = 0
        self._next_launch = 0
        self._seen.clear()
        for b in self.buckets:
            b.pending = len(b.params)
            b.work = None
            b.reduced = b.send = b.received = None
            b.grads = {}
            b.squares = b.squares_done = None

    @property
    def _scale(self) -> float:
        """The averaging factor of this step's gradient sums: every loss is a mean over its rank's
        micro-batch, so the global mean divides by all of them."""
        return 1.0 / (self.world_size * self._micro_batches)

    def next_micro_batch(self) -> None:
        self._micro += 1

    def _launch_ready(self) -> None:
        while self._next_launch < len(self.buckets) and self.buckets[self._next_launch].pending <= 0:
            self._launch(self.buckets[self._next_launch])
            self._next_launch += 1

    def _launch(self, b: Bucket) -> None:
        if b.direct:
            self._bucket_squares(b)
        if not self._communicates(b):
            return
        if self.exchange == "all_to_all":  # block j of the buffer to rank j; summed when it has arrived
            b.send = b.grad_buffer
            b.received = torch.empty_like(b.grad_buffer)
            b.work = b.comm.all_to_all_single(b.received, b.send, async_op=True)
            return
        b.send = b.grad_buffer if b.grad_buffer.dtype == self.reduce_dtype else b.grad_buffer.to(self.reduce_dtype)
        b.reduced = torch.empty(b.shard_numel, dtype=b.send.dtype, device=b.send.device)
        b.work = b.comm.reduce_scatter(b.reduced, b.send, op="sum", async_op=True)

    def finish_gradients(self) -> None:
        """Launch what is left (parameters that got no gradient this step) and wait for every reduction."""
        for b in self.buckets[self._next_launch:]:
            b.pending = 0
            for _, p, offset in b.params:
                if id(p) not in self._seen:  # no gradient this step: zero, not last step's
                    if b.direct:
                        b.grads[id(p)] = torch.zeros_like(p)
                        continue
                    self._wait_gather(b)  # a side-stream update may still read the buffer
                    b.grad_buffer[offset:offset + p.numel()].zero_()
        self._launch_ready()
        for b in self.buckets:
            if b.work is not None:
                b.work.wait()
                b.work = None
            if b.received is not None:  # every rank's copy of this rank's shard, added in rank order
                b.reduced = b.received.view(b.comm.world_size, b.shard_numel).sum(0, dtype=self.reduce_dtype)
                b.received = None
            b.send = None

    @property
    def _norm_dtype(self) -> torch.dtype:
        """The dtype the gradient norm's sums of squares are taken in."""
        return torch.promote_types(self.master_dtype, torch.float32)

    def _squares(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The backend's `sum_of_squares` of ``tensors``, in the norm's dtype (so every bucket's part adds up).
        A float64 norm takes float64 inputs (the op sums other dtypes in float32): a float64 run whose
        gradients were reduced in a narrower dtype still sums their squares in float64."""
        if self._norm_dtype == torch.float64:
            tensors = [t.to(torch.float64) for t in tensors]  # no copy of float64 ones
        return self._sum_of_squares(tensors).to(self._norm_dtype)

    def _bucket_squares(self, b: Bucket) -> None:
        """The complete bucket's share of the gradient norm, beside the rest of backward where there is a
        side stream (its gradients stay alive until `update`, which waits for this first)."""
        grads = list(b.grads.values())
        if self._norm_side is None:
            b.squares = self._squares(grads)
            return
        ready = self._device.event()
        ready.record()
        self._norm_side.wait_event(ready)
        with self._norm_side:
            b.squares = self._squares(grads)
            b.squares_done = self._device.event()
            b.squares_done.record(self._norm_side)

    # -- the update ----------------------------------------------------------------------------
    def grad_norm(self) -> torch.Tensor:
        """The global L2 norm of the averaged gradient (each element counted once over all ranks), on the device:
        one partial sum of squares per bucket (a bucket without a gradient buffer has its own from backward),
        added in bucket order."""
        acc = self._norm_dtype
        if not self.buckets:
            return torch.zeros((), dtype=acc)
        parts = []
        for b in self.buckets:
            if b.squares is None:  # a reduced shard (or a bucket finished without `_launch`)
                parts.append(self._squares(list(b.grads.values()) if b.direct else [b.step_grad]))
                continue
            if b.squares_done is not None:
                b.squares_done.wait()
            parts.append(b.squares)
        squares = torch.stack(parts).sum()
        if self.world is not None and self.world.world_size > 1:
            squares = squares.reshape(1).to(torch.float64)
            self.world.all_reduce(squares, op="sum")
            squares = squares[0].to(acc)
        return squares.sqrt() * self._scale

    @torch.no_grad()
    def update(self, lr: float, grad_clip: float | None, schedule: DeviceSchedule | None = None) -> StepStats:
        """Clip by the global norm, update the owned shards (AdamW) and start all-gathering the new weights.

        With ``schedule`` (already set to this step's lr and ``step_count + 1``) the `adamw` calls read the
        lr and the step number from the device instead of taking ``lr`` and ``step_count`` as numbers.

        Buckets are updated last to first, so the weights the next forward needs first (embedding,
        first layers) start gathering first; each bucket's all-gather starts as soon as its shard is
        updated, and `wait_weights` (or, with `gather_before_use`, each module's first call) waits.
        """
        norm = self.grad_norm()
        coef = torch.ones_like(norm)
        if grad_clip is not None:
            coef = torch.where(norm > grad_clip, grad_clip / (norm + 1e-6), coef)
        grad_scale = (coef * self._scale).reshape(1)  # in the accumulation dtype: fp64 runs stay fp64
        self.step_count += 1
        hyper = (schedule.lr, schedule.step) if schedule is not None else (lr, self.step_count)
        side = self._side if any(not self._communicates(b) for b in self.buckets) else None
        if side is not None:
            ready = self._device.event()
            ready.record()  # the gradients and the norm, on the compute stream
            side.wait_event(ready)
            start, end = self._device.event(enable_timing=True), self._device.event(enable_timing=True)
            start.record(side)
        for b in reversed(self.buckets):
            # a weight all-gather still in flight (a module that was not called) would write the old
            # shard back over the update
            self._wait_gather(b)
            if side is not None and not self._communicates(b):
                with side:
                    self._update_bucket(b, hyper, grad_scale)
                    done = self._device.event()
                    done.record(side)
                # the compute stream frees what it allocated (the scale) only after it waited for the update
                b.gather = _SideWork(done, keep=(grad_scale, b.reduced, b.grads))
            else:
                self._update_bucket(b, hyper, grad_scale)
            b.reduced = None
            b.grads = {}  # autograd's gradients are freed as soon as their bucket is updated
            self._gather(b)
        if side is not None:
            end.record(side)
            self.update_span = (start, end)
        weights_updated()  # the weights changed behind their version counters (fp8 weight cache)
        return StepStats(grad_norm=norm, clip_coef=coef)

    def _update_bucket(self, b: Bucket, hyper: tuple[float | torch.Tensor, int | torch.Tensor],
                       grad_scale: torch.Tensor) -> None:
        """AdamW over the bucket's shard: decayed and not decayed elements, one `adamw` call each, over
        the flat shard (one tensor) or, for a bucket without a gradient buffer, over its parameters
        (alignment padding is then not touched: it stays zero, as an update of zeros would leave it)."""
        beta1, beta2 = self.betas
        lr, step = hyper
        if b.direct:
            runs = [[(s.shard_offset, s.shard_offset + s.numel, b.grads[id(s.param)].view(-1)[
                s.param_offset:s.param_offset + s.numel]) for s in b.segments if s.decay == decay]
                for decay in (True, False)]
        else:
            lo, hi = b.shard_start, b.shard_start + b.shard_numel
            split = min(max(b.decay_end, lo), hi) - lo  # shard offset where no-decay elements start
            # alignment padding updates to zero: its weight, gradient and moments are all zero
            runs = [[(0, split, b.step_grad[:split])], [(split, b.shard_numel, b.step_grad[split:])]]
        for decay, run in zip((True, False), runs):
            run = [(start, end, grad) for start, end, grad in run if start < end]
            if not run:
                continue
            kept = b.remainder if b.remainder is not None else b.master  # the master's own storage
            master, param, m, v = ([t[start:end] for start, end, _ in run]
                                   for t in (kept, b.param_shard, b.exp_avg, b.exp_avg_sq))
            form = ({"param_remainders": master} if b.remainder is not None else
                    {"master_params": None if b.aliased else master})
            new = self._adamw(master if b.aliased else param, [g for _, _, g in run], m, v, lr=lr, beta1=beta1,
                              beta2=beta2, eps=self.eps, weight_decay=self.weight_decay if decay else 0.0,
                              step=step, grad_scale=grad_scale, **form)
            targets = [master if b.aliased else param, m, v] + ([] if b.aliased else [master])
            for dsts, srcs in zip(targets, new):
                for dst, src in zip(dsts, srcs):
                    if src is not dst:
                        dst.copy_(src)

    def wait_weights(self, lazy: bool = False) -> None:
        """Wait for the weights' all-gathers; ``lazy``: only those no block's pre-hook will wait for."""
        for b in self.buckets:
            if not (lazy and b.index in self._lazy):
                self._wait_gather(b)

    def gather_before_use(self, modules: list[nn.Module]) -> None:
        """Let each of ``modules`` wait for its own weights' all-gathers when it is first called.

        The gathers then overlap the forward of the modules before it (pass the transformer blocks
        and the modules called after them, like the final norm); buckets holding weights used outside
        these modules (the embedding, read by the model itself) stay for `wait_weights(lazy=True)`.
        """
        inside: set[int] = set()
        for module in modules:
            mine = sorted({self._param_bucket[id(p)].index for p in module.parameters()
                           if id(p) in self._param_bucket})
            inside.update(id(p) for p in module.parameters())
            self._hooks.append(module.register_forward_pre_hook(self._make_wait(mine)))
        outside = {b.index for b in self.buckets for _, p, _ in b.params if id(p) not in inside}
        self._lazy = {b.index for b in self.buckets} - outside

    def _make_wait(self, indices: list[int]) -> Callable[..., None]:
        def wait(module: nn.Module, args: Any) -> None:
            for i in indices:
                self._wait_gather(self.buckets[i])
        return wait

    @staticmethod
    def _wait_gather(b: Bucket) -> None:
        if b.gather is not None:
            b.gather.wait()
            b.gather = None
            weights_updated()

    def step(self, lr: float, grad_clip: float | None, schedule: DeviceSchedule | None = None) -> StepStats:
        """`update` then `wait_weights`."""
        stats = self.update(lr, grad_clip, schedule)
        self.wait_weights()
        return stats

    def _gather(self, b: Bucket) -> None:
        if not self._communicates(b):
            return
        b.gather = b.comm.all_gather(b.param_buffer, b.param_shard.clone(), async_op=True)

    # -- state ---------------------------------------------------------------------------------
    def segments(self) -> list[Segment]:
        """The parts of parameters whose optimizer state this rank owns."""
        return [s for b in self.buckets for s in b.segments]

    def state_segments(self) -> list[tuple[Segment, dict[str, torch.Tensor]]]:
        """Each owned segment with its master, exp_avg and exp_avg_sq (views into the shards; a master kept as
        a remainder is decoded into a new tensor). Write them with `load_segment`."""
        out = []
        for b in self.buckets:
            for s in b.segments:
                sl = slice(s.shard_offset, s.shard_offset + s.numel)
                master = b.master[sl] if b.remainder is None else join_master(b.param_shard[sl], b.remainder[sl])
                out.append((s, {"master": master, "exp_avg": b.exp_avg[sl], "exp_avg_sq": b.exp_avg_sq[sl]}))
        return out

    @torch.no_grad()
    def load_segment(self, segment: Segment, key: str, value: torch.Tensor) -> None:
        """Set one owned segment's ``master``, ``exp_avg`` or ``exp_avg_sq`` (any dtype: converted). A master
        kept as a remainder sets the weights' slice too (its upper half); `gather_weights` after loading."""
        b = self.buckets[segment.bucket]
        sl = slice(segment.shard_offset, segment.shard_offset + segment.numel)
        if key == "master" and b.remainder is not None:
            weight, remainder = split_master(value.to(device=b.remainder.device, dtype=torch.float32))
            b.param_shard[sl].copy_(weight)
            b.remainder[sl].copy_(remainder)
            return
        target = {"master": b.master, "exp_avg": b.exp_avg, "exp_avg_sq": b.exp_avg_sq}[key]
        target[sl].copy_(value.to(target.dtype))

    @torch.no_grad()
    def gather_weights(self) -> None:
        """Round the masters into the weights and all-gather them (after loading optimizer state)."""
        for b in self.buckets:
            self._wait_gather(b)
            if b.master is not None and not b.aliased:  # (a remainder's weights are already its masters' upper halves)
                b.param_shard.copy_(b.master)
            self._gather(b)
        for b in self.buckets:
            self._wait_gather(b)
        weights_updated()

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for weights, gradients and optimizer state (master or remainder + moments)."""
        opt = sum(b.exp_avg.numel() * b.exp_avg.element_size() * 2 for b in self.buckets)
        kept = [b.remainder if b.remainder is not None else b.master for b in self.buckets if not b.aliased]
        opt += sum(t.numel() * t.element_size() for t in kept)
        # a bucket without a buffer holds autograd's gradients from its backward to its update
        grads = sum(b.grad_buffer.numel() * b.grad_buffer.element_size() if b.grad_buffer is not None else
                    sum(p.numel() * p.element_size() for _, p, _ in b.params) for b in self.buckets)
        return {"weights": sum(b.param_buffer.numel() * b.param_buffer.element_size() for b in self.buckets),
                "gradients": grads,
                "optimizer": opt}

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


def master_dtype(weights: torch.dtype) -> torch.dtype:
    """The master weights' dtype for weights of dtype ``weights``: float64 for float64 (verification runs),
    float32 for everything else."""
    return torch.float64 if weights == torch.float64 else torch.float32


def bucket_groups(named: list[tuple[str, nn.Parameter]], cap_bytes: int) -> list[list[tuple[str, nn.Parameter]]]:
    """``named`` in reverse order (roughly the order backward produces gradients), cut into buckets: a bucket
    takes parameters until it holds ``cap_bytes`` of float32 (the last one may take it past)."""
    groups: list[list[tuple[str, nn.Parameter]]] = []
    size = 0
    for name, p in reversed(named):
        if not groups or size >= cap_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, p))
        size += p.numel() * 4
    return groups


def named_spaces(model: nn.Module, dense: Communicator | None, expert: Communicator | None,
                 is_expert: Callable[[nn.Parameter], bool]) -> dict[str, tuple[Communicator | None,
                                                                                 list[tuple[str, nn.Parameter]]]]:
    """Split the model's trainable parameters into the dense and expert spaces, in module order."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    spaces = {"dense": (dense, [(n, p) for n, p in params if not is_expert(p)])}
    experts = [(n, p) for n, p in params if is_expert(p)]
    if experts:
        spaces["expert"] = (expert, experts)
    return spaces
