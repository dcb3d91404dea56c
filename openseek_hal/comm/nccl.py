"""The ``nccl`` adaptor: NCCL called directly through ``cupy.cuda.nccl`` on torch tensors.

torch.distributed's NCCL path costs tens of microseconds per call in bookkeeping (work objects,
watchdog, stream juggling); calling NCCL on the tensors' data pointers, on the caller's current
stream, costs a few. Zero copy: NCCL reads and writes the torch tensors' memory. The unique id is
made by the group's first rank and passed to the others through the torch.distributed store.

Semantics follow NCCL's: a collective is enqueued on the current CUDA stream and the host does not
wait for it. ``async_op=True`` enqueues it on a side stream instead (after the current stream's
pending work) and returns a handle whose ``wait()`` makes the current stream wait for it.
``barrier()`` and `NcclCommunicator.synchronize` block the host, polling with the communicator's
timeout: a peer that never arrives gives `CollectiveTimeoutError` and aborts the NCCL
communicator instead of hanging. CuPy is imported only when this adaptor is used.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

import torch
import torch.distributed as dist

from .adaptors import Adaptor
from .base import BaseCommunicator
from .errors import CollectiveError, CollectiveTimeoutError
from .host import host_view
from .torch_dist import TorchCommunicator, new_torch_group

# ncclDataType_t and ncclRedOp_t values from nccl.h (stable ABI; fp8 types need NCCL >= 2.19).
NCCL_DTYPES: dict[torch.dtype, int] = {
    torch.int8: 0, torch.uint8: 1, torch.int32: 2, torch.int64: 4, torch.float16: 6, torch.float32: 7,
    torch.float64: 8, torch.bfloat16: 9, torch.float8_e4m3fn: 10, torch.float8_e5m2: 11,
}
NCCL_OPS: dict[str, int] = {"sum": 0, "max": 2, "min": 3, "avg": 4}
UNIQUE_ID_BYTES = 128
_KEY_PREFIX = "openseek_hal/nccl_uid/"
_group_counter = itertools.count()
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # skips building a Stream object


def is_available() -> tuple[bool, str]:
    """(True, "") when CuPy with NCCL and a CUDA device are present, else (False, why)."""
    try:
        import cupy  # noqa: F401
        from cupy.cuda import nccl  # noqa: F401
    except Exception as e:  # ImportError, or a CuPy built for another CUDA
        return False, (f"CuPy with NCCL is not importable ({type(e).__name__}: {e}); "
                       "install cupy-cuda12x or cupy-cuda13x to match the CUDA runtime")
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, ""


def nccl_dtype(dtype: torch.dtype) -> int:
    try:
        return NCCL_DTYPES[dtype]
    except KeyError:
        raise CollectiveError(f"NCCL has no data type for {dtype} "
                              f"(supported: {', '.join(str(d) for d in NCCL_DTYPES)})") from None


def encode_unique_id(uid: tuple[int, ...] | bytes) -> bytes:
    """CuPy gives the id as bytes (CuPy 13+) or as 128 signed chars (older); the store holds bytes."""
    if len(uid) != UNIQUE_ID_BYTES:
        raise ValueError(f"an NCCL unique id has {UNIQUE_ID_BYTES} bytes, got {len(uid)}")
    return bytes(b & 0xFF for b in uid)


def decode_unique_id(data: bytes) -> tuple[int, ...]:
    if len(data) != UNIQUE_ID_BYTES:
        raise ValueError(f"an NCCL unique id has {UNIQUE_ID_BYTES} bytes, got {len(data)}")
    return tuple(b - 256 if b > 127 else b for b in data)


class _StreamWork:
    """An async NCCL call on the side stream; ``wait()`` orders the current stream after it."""

    __slots__ = ("_event", "_device")

    def __init__(self, event: torch.cuda.Event, device: torch.device):
        self._event, self._device = event, device

    def wait(self) -> None:
        torch.cuda.current_stream(self._device).wait_event(self._event)

    def is_completed(self) -> bool:
        return self._event.query()


class NcclCommunicator(BaseCommunicator):
    adaptor = "nccl"

    def __init__(self, comm: Any, host: TorchCommunicator, device: torch.device, *, check: bool):
        super().__init__(rank=host.rank, world_size=host.world_size, group_name=host.group_name,
                         global_ranks=host.global_ranks, device=device, timeout=host.timeout,
                         check_group=host.pg if check else None)
        from cupy.cuda import nccl

        self._nccl, self._comm, self._host = nccl, comm, host
        self._index = device.index if device.index is not None else torch.cuda.current_device()
        self._side = torch.cuda.Stream(device=device)

    def _stream(self) -> int:
        if _raw_stream is not None:
            return _raw_stream(self._index)
        return torch.cuda.current_stream(self._index).cuda_stream

    def _issue(self, async_op: bool, tensors: tuple[torch.Tensor, ...], call: Any) -> _StreamWork | None:
        if not async_op:
            call(self._stream())
            return None
        self._side.wait_stream(torch.cuda.current_stream(self._index))
        call(self._side.cuda_stream)
        for t in tensors:  # keep the caching allocator from reusing them before the side stream is done
            t.record_stream(self._side)
        event = torch.cuda.Event()
        event.record(self._side)
        return _StreamWork(event, self.device)

    def _all_reduce(self, tensor, op, async_op):
        n, dt, p = tensor.numel(), nccl_dtype(tensor.dtype), tensor.data_ptr()
        if n:
            return self._issue(async_op, (tensor,),
                               lambda s: self._comm.allReduce(p, p, n, dt, NCCL_OPS[op], s))
        return None

    def _all_gather(self, output, input, async_op):
        n, dt = input.numel(), nccl_dtype(input.dtype)
        if n:
            src, dst = input.data_ptr(), output.data_ptr()
            return self._issue(async_op, (output, input), lambda s: self._comm.allGather(src, dst, n, dt, s))
        return None

    def _reduce_scatter(self, output, input, op, async_op):
        n, dt = output.numel(), nccl_dtype(input.dtype)
        if n:
            src, dst = input.data_ptr(), output.data_ptr()
            return self._issue(async_op, (output, input),
                               lambda s: self._comm.reduceScatter(src, dst, n, dt, NCCL_OPS[op], s))
        return None

    def _all_to_all_single(self, output, input, output_splits, input_splits, async_op):
        dt = nccl_dtype(input.dtype)
        row = math.prod(input.shape[1:])  # elements per dim-0 row
        size = input.element_size()
        src, dst = input.data_ptr(), output.data_ptr()

        def call(s: int) -> None:
            # NCCL has no all-to-all-v: one grouped send and receive per peer (NCCL fuses them).
            self._nccl.groupStart()
            try:
                sent = received = 0
                for peer in range(self.world_size):
                    if input_splits[peer]:
                        self._comm.send(src + sent * row * size, input_splits[peer] * row, dt, peer, s)
                    if output_splits[peer]:
                        self._comm.recv(dst + received * row * size, output_splits[peer] * row, dt, peer, s)
                    sent += input_splits[peer]
                    received += output_splits[peer]
            finally:
                self._nccl.groupEnd()

        return self._issue(async_op, (output, input), call)

    def _broadcast(self, tensor, src, async_op):
        n, dt, p = tensor.numel(), nccl_dtype(tensor.dtype), tensor.data_ptr()
        if n:
            return self._issue(async_op, (tensor,), lambda s: self._comm.broadcast(p, p, n, dt, src, s))
        return None

    def _send(self, tensor, dst):
        if tensor.numel():
            self._comm.send(tensor.data_ptr(), tensor.numel(), nccl_dtype(tensor.dtype), dst, self._stream())

    def _recv(self, tensor, src):
        if tensor.numel():
            self._comm.recv(tensor.data_ptr(), tensor.numel(), nccl_dtype(tensor.dtype), src, self._stream())

    def _barrier(self):
        token = torch.ones(1, dtype=torch.float32, device=self.device)
        self._all_reduce(token, "sum", False)
        self.synchronize("barrier")

    def synchronize(self, op: str = "synchronize") -> None:
        """Block until this rank's enqueued NCCL work is done; time out (and abort) past the timeout."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self._index))
        deadline = time.monotonic() + self.timeout
        while not event.query():
            try:
                self._comm.check_async_error()
            except Exception as e:
                raise self.error(op, e) from e
            if time.monotonic() > deadline:
                self._comm.abort()
                raise CollectiveTimeoutError(f"{self.where(op)} timed out after {self.timeout:g} s waiting "
                                             "for NCCL; the communicator was aborted", op=op, rank=self.rank,
                                             group=self.group_name)
            time.sleep(1e-4)

    def _new_group(self, ranks):
        host = new_torch_group(self._host, ranks, backend=self._host.pg_backend, check=False)
        key = f"{_KEY_PREFIX}{next(_group_counter)}"
        if host is None:
            return None
        return NcclCommunicator(_connect(host, key, self._index), host, self.device, check=self.check)

    def close(self) -> None:
        self._comm.destroy()


def _connect(host: TorchCommunicator, key: str, device_index: int) -> Any:
    """Make the NCCL communicator of ``host``'s ranks: rank 0 makes the id, the store carries it."""
    import cupy
    from cupy.cuda import nccl

    store = dist.distributed_c10d._get_default_store()
    if host.rank == 0:
        store.set(key, encode_unique_id(nccl.get_unique_id()))
    uid = store.get(key)
    with cupy.cuda.Device(device_index):
        try:
            return nccl.NcclCommunicator(host.world_size, uid, host.rank)
        except TypeError:  # CuPy before 13 takes the id as a tuple of signed chars (checked before NCCL starts)
            return nccl.NcclCommunicator(host.world_size, decode_unique_id(uid), host.rank)


def create(backend: Any, pg: Any, *, name: str, timeout: float, check: bool,
           **options: Any) -> NcclCommunicator:
    if options:
        raise TypeError(f"the nccl adaptor takes no options, got {sorted(options)}")
    ok, reason = is_available()
    if not ok:
        raise CollectiveError(f"the nccl adaptor is not available: {reason}", op="create")
    if backend.device_type != "cuda":
        raise CollectiveError(f"the nccl adaptor needs a CUDA backend, not '{backend.name}'", op="create")
    host = host_view(pg, name=name, timeout=timeout)
    key = f"{_KEY_PREFIX}{next(_group_counter)}"
    device = backend.device.torch_device
    return NcclCommunicator(_connect(host, key, device.index or 0), host, device, check=check)


class NcclAdaptor(Adaptor):
    """``nccl``: NCCL through CuPy on the tensors' data pointers; NVIDIA GPUs only."""

    name = "nccl"
    device_types = ("cuda",)
    description = "NCCL called through cupy.cuda.nccl on the current stream"

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        return is_available()

    @classmethod
    def create(cls, backend: Any, pg: Any, **kwargs: Any) -> NcclCommunicator:
        return create(backend, pg, **kwargs)
