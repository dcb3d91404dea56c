"""Host staging that streams: what the ``host`` and ``hier`` adaptors move their bytes with.

A collective on device tensors is cut into chunks (`chunk_bytes`, default `DEFAULT_CHUNK_BYTES`,
``$OPENSEEK_HAL_HOST_CHUNK_BYTES`` or the adaptors' ``chunk_bytes=`` option). For each chunk: copy
device -> host, run the host collective on it, copy host -> device. On CUDA the copies run on two
side streams with events, so the device -> host copy of chunk k+1 and the host -> device copy of
chunk k-1 overlap the host collective of chunk k; host buffers are pinned and reused (allocated
once per communicator, grown when a larger dtype needs it). On the CPU the copies are plain memcpys
and the same chunk loop runs (the tests exercise it there).

Two host transports:

- `ShmTransport`, when every rank of the group is on this host (the usual case: the ranks of one
  machine): one shared-memory segment per group with a slot per rank and three rotating buffers
  per slot. A rank copies its chunk into its slot, arrives at a barrier (a counter per rank in the
  segment), then reads the other ranks' slots and reduces/gathers into its output. Three buffers
  make one barrier per chunk enough: a rank writes buffer ``k % 3`` for chunk k only after the
  barrier of chunk k-1, which no rank passes before it has finished reading chunk k-3 (the same
  buffer). Every rank reduces the slots in rank order, so every rank gets the same bits.
  A peer that dies is noticed within half a second (its pid is in the segment); one that hangs
  fails the wait after the communicator's timeout.
- `GlooTransport`, across hosts: each chunk staged through a pinned buffer and reduced by gloo,
  the next chunk's device -> host copy running while gloo works on the current one.

``$OPENSEEK_HAL_HOST_TRANSPORT`` = ``auto`` (default: shared memory when every rank is on this host),
``shm`` or ``gloo``; the adaptors' ``transport=`` option does the same per communicator.
"""

from __future__ import annotations

import math
import mmap
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

ENV_CHUNK = "OPENSEEK_HAL_HOST_CHUNK_BYTES"
ENV_TRANSPORT = "OPENSEEK_HAL_HOST_TRANSPORT"
# Diagnostics and tests: stage CPU tensors through the host result buffers as device tensors are
# (then the CPU runs every line of the device path but the CUDA stream calls).
ENV_STAGE_CPU = "OPENSEEK_HAL_HOST_STAGE_CPU"
DEFAULT_CHUNK_BYTES = 1 << 20  # measured: see docs/comm.md (host adaptor, chunk size)
TRANSPORTS = ("auto", "shm", "gloo")
_NBUF = 3  # rotating buffers per slot: one barrier per chunk (see the module doc)
_LINE = 64  # bytes per counter: one cache line each
_SHM_DIR = "/dev/shm"
_CPU = torch.device("cpu")
_fence = threading.Lock()  # acquiring/releasing a lock is a full memory barrier on every CPU torch runs on


def chunk_bytes_default() -> int:
    text = os.environ.get(ENV_CHUNK, "")
    if not text:
        return DEFAULT_CHUNK_BYTES
    from .bench import parse_bytes

    try:
        value = parse_bytes(text)
    except Exception:
        raise ValueError(f"${ENV_CHUNK}={text!r} is not a size (e.g. 1M, 262144)") from None
    if value < 4096:
        raise ValueError(f"${ENV_CHUNK}={text!r}: the chunk size must be at least 4 KiB")
    return value


def _memory_barrier() -> None:
    with _fence:
        pass


# -- device <-> host copies ------------------------------------------------------------------------

class Copier:
    """Chunk copies between the communicator's device and host memory.

    CPU tensors already live in host memory (``host_resident``): results are written straight into
    them. CUDA copies are ``non_blocking`` on two side streams; ``to_host`` returns an event the
    caller synchronizes before the host reads the chunk; ``to_device`` records one per result buffer,
    waited for before the buffer is reused and at the end of the collective (`drain`).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.host_resident = device.type == "cpu" and os.environ.get(ENV_STAGE_CPU, "") not in ("1", "true")
        self.cuda = device.type == "cuda"
        self._d2h = self._h2d = None
        if self.cuda:
            self._d2h = torch.cuda.Stream(device)
            self._h2d = torch.cuda.Stream(device)
        self._pending: list[Any] = []
        self._ready: Any = None

    def caller_ready(self) -> Any:
        """On the calling thread, before handing a collective to a worker thread: an event on the
        caller's current stream, after which the inputs are written (None off CUDA)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def set_ready(self, event: Any) -> None:
        self._ready = event

    def begin(self) -> None:
        """Order the side streams after what the caller's stream had queued (it wrote the inputs):
        the event from `caller_ready` when the call was handed over, else the current stream."""
        if self.cuda:
            if self._ready is not None:
                self._d2h.wait_event(self._ready)
                self._h2d.wait_event(self._ready)
            else:
                current = torch.cuda.current_stream(self.device)
                self._d2h.wait_stream(current)
                self._h2d.wait_stream(current)

    def to_host(self, dst: torch.Tensor, src: torch.Tensor) -> Any:
        if not self.cuda:
            dst.copy_(src)
            return None
        with torch.cuda.stream(self._d2h):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._d2h)
        return event

    def to_device(self, dst: torch.Tensor, src: torch.Tensor) -> Any:
        if not self.cuda:
            dst.copy_(src)
            return None
        with torch.cuda.stream(self._h2d):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._h2d)
        self._pending.append(event)
        return event

    @staticmethod
    def wait(event: Any) -> None:
        if event is not None:
            event.synchronize()

    def drain(self) -> None:
        """Block until every host -> device copy issued so far has landed."""
        for event in self._pending:
            event.synchronize()
        self._pending.clear()


def pinned_empty(nbytes: int, device: torch.device) -> torch.Tensor:
    """A host byte buffer, page-locked when the device is a CUDA GPU (async copies need it)."""
    pin = device.type == "cuda"
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)


class ResultBuffers:
    """Two reusable host buffers that results are assembled in before their host -> device copy.

    Buffer ``k % 2`` holds chunk k's result; before it is reused for chunk k+2, the copy of chunk k
    out of it must have finished (its event is waited for).
    """

    def __init__(self, device: torch.device, nbytes: int):
        self.device = device
        self._bufs = [pinned_empty(nbytes, device) for _ in range(2)]
        self._events: list[list[Any]] = [[], []]

    def take(self, k: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        i = k % 2
        for event in self._events[i]:
            Copier.wait(event)
        self._events[i] = []
        need = numel * _itemsize(dtype)
        if self._bufs[i].numel() < need:  # a wider dtype than the chunk size was planned for
            self._bufs[i] = pinned_empty(need, self.device)
        return self._bufs[i][:need].view(dtype)

    def copied(self, k: int, event: Any) -> None:
        if event is not None:
            self._events[k % 2].append(event)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _combine(acc: torch.Tensor, other: torch.Tensor, op: str) -> None:
    if op in ("sum", "avg"):
        acc.add_(other)
    elif op == "max":
        torch.maximum(acc, other, out=acc)
    else:
        torch.minimum(acc, other, out=acc)


def _spans(total: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(a + step, total)) for a in range(0, total, step)]


# -- placement: is every rank of the group on this host? --------------------------------------------

def _host_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def transport_options(options: dict[str, Any], policy: Any) -> dict[str, Any]:
    """The transport options of a communicator whose `openseek_hal.comm.tune.Policy` may pick chunk sizes
    per call: its buffers are sized for the largest chunk the table uses (a chunk size given by option
    or ``$OPENSEEK_HAL_HOST_CHUNK_BYTES`` wins, and the table's chunk sizes are then ignored)."""
    if os.environ.get(ENV_CHUNK) and options.get("chunk_bytes") is None:
        policy.fixed_chunk = True
    largest = policy.largest_chunk()
    if largest is None or options.get("chunk_bytes") is not None:
        return dict(options)
    return {**options, "chunk_bytes": max(largest, chunk_bytes_default())}


def make_transport(cpu: Any, device: torch.device, *, chunk_bytes: int | None = None,
                   transport: str | None = None) -> ShmTransport | GlooTransport:
    """The host transport for the gloo `TorchCommunicator` ``cpu``; every rank of its group calls this."""
    chunk = chunk_bytes if chunk_bytes is not None else chunk_bytes_default()
    if chunk < 4096:
        raise ValueError(f"chunk_bytes must be at least 4096, got {chunk}")
    mode = transport or os.environ.get(ENV_TRANSPORT, "") or "auto"
    if mode not in TRANSPORTS:
        raise ValueError(f"unknown host transport {mode!r} (choose from {', '.join(TRANSPORTS)})")
    if mode == "gloo" or (cpu.world_size == 1 and mode == "auto"):
        return GlooTransport(cpu, device, chunk)
    hosts: list[Any] = [None] * cpu.world_size
    dist.all_gather_object(hosts, (_host_id(), os.path.isdir(_SHM_DIR)), group=cpu.pg)
    local = all(h == hosts[0] for h in hosts) and all(ok for _, ok in hosts)
    if not local:
        if mode == "shm":
            raise ValueError("the shm host transport needs every rank of the group on one host with /dev/shm")
        return GlooTransport(cpu, device, chunk)
    return ShmTransport(cpu, device, chunk)


# -- shared memory -----------------------------------------------------------------------------------

class ShmTransport:
    """Collectives through one shared-memory segment among the ranks of one host (see the module doc)."""

    name = "shm"

    def __init__(self, cpu: Any, device: torch.device, chunk_bytes: int):
        self.cpu, self.device, self.timeout = cpu, device, cpu.timeout
        self.rank, self.world_size = cpu.rank, cpu.world_size
        n = self.world_size
        self.slot_bytes = -(-chunk_bytes // _LINE) * _LINE
        self.chunk_bytes = self.slot_bytes
        counters = 2 * n * _LINE  # arrival counter and pid of each rank
        meta = _NBUF * n * -(-8 * n // _LINE) * _LINE  # all-to-all splits, per buffer and rank
        self._meta_stride = -(-8 * n // _LINE) * _LINE
        self._meta_at = counters
        self._data_at = counters + meta
        size = self._data_at + _NBUF * n * self.slot_bytes
        self._map, self._segment = self._attach(size)
        raw = torch.frombuffer(self._map, dtype=torch.uint8)
        self._raw = raw
        self._words = raw[:counters].view(torch.int64)  # rank r's counter at r*8, pid at (n+r)*8 (in words)
        self._stride = _LINE // 8
        self._words[(n + self.rank) * self._stride] = os.getpid()
        self._seq = 0
        self.call_chunk = self.slot_bytes
        self._pinned = self._pin(raw) if device.type == "cuda" else False
        self.copier = Copier(device)
        self.results = ResultBuffers(device, n * self.slot_bytes) if not self.copier.host_resident else None
        self.cpu._barrier()  # every pid is written before anyone waits on a counter

    def _attach(self, size: int) -> tuple[mmap.mmap, str]:
        """Rank 0 creates the segment and names it; everyone maps it; then it is unlinked (no leak)."""
        name = [None]
        path = None
        if self.rank == 0:
            path = os.path.join(_SHM_DIR, f"openseek-hal-{os.getpid()}-{uuid.uuid4().hex[:12]}")
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
            name = [path]
        dist.broadcast_object_list(name, src=self.cpu.global_ranks[0], group=self.cpu.pg)
        path = name[0]
        fd = os.open(path, os.O_RDWR)
        try:
            mapped = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.cpu._barrier()
        if self.rank == 0:
            os.unlink(path)  # the mappings keep it alive; nothing is left in /dev/shm after the job
        return mapped, path

    @staticmethod
    def _pin(raw: torch.Tensor) -> bool:
        """Page-lock the segment so that device copies into and out of slots can be asynchronous."""
        try:
            err = torch.cuda.cudart().cudaHostRegister(raw.data_ptr(), raw.numel(), 0)
            return int(getattr(err, "value", err)) == 0
        except Exception:  # noqa: BLE001  (then copies are synchronous: slower, still correct)
            return False

    # -- the slot and barrier primitives ------------------------------------------------------------
    def _slot(self, seq: int, rank: int, dtype: torch.dtype, numel: int, offset: int = 0) -> torch.Tensor:
        start = self._data_at + ((seq % _NBUF) * self.world_size + rank) * self.slot_bytes
        size = _itemsize(dtype)
        return self._raw[start + offset * size:start + (offset + numel) * size].view(dtype)

    def _meta(self, seq: int, rank: int) -> torch.Tensor:
        start = self._meta_at + ((seq % _NBUF) * self.world_size + rank) * self._meta_stride
        return self._raw[start:start + 8 * self.world_size].view(torch.int64)

    def _arrive(self) -> int:
        """Publish this rank's writes for the next sequence number and wait for every rank to do the same."""
        self._seq += 1
        seq = self._seq
        n, stride = self.world_size, self._stride
        _memory_barrier()  # the slot writes are visible before the counter says so
        self._words[self.rank * stride] = seq
        counters = self._words[0:n * stride:stride]
        deadline = time.monotonic() + self.timeout
        next_check = time.monotonic() + 0.5
        spins = 0
        while int(counters.min()) < seq:
            spins += 1
            if spins < 64:
                continue
            if spins < 2000:
                os.sched_yield()
            else:
                time.sleep(0.0001)
            now = time.monotonic()
            if now >= next_check:
                next_check = now + 0.5
                self._check_peers(seq)
                if now >= deadline:
                    late = [r for r in range(n) if int(counters[r]) < seq]
                    raise RuntimeError(f"timed out waiting in shared memory for rank(s) {late}")
        _memory_barrier()  # the peers' slot writes are read after their counters
        return seq

    def _check_peers(self, seq: int) -> None:
        n, stride = self.world_size, self._stride
        for r in range(n):
            if int(self._words[r * stride]) >= seq:
                continue
            pid = int(self._words[(n + r) * stride])
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                raise RuntimeError(f"rank {r} of the group (pid {pid}) exited during the collective") from None
            except PermissionError:
                pass

    # -- the collectives (tensors are contiguous; shapes were checked by BaseCommunicator) --------
    def _elems(self, dtype: torch.dtype) -> int:
        return max(1, min(self.call_chunk, self.slot_bytes) // _itemsize(dtype))

    def use_chunk(self, nbytes: int | None) -> None:
        """Chunk the next calls in ``nbytes`` (at most the slot size; None: the slot size)."""
        self.call_chunk = self.slot_bytes if nbytes is None else max(_LINE, min(int(nbytes), self.slot_bytes))

    def _deliver(self, k: int, dsts: Sequence[torch.Tensor], fill: Callable[[Sequence[torch.Tensor]], None]) -> None:
        """Write chunk k's result into the device views ``dsts``: directly on the CPU, else through a
        host result buffer and an async host -> device copy per view."""
        if self.results is None or (self.device.type != "cpu" and all(d.device.type == "cpu" for d in dsts)):
            fill(dsts)  # host memory already (the CPU, or host buffers of a device communicator)
            return
        total = sum(d.numel() for d in dsts)
        buf = self.results.take(k, total, dsts[0].dtype)
        views, at = [], 0
        for d in dsts:
            views.append(buf[at:at + d.numel()])
            at += d.numel()
        fill(views)
        for d, v in zip(dsts, views):
            self.results.copied(k, self.copier.to_device(d, v))

    def _pipeline(self, spans: list[tuple[int, int]], stage_in: Callable[[int, int, int, int], list[Any]],
                  land: Callable[[int, int, int, int], None]) -> None:
        """For chunk k: ``stage_in(k, seq, a, b)`` copies it into this rank's slot (events returned),
        the barrier, ``land(k, seq, a, b)`` reads the slots. Chunk k+1 is staged before chunk k lands."""
        self.copier.begin()
        base = self._seq
        staged = stage_in(0, base + 1, *spans[0]) if spans else []
        for k, (a, b) in enumerate(spans):
            for event in staged:
                Copier.wait(event)
            if k + 1 < len(spans):
                # chunk k+1 goes to buffer (seq+1) % 3, last read before the barrier that this rank has passed
                next_staged = stage_in(k + 1, base + k + 2, *spans[k + 1])
            else:
                next_staged = []
            seq = self._arrive()
            land(k, seq, a, b)
            staged = next_staged
        self.copier.drain()

    def all_reduce(self, tensor: torch.Tensor, op: str) -> None:
        flat = tensor.view(-1)
        dtype, n = flat.dtype, self.world_size

        def stage_in(k, seq, a, b):
            return [self.copier.to_host(self._slot(seq, self.rank, dtype, b - a), flat[a:b])]

        def land(k, seq, a, b):
            def fill(views):
                acc = views[0]
                acc.copy_(self._slot(seq, 0, dtype, b - a))
                for r in range(1, n):
                    _combine(acc, self._slot(seq, r, dtype, b - a), op)
                if op == "avg":
                    acc.div_(n)
            self._deliver(k, [flat[a:b]], fill)

        self._pipeline(_spans(flat.numel(), self._elems(dtype)), stage_in, land)

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        src, out = input.view(-1), output.view(-1)
        dtype, n, count = src.dtype, self.world_size, src.numel()

        def stage_in(k, seq, a, b):
            return [self.copier.to_host(self._slot(seq, self.rank, dtype, b - a), src[a:b])]

        def land(k, seq, a, b):
            def fill(views):
                for r in range(n):
                    views[r].copy_(self._slot(seq, r, dtype, b - a))
            self._deliver(k, [out[r * count + a:r * count + b] for r in range(n)], fill)

        self._pipeline(_spans(count, self._elems(dtype)), stage_in, land)

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, op: str) -> None:
        src, out = input.view(-1), output.view(-1)
        dtype, n, count = src.dtype, self.world_size, out.numel()
        piece = max(1, self._elems(dtype) // n)  # a slot holds one piece for each destination rank

        def stage_in(k, seq, a, b):
            m = b - a
            return [self.copier.to_host(self._slot(seq, self.rank, dtype, m, j * m), src[j * count + a:j * count + b])
                    for j in range(n)]

        def land(k, seq, a, b):
            m = b - a

            def fill(views):
                acc = views[0]
                acc.copy_(self._slot(seq, 0, dtype, m, self.rank * m))
                for r in range(1, n):
                    _combine(acc, self._slot(seq, r, dtype, m, self.rank * m), op)
                if op == "avg":
                    acc.div_(n)
            self._deliver(k, [out[a:b]], fill)

        self._pipeline(_spans(count, piece), stage_in, land)

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        flat = tensor.view(-1)
        dtype = flat.dtype

        def stage_in(k, seq, a, b):
            if self.rank != src:
                return []
            return [self.copier.to_host(self._slot(seq, src, dtype, b - a), flat[a:b])]

        def land(k, seq, a, b):
            if self.rank != src:
                self._deliver(k, [flat[a:b]], lambda views: views[0].copy_(self._slot(seq, src, dtype, b - a)))

        self._pipeline(_spans(flat.numel(), self._elems(dtype)), stage_in, land)

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor, output_splits: Sequence[int],
                   input_splits: Sequence[int]) -> None:
        send, recv = _a2a_views(output, input, output_splits, input_splits)
        self.exchange(send, recv)

    def exchange(self, send: Sequence[Sequence[torch.Tensor]], recv: Sequence[Sequence[torch.Tensor]]) -> None:
        """Pairwise exchange among every rank: the concatenation of ``send[d]`` (flat tensors of one
        dtype) goes to rank d and lands in the concatenation of rank d's ``recv[me]``.

        Sizes travel through the segment first; then every rank streams its whole message in rounds
        of one slot, reading from each peer's slot only what is addressed to it (so each rank moves
        what it sends and receives, never the others' traffic).
        """
        n, me = self.world_size, self.rank
        dtype = _common_dtype(send, recv)
        counts = [sum(t.numel() for t in views) for views in send]
        self.copier.begin()
        self._meta(self._seq + 1, me).copy_(torch.tensor(counts, dtype=torch.int64))
        seq = self._arrive()
        sends = [self._meta(seq, q).tolist() for q in range(n)]  # sends[q][r]: elements q sends to r
        for q in range(n):
            want = sum(t.numel() for t in recv[q])
            if sends[q][me] != want:
                raise RuntimeError(f"rank {q} sends {sends[q][me]} elements to rank {me}, which expects {want}")
        starts = [[sum(s[:r]) for r in range(n)] for s in sends]  # where in q's message its part for r starts
        totals = [sum(s) for s in sends]
        mine = _Segments([t for views in send for t in views])
        theirs = [_Segments(list(views)) for views in recv]
        rounds = _spans(max(totals), self._elems(dtype))  # round k carries [k*step, (k+1)*step) of every message

        def stage_in(k, seq, a, b):
            b = min(b, totals[me])
            return [self.copier.to_host(self._slot(seq, me, dtype, hi - lo, lo - a), view)
                    for lo, hi, view in mine.pieces(a, b)]

        def land(k, seq, a, b):
            dsts, srcs = [], []
            for q in range(n):
                lo, hi = max(a, starts[q][me]), min(b, starts[q][me] + sends[q][me])
                for p_lo, p_hi, view in theirs[q].pieces(lo - starts[q][me], hi - starts[q][me]):
                    dsts.append(view)
                    srcs.append(self._slot(seq, q, dtype, p_hi - p_lo, p_lo + starts[q][me] - a))
            if dsts:
                def fill(views):
                    for v, s in zip(views, srcs):
                        v.copy_(s)
                self._deliver(k, dsts, fill)

        self._pipeline(rounds, stage_in, land)


class _Segments:
    """Flat tensors seen as one concatenation: the views that cover a range of it."""

    def __init__(self, views: list[torch.Tensor]):
        self.views = [v.view(-1) for v in views if v.numel()]
        self.starts = [0]
        for v in self.views:
            self.starts.append(self.starts[-1] + v.numel())

    def pieces(self, a: int, b: int) -> list[tuple[int, int, torch.Tensor]]:
        """(lo, hi, view) for each stretch [lo, hi) of [a, b) and the part of a view holding it."""
        out = []
        for i, v in enumerate(self.views):
            s, e = self.starts[i], self.starts[i + 1]
            lo, hi = max(a, s), min(b, e)
            if hi > lo:
                out.append((lo, hi, v[lo - s:hi - s]))
        return out


def _common_dtype(send: Sequence[Sequence[torch.Tensor]], recv: Sequence[Sequence[torch.Tensor]]) -> torch.dtype:
    dtypes = {t.dtype for views in (*send, *recv) for t in views}
    if len(dtypes) > 1:
        raise ValueError(f"an exchange moves one dtype, got {sorted(map(str, dtypes))}")
    return dtypes.pop() if dtypes else torch.uint8


def _a2a_views(output: torch.Tensor, input: torch.Tensor, output_splits: Sequence[int],
               input_splits: Sequence[int]) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """all_to_all_single as an exchange: the rows for rank d, the rows from rank q (flat views)."""
    src, out = input.view(-1), output.view(-1)
    row = math.prod(input.shape[1:]) if input.dim() > 1 else 1
    send, recv, a, b = [], [], 0, 0
    for s in input_splits:
        send.append([src[a:a + s * row]])
        a += s * row
    for s in output_splits:
        recv.append([out[b:b + s * row]])
        b += s * row
    return send, recv


# -- gloo across hosts ---------------------------------------------------------------------------------

class GlooTransport:
    """Chunks staged through two pinned host buffers and moved by gloo; the next chunk's copy to the
    host overlaps gloo's work on the current one (and, on CUDA, the previous chunk's copy back)."""

    name = "gloo"

    def __init__(self, cpu: Any, device: torch.device, chunk_bytes: int):
        from .torch_dist import TorchCommunicator

        # a gloo group of its own: asynchronous calls run on a worker thread, and must not interleave
        # with what the caller's thread sends over the communicator's group (the consistency check)
        pg = dist.new_group(list(cpu.global_ranks), timeout=timedelta(seconds=cpu.timeout), backend="gloo",
                            use_local_synchronization=True)
        self.cpu = TorchCommunicator(pg, _CPU, name=cpu.group_name, timeout=cpu.timeout)
        self.device = device
        self.rank, self.world_size = cpu.rank, cpu.world_size
        self.chunk_bytes = chunk_bytes
        self.call_chunk = chunk_bytes
        self.copier = Copier(device)
        n = self.world_size
        self._send = [pinned_empty(n * chunk_bytes, device) for _ in range(2)]
        self._send_events: list[list[Any]] = [[], []]  # copies back to the device out of each send buffer
        self.results = ResultBuffers(device, n * chunk_bytes)

    def _buf(self, k: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        for event in self._send_events[k % 2]:  # an in-place result still being copied out of it
            Copier.wait(event)
        self._send_events[k % 2] = []
        need = numel * _itemsize(dtype)
        if self._send[k % 2].numel() < need:
            self._send[k % 2] = pinned_empty(need, self.device)
        return self._send[k % 2][:need].view(dtype)

    def _elems(self, dtype: torch.dtype) -> int:
        return max(1, min(self.call_chunk, self.chunk_bytes) // _itemsize(dtype))

    def use_chunk(self, nbytes: int | None) -> None:
        """Chunk the next calls in ``nbytes`` (at most the buffers' size; None: that size)."""
        self.call_chunk = self.chunk_bytes if nbytes is None else max(_LINE, min(int(nbytes), self.chunk_bytes))

    def _run(self, spans: list[tuple[int, int]], stage_in: Callable[[int, int, int], tuple[Any, list[Any]]],
             collective: Callable[[int, Any, int, int], Any], land: Callable[[int, Any, int, int], None]) -> None:
        """stage_in(k, a, b) -> (staged chunk, copy events); collective(k, staged, a, b) -> (work, result);
        land(k, result, a, b). Chunk k+1 is staged while gloo runs chunk k."""
        self.copier.begin()
        staged = stage_in(0, *spans[0]) if spans else None
        for k, (a, b) in enumerate(spans):
            chunk, events = staged
            for event in events:
                Copier.wait(event)
            work, result = collective(k, chunk, a, b)
            staged = stage_in(k + 1, *spans[k + 1]) if k + 1 < len(spans) else None
            work.wait()
            land(k, result, a, b)
        self.copier.drain()

    def _deliver(self, k: int, dst: torch.Tensor, host: torch.Tensor, *, in_place: bool = False) -> None:
        event = self.copier.to_device(dst, host)
        if in_place and event is not None:
            self._send_events[k % 2].append(event)
        elif not in_place:
            self.results.copied(k, event)

    def all_reduce(self, tensor: torch.Tensor, op: str) -> None:
        flat = tensor.view(-1)
        dtype = flat.dtype

        def stage_in(k, a, b):
            buf = self._buf(k, b - a, dtype)
            return buf, [self.copier.to_host(buf, flat[a:b])]

        def collective(k, chunk, a, b):
            return self.cpu._all_reduce(chunk, op, True), chunk

        self._run(_spans(flat.numel(), self._elems(dtype)), stage_in, collective,
                  lambda k, res, a, b: self._deliver(k, flat[a:b], res, in_place=True))

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        src, out = input.view(-1), output.view(-1)
        dtype, n, count = src.dtype, self.world_size, src.numel()

        def stage_in(k, a, b):
            buf = self._buf(k, b - a, dtype)
            return buf, [self.copier.to_host(buf, src[a:b])]

        def collective(k, chunk, a, b):
            res = self.results.take(k, n * (b - a), dtype)
            return self.cpu._all_gather(res, chunk, True), res

        def land(k, res, a, b):
            res = res.view(n, b - a)
            for r in range(n):
                self._deliver(k, out[r * count + a:r * count + b], res[r])

        self._run(_spans(count, self._elems(dtype)), stage_in, collective, land)

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, op: str) -> None:
        src, out = input.view(-1), output.view(-1)
        dtype, n, count = src.dtype, self.world_size, out.numel()

        def stage_in(k, a, b):
            m = b - a
            buf = self._buf(k, n * m, dtype)
            return buf, [self.copier.to_host(buf[j * m:(j + 1) * m], src[j * count + a:j * count + b])
                         for j in range(n)]

        def collective(k, chunk, a, b):
            res = self.results.take(k, b - a, dtype)
            return self.cpu._reduce_scatter(res, chunk, op, True), res

        self._run(_spans(count, max(1, self._elems(dtype) // n)), stage_in, collective,
                  lambda k, res, a, b: self._deliver(k, out[a:b], res))

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        flat = tensor.view(-1)
        dtype = flat.dtype

        def stage_in(k, a, b):
            buf = self._buf(k, b - a, dtype)
            return buf, ([self.copier.to_host(buf, flat[a:b])] if self.rank == src else [])

        def collective(k, chunk, a, b):
            return self.cpu._broadcast(chunk, src, True), chunk

        def land(k, res, a, b):
            if self.rank != src:
                self._deliver(k, flat[a:b], res, in_place=True)

        self._run(_spans(flat.numel(), self._elems(dtype)), stage_in, collective, land)

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor, output_splits: Sequence[int],
                   input_splits: Sequence[int]) -> None:
        send, recv = _a2a_views(output, input, output_splits, input_splits)
        self.exchange(send, recv)

    def exchange(self, send: Sequence[Sequence[torch.Tensor]], recv: Sequence[Sequence[torch.Tensor]]) -> None:
        """As `ShmTransport.exchange`: one staged gloo all-to-all of the packed messages (gloo pairs the
        peers itself; point-to-point traffic of uneven sizes)."""
        dtype = _common_dtype(send, recv)
        in_counts = [sum(t.numel() for t in views) for views in send]
        out_counts = [sum(t.numel() for t in views) for views in recv]
        self.copier.begin()
        host_in = self._buf(0, sum(in_counts), dtype)
        at, events = 0, []
        for views in send:
            for t in views:
                events.append(self.copier.to_host(host_in[at:at + t.numel()], t.view(-1)))
                at += t.numel()
        for event in events:
            Copier.wait(event)
        host_out = self.results.take(0, sum(out_counts), dtype)
        self.cpu._all_to_all_single(host_out, host_in, out_counts, in_counts, False)
        at = 0
        for views in recv:
            for t in views:
                self.results.copied(0, self.copier.to_device(t.view(-1), host_out[at:at + t.numel()]))
                at += t.numel()
        self.copier.drain()
