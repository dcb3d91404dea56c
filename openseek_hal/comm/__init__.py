"""Collectives: the `Communicator` contract that the trainer's data- and expert-parallel traffic uses.

One contract, pluggable adaptors (FlagCX's idea: one collective API over every chip, including
jobs that mix chips). Adaptors register through the ``openseek_hal.comm_adaptors`` entry-point
group (`openseek_hal.comm.adaptors`); the in-tree ones:

- ``torch``: a torch.distributed process group (nccl on NVIDIA GPUs, gloo on the CPU, the chip's
  own backend elsewhere);
- ``nccl``: NCCL called directly through ``cupy.cuda.nccl`` on torch tensors (lower latency than
  torch.distributed's NCCL path); needs CuPy;
- ``host``: device -> host, gloo, host -> device; works for any chip;
- ``hier``: ranks grouped by chip kind, the native collective inside a kind, the traffic between
  kinds cut into shards that every rank moves at once through the host (or, chosen per call by
  `openseek_hal.comm.tune`, through the kind leaders).

`create` builds one inside an initialized process (torchrun's ``env://`` or `launch`);
`launch` starts local ranks for tests, conformance and benchmarks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from .errors import CollectiveError, CollectiveTimeoutError

if TYPE_CHECKING:
    from ..backend import Backend


@runtime_checkable
class Work(Protocol):
    """Handle of an asynchronous collective; ``wait()`` raises what the call would have raised."""

    def wait(self) -> None: ...


@runtime_checkable
class Communicator(Protocol):
    """A group of ranks and the collectives among them; every collective may be async (``async_op=True``).

    Tensors are contiguous and on the communicator's device. ``all_gather`` and ``reduce_scatter``
    concatenate along dim 0 (``output.numel() == world_size * input.numel()`` and the reverse);
    ``all_to_all_single`` splits dim 0 by the given (possibly uneven) sizes. Reduce ops: "sum",
    "avg", "max", "min". Ranks (``src``, ``dst``, ``new_group``'s) are ranks of this group.
    Errors are `CollectiveError` / `CollectiveTimeoutError` naming the collective, rank and group.
    """

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", async_op: bool = False) -> Work | None: ...

    def all_gather(self, output: torch.Tensor, input: torch.Tensor,
                   async_op: bool = False) -> Work | None: ...

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, op: str = "sum",
                       async_op: bool = False) -> Work | None: ...

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor,
                          output_split_sizes: list[int] | None = None,
                          input_split_sizes: list[int] | None = None,
                          async_op: bool = False) -> Work | None: ...

    def broadcast(self, tensor: torch.Tensor, src: int, async_op: bool = False) -> Work | None: ...

    def send(self, tensor: torch.Tensor, dst: int) -> None: ...

    def recv(self, tensor: torch.Tensor, src: int) -> None: ...

    def barrier(self) -> None: ...

    def new_group(self, ranks: list[int]) -> Communicator | None: ...


def adaptor_available(adaptor: str, device_type: str | None = None) -> tuple[bool, str]:
    """(True, "") when ``adaptor`` can run in this process's environment (and serves ``device_type``
    when given), else (False, why)."""
    from .adaptors import UnknownAdaptorError, availability, get_adaptor

    try:
        cls = get_adaptor(adaptor)
    except UnknownAdaptorError as e:
        return False, str(e)
    ok, reason = availability(cls)
    if ok and device_type is not None and not cls.serves(device_type):
        return False, (f"it serves device types {', '.join(cls.device_types)}, not '{device_type}'")
    return ok, reason


def default_adaptor(backend: Backend | str) -> str:
    """The adaptor a job on ``backend`` uses when none is named: the backend's ``comm_adaptor``."""
    from ..backend import get_backend

    be = get_backend(backend) if isinstance(backend, str) else backend
    return getattr(be, "comm_adaptor", None) or "torch"


def create(adaptor: str | None, backend: Backend | str, *, group: Any | None = None, timeout: float | None = None,
           check: bool | None = None, **options: Any) -> Communicator:
    """A communicator of ``adaptor`` on ``backend``'s device, over ``group`` (default: every rank).

    ``adaptor`` None (or "") takes the backend's own (``Backend.comm_adaptor``, "torch" unless the
    backend declares another). Adaptors are plugins (`openseek_hal.comm.adaptors`). Call it on every
    rank. Starts torch.distributed from ``env://`` (torchrun) with the backend's ``dist_backend`` if
    nothing has yet. ``check`` turns on the cross-rank consistency check (default:
    ``$OPENSEEK_HAL_COMM_CHECK``). ``options`` go to the adaptor (``hier``: ``kind``, the chip-kind
    label of this rank; ``host``/``hier``: ``chunk_bytes``, ``transport``).
    """
    import torch.distributed as dist

    from ..backend import get_backend
    from .adaptors import availability, get_adaptor
    from .base import check_default
    from .rendezvous import init_distributed, world_timeout

    be = get_backend(backend) if isinstance(backend, str) else backend
    adaptor = adaptor or default_adaptor(be)
    cls = get_adaptor(adaptor)
    ok, reason = availability(cls)
    if not ok:
        raise CollectiveError(f"adaptor '{adaptor}' is not available: {reason}", op="create")
    if not cls.serves(be.device_type):
        raise CollectiveError(f"adaptor '{adaptor}' serves device types {', '.join(cls.device_types)}, not "
                              f"'{be.device_type}' (backend '{be.name}')", op="create")
    if not dist.is_initialized():
        init_distributed(be.device_type, be.dist_backend, timeout=timeout or world_timeout())
    be.device.set_current()
    pg = group if group is not None else dist.group.WORLD
    name = "world" if group is None else f"group{dist.get_process_group_ranks(pg)}"
    return cls.create(be, pg, name=name, timeout=timeout if timeout is not None else world_timeout(),
                      check=check_default() if check is None else check, **options)


def shutdown() -> None:
    """Wait for every rank, then tear torch.distributed down; call it at the end of a job."""
    from .rendezvous import shutdown as _shutdown

    _shutdown()


def launch(fn: Any, world_size: int, *, backend: str = "cpu", adaptor: str | None = None, timeout: float = 60.0,
           args: tuple = (), **kwargs: Any) -> list:
    """Run ``fn(comm, *args)`` on ``world_size`` local ranks; see `openseek_hal.comm.launcher.launch`."""
    from .launcher import launch as _launch

    return _launch(fn, world_size, backend=backend, adaptor=adaptor, timeout=timeout, args=args, **kwargs)


def adaptor_names() -> list[str]:
    """Every installed adaptor (in-tree first), available here or not; see `adaptor_available`."""
    from .adaptors import adaptor_names as _names

    return _names()


__all__ = ["CollectiveError", "CollectiveTimeoutError", "Communicator", "Work", "adaptor_available",
           "adaptor_names", "create", "default_adaptor", "launch", "shutdown"]
