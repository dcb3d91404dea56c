"""The ``hier`` adaptor: hierarchical collectives for jobs whose ranks sit on different kinds of chips.

FlagCX's scheme. Ranks are grouped by chip kind (the backend name, or a ``kind`` label given at
creation). A reduction runs with the chip's own collective inside each kind group, then between
the kind leaders (each group's lowest rank) through the host over gloo, then is broadcast inside
each group again. All-gather and broadcast follow the same three steps. ``reduce_scatter`` is an
all-reduce followed by taking this rank's chunk (so it moves about twice the bytes of a
native reduce-scatter), and all-to-all and send/recv, whose traffic is point to point anyway, go
host-staged over the whole group. The host-staged steps stream through
`openseek_hal.comm.staging` (chunked, pinned reused buffers, shared memory among ranks of one host);
options ``chunk_bytes`` and ``transport`` as for ``host``. Every call completes before it returns
(``async_op=True`` gives a finished handle).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from .adaptors import Adaptor
from .base import BaseCommunicator
from .host import host_buffer, host_view, to_host
from .rendezvous import process_group_backend
from .staging import make_transport
from .torch_dist import TorchCommunicator, new_torch_group

ENV_KIND = "OPENSEEK_HAL_COMM_KIND"


class HierCommunicator(BaseCommunicator):
    adaptor = "hier"

    def __init__(self, world: TorchCommunicator, device: torch.device, kinds: list[str],
                 backends: dict[str, str], inner: TorchCommunicator, leaders: TorchCommunicator | None, *,
                 check: bool, staging: dict[str, Any] | None = None):
        super().__init__(rank=world.rank, world_size=world.world_size, group_name=world.group_name,
                         global_ranks=world.global_ranks, device=device, timeout=world.timeout,
                         check_group=world.pg if check else None)
        self._world = world  # every rank, on the host over gloo
        self._inner = inner  # this rank's kind group, the chip's own collectives
        self._leaders = leaders  # one rank per kind, on the host over gloo; None on non-leaders
        self.kinds = kinds  # kind label of every rank
        self._backends = backends  # kind label -> torch.distributed backend string
        order = list(dict.fromkeys(kinds))  # kinds by their lowest rank: the leaders' group order
        self._members = [[r for r, k in enumerate(kinds) if k == kind] for kind in order]
        self._kind_index = [order.index(k) for k in kinds]
        self._staging = dict(staging or {})
        # host-staged paths: every rank (all-to-all) and the kind leaders (between kinds); collective setup
        try:
            self._world_stage = make_transport(world, device, **self._staging)
            self._leader_stage = make_transport(leaders, device, **self._staging) if leaders is not None else None
        except ValueError as e:
            raise self._bad("create", str(e)) from None

    @property
    def _multi_kind(self) -> bool:
        return len(self._members) > 1

    def _all_reduce(self, tensor, op, async_op):
        partial = "sum" if op == "avg" else op  # average once, at the end, over every rank
        if self._inner.world_size > 1:
            self._inner._all_reduce(tensor, partial, False)
        if self._leader_stage is not None:
            self._leader_stage.all_reduce(tensor, partial)
        if self._multi_kind and self._inner.world_size > 1:
            self._inner._broadcast(tensor, 0, False)
        if op == "avg":
            tensor.div_(self.world_size)

    def _all_gather(self, output, input, async_op):
        n_in = input.numel()
        flat_out = output.view(-1)
        if not self._multi_kind:
            self._inner._all_gather(flat_out, input.view(-1), False)
            return
        mine = torch.empty(self._inner.world_size * n_in, dtype=input.dtype, device=input.device)
        self._inner._all_gather(mine, input.view(-1), False)
        if self._leader_stage is not None:
            widest = max(len(m) for m in self._members)
            padded = torch.zeros(widest * n_in, dtype=input.dtype, device=input.device)
            padded[:mine.numel()] = mine
            every = torch.empty(len(self._members) * widest * n_in, dtype=input.dtype, device=input.device)
            self._leader_stage.all_gather(every, padded)
            every = every.view(len(self._members), widest, n_in)
            in_rank_order = torch.empty(self.world_size, n_in, dtype=input.dtype, device=input.device)
            for k, members in enumerate(self._members):
                in_rank_order[members] = every[k, :len(members)]
            flat_out.copy_(in_rank_order.view(-1))
        if self._inner.world_size > 1:
            self._inner._broadcast(flat_out, 0, False)

    def _reduce_scatter(self, output, input, op, async_op):
        reduced = input.clone()
        self._all_reduce(reduced, op, False)
        output.view(-1).copy_(reduced.view(self.world_size, -1)[self.rank])

    def _all_to_all_single(self, output, input, output_splits, input_splits, async_op):
        self._world_stage.all_to_all(output, input, output_splits, input_splits)

    def _broadcast(self, tensor, src, async_op):
        source_kind = self._kind_index[src]
        mine = self._kind_index[self.rank] == source_kind
        if mine and self._inner.world_size > 1:
            self._inner._broadcast(tensor, self._members[source_kind].index(src), False)
        if self._leader_stage is not None:
            self._leader_stage.broadcast(tensor, source_kind)
        if not mine and self._inner.world_size > 1:
            self._inner._broadcast(tensor, 0, False)

    def _send(self, tensor, dst):
        self._world._send(to_host(tensor), dst)

    def _recv(self, tensor, src):
        host = host_buffer(tensor)
        self._world._recv(host, src)
        if host is not tensor:
            tensor.copy_(host)

    def _barrier(self):
        self._world._barrier()

    def _new_group(self, ranks):
        world = new_torch_group(self._world, ranks, backend=self._world.pg_backend, check=False)
        return build(self._world, ranks, world, self.device, [self.kinds[r] for r in ranks],
                     self._backends, check=self.check, staging=self._staging)


def build(parent: TorchCommunicator, ranks: list[int], world: TorchCommunicator | None, device: torch.device,
          kinds: list[str], backends: dict[str, str], *, check: bool,
          staging: dict[str, Any] | None = None) -> HierCommunicator | None:
    """Create the kind groups and the leaders' group over ``ranks`` of ``parent``.

    Every process of the job calls this with the same arguments but ``world`` (None outside
    ``ranks``), so that the groups are created in the same order everywhere.
    """
    order = list(dict.fromkeys(kinds))
    inner = None
    for kind in order:
        members = [ranks[i] for i, k in enumerate(kinds) if k == kind]
        group = new_torch_group(parent, members, backend=backends[kind], check=False, device=device,
                                name=f"{parent.group_name}/{kind}")
        inner = group if group is not None else inner
    leaders = [ranks[kinds.index(kind)] for kind in order]
    leader_group = None
    if len(order) > 1:
        leader_group = new_torch_group(parent, leaders, backend=parent.pg_backend, check=False,
                                       device=torch.device("cpu"), name=f"{parent.group_name}/leaders")
    if world is None:
        return None
    return HierCommunicator(world, device, kinds, backends, inner, leader_group, check=check, staging=staging)


def create(backend: Any, pg: Any, *, name: str, timeout: float, check: bool, kind: str | None = None,
           chunk_bytes: int | None = None, transport: str | None = None, **options: Any) -> HierCommunicator:
    if options:
        raise TypeError(f"the hier adaptor takes only 'kind', 'chunk_bytes' and 'transport', got {sorted(options)}")
    kind = kind or os.environ.get(ENV_KIND) or backend.name
    world = host_view(pg, name=name, timeout=timeout)
    labels: list[Any] = [None] * world.world_size
    own = (kind, process_group_backend(backend.device_type, backend.dist_backend))
    dist.all_gather_object(labels, own, group=world.pg)
    backends: dict[str, str] = {}
    for label, pg_backend in labels:
        if backends.setdefault(label, pg_backend) != pg_backend:
            raise ValueError(f"ranks of kind '{label}' use different collective backends "
                             f"({backends[label]} and {pg_backend}); give each chip kind its own label")
    kinds = [label for label, _ in labels]
    everyone = list(range(world.world_size))
    return build(world, everyone, world, backend.device.torch_device, kinds, backends, check=check,
                 staging={"chunk_bytes": chunk_bytes, "transport": transport})


class HierAdaptor(Adaptor):
    """``hier``: the chip's own collective inside a kind group, the host between kinds."""

    name = "hier"
    device_types = ()
    spans_kinds = True
    description = "chip kinds grouped: native inside a kind, host-staged between kind leaders"

    @classmethod
    def create(cls, backend: Any, pg: Any, **kwargs: Any) -> HierCommunicator:
        return create(backend, pg, **kwargs)
