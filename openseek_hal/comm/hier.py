"""The ``hier`` adaptor: hierarchical collectives for jobs whose ranks sit on different kinds of chips.

FlagCX's scheme. Ranks are grouped by chip kind (the backend name, or a ``kind`` label given at
creation); kinds are ordered by their lowest rank (kind 0, 1, ... m-1), a kind k has n_k ranks
(sizes may differ). Two algorithms per collective, chosen per call by the communicator's `Policy`
(`openseek_hal.comm.tune`: a measured table, ``$OPENSEEK_HAL_COMM_ALGO``, else ``parallel``, or
``leader``/``staged`` for all_reduce, reduce_scatter and all_to_all_single where a kind of two or more
ranks runs gloo inside):

- ``parallel`` (parallel shards): the chip's own collective inside each kind moves the bulk, and the
  traffic between kinds is split so that every rank carries about 1/n_k of it, pairwise and at
  the same time, through the host transport (`openseek_hal.comm.staging`, ``exchange``):

  * all_reduce: native reduce-scatter inside each kind (kind k cuts the tensor into n_k shards of
    ceil(c/n_k)); the rank holding shard j of kind k swaps with each rank of another kind whose
    shard overlaps its own (the intersection of two intervals: one contiguous piece) the kind-partial
    sums of that piece; each holder adds the m kind-partials of its shard in kind order on the host;
    native all-gather inside each kind.
  * reduce_scatter: kind k lays the input out as, per member i, [member i's output chunk | share i
    of the other kinds' chunks] and runs a native reduce-scatter; the shares' pieces go to the ranks
    whose chunks they are; each rank adds the m kind-partials of its chunk in kind order.
  * all_gather: each rank sends its input, cut to the receiving ranks' shares, to the ranks of every
    other kind (rank j of kind k receives share j of the concatenated inputs of the ranks outside
    k), while a native all-gather inside the kind runs; then a native all-gather of the shares.
  * all_to_all_single: the pieces for ranks of the same kind through the native all-to-all, the
    pieces for other kinds host-staged pairwise at the same time.

- ``leader`` (``staged`` for all_to_all_single): the earlier scheme. A reduction runs natively inside
  each kind, then between the kind leaders (each kind's lowest rank) through the host, then is
  broadcast inside each kind; all_gather alike; reduce_scatter is such an all-reduce plus taking this
  rank's chunk; all-to-all goes host-staged over the whole group.

Broadcast follows the leader scheme; send/recv go over the host between the two ranks.
Sums between kinds are taken on the host in kind order (kind 0's partial + kind 1's + ...), so
every rank gets the same bits whichever chip it is on; inside a kind the native library's order
applies. Every call completes before it returns (``async_op=True`` gives a finished handle).
Options ``chunk_bytes`` and ``transport`` as for ``host``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.distributed as dist

from .adaptors import Adaptor
from .base import BaseCommunicator
from .host import host_buffer, host_view, to_host
from .rendezvous import process_group_backend
from .staging import _combine, _itemsize, make_transport, transport_options
from .torch_dist import TorchCommunicator, new_torch_group
from .tune import defaults, shared_policy, topology

ENV_KIND = "OPENSEEK_HAL_COMM_KIND"
_CPU = torch.device("cpu")


def shard(count: int, parts: int, j: int) -> tuple[int, int]:
    """[lo, hi) of share j when ``count`` elements are cut into ``parts`` shares of ceil(count/parts)."""
    size = -(-count // parts) if parts else 0
    return min(j * size, count), min((j + 1) * size, count)


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if hi > lo else None


def _runs(ranks: list[int]) -> list[tuple[int, int, int]]:
    """(position, first rank, length) of each run of consecutive ranks in ``ranks``."""
    out: list[tuple[int, int, int]] = []
    for pos, r in enumerate(ranks):
        if out and out[-1][1] + out[-1][2] == r:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((pos, r, 1))
    return out


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
        self._kind = self._kind_index[self.rank]
        self._mine = self._members[self._kind]  # the ranks of this rank's kind
        self._j = self._mine.index(self.rank)  # this rank's place in its kind
        n = self.world_size
        # per kind: the ranks outside it in rank order, and where each of them sits in that list
        self._foreign = [[r for r in range(n) if self._kind_index[r] != k] for k in range(len(order))]
        self._foreign_pos = [{r: p for p, r in enumerate(f)} for f in self._foreign]
        self._staging = dict(staging or {})
        try:  # rank 0's table and $OPENSEEK_HAL_COMM_ALGO, on every rank (a collective over ``world``)
            self.policy = shared_policy(world, topology("hier", kinds),
                                        fixed_chunk=self._staging.get("chunk_bytes") is not None)
            self.policy.default = defaults(kinds, backends)  # the same on every rank: every rank's labels
            options = transport_options(self._staging, self.policy)
        except ValueError as e:
            raise self._bad("create", str(e)) from None
        self.last_algorithm: dict[str, str] = {}  # collective -> the algorithm its last call ran
        self.cross_kind_bytes = [0, 0]  # bytes this rank sent to / received from other kinds via the host
        # host-staged paths: every rank (exchanges between kinds) and the kind leaders; collective setup
        try:
            self._world_stage = make_transport(world, device, **options)
            self._leader_stage = make_transport(leaders, device, **options) if leaders is not None else None
        except ValueError as e:
            raise self._bad("create", str(e)) from None

    @property
    def _multi_kind(self) -> bool:
        return len(self._members) > 1

    def _choose(self, op: str, nbytes: int) -> str:
        """The algorithm of this call (the same on every rank: rank 0's policy, the same sizes)."""
        if not self._multi_kind:
            algo = "native"
        else:
            algo = self.policy.algorithm(op, nbytes)
            chunk = self.policy.chunk_bytes(op, nbytes)
            self._world_stage.use_chunk(chunk)
            if self._leader_stage is not None:
                self._leader_stage.use_chunk(chunk)
        self.last_algorithm[op] = algo
        return algo

    def _exchange(self, send: list[list[torch.Tensor]], recv: list[list[torch.Tensor]], dtype: torch.dtype) -> None:
        """Every rank's pieces for the ranks of other kinds, pairwise through the host transport."""
        size = _itemsize(dtype)
        self.cross_kind_bytes[0] += sum(t.numel() for views in send for t in views) * size
        self.cross_kind_bytes[1] += sum(t.numel() for views in recv for t in views) * size
        self._world_stage.exchange(send, recv)

    @staticmethod
    def _host_empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
        # filled by the CPU from the transport's host memory and summed there: no DMA, so not pinned
        return torch.empty(numel, dtype=dtype, device=_CPU)

    def _kind_order_sum(self, mine: torch.Tensor, theirs: dict[int, torch.Tensor], op: str) -> None:
        """``mine`` (this kind's partial, on the device) := the m kind-partials combined in kind order, on
        the host: every rank holding the same piece computes the same bits."""
        own = to_host(mine)
        parts = [own if k == self._kind else theirs[k] for k in range(len(self._members))]
        acc = parts[0]
        for p in parts[1:]:
            _combine(acc, p, op)
        if acc is not mine:
            mine.copy_(acc)

    # -- all_reduce ---------------------------------------------------------------------------------
    def _all_reduce(self, tensor, op, async_op):
        algo = self._choose("all_reduce", tensor.numel() * tensor.element_size())
        partial = "sum" if op == "avg" else op  # average once, at the end, over every rank
        if algo == "native":
            if self._inner.world_size > 1:
                self._inner._all_reduce(tensor, op, False)
            return
        if algo == "parallel":
            self._all_reduce_parallel(tensor.view(-1), partial)
        else:
            self._all_reduce_leader(tensor, partial)
        if op == "avg":
            tensor.div_(self.world_size)

    def _all_reduce_leader(self, tensor: torch.Tensor, partial: str) -> None:
        if self._inner.world_size > 1:
            self._inner._all_reduce(tensor, partial, False)
        if self._leader_stage is not None:
            size = tensor.numel() * tensor.element_size()
            self.cross_kind_bytes[0] += size
            self.cross_kind_bytes[1] += (len(self._members) - 1) * size
            self._leader_stage.all_reduce(tensor, partial)
        if self._inner.world_size > 1:
            self._inner._broadcast(tensor, 0, False)

    def _all_reduce_parallel(self, flat: torch.Tensor, partial: str) -> None:
        c, nk, j = flat.numel(), len(self._mine), self._j
        if c == 0:
            return
        s = -(-c // nk)
        if nk > 1:  # native reduce-scatter inside the kind: this rank's shard of the kind's partial sum
            if c == nk * s:  # no padding: the tensor itself is the reduce-scatter input and all-gather output
                padded = flat
            else:
                padded = torch.zeros(nk * s, dtype=flat.dtype, device=flat.device)
                padded[:c].copy_(flat)
            part = torch.empty(s, dtype=flat.dtype, device=flat.device)
            self._inner._reduce_scatter(part, padded, partial, False)
        else:
            part = flat
        lo, hi = shard(c, nk, j)
        mine = part[:hi - lo]
        send: list[list[torch.Tensor]] = [[] for _ in range(self.world_size)]
        recv: list[list[torch.Tensor]] = [[] for _ in range(self.world_size)]
        theirs: dict[int, torch.Tensor] = {}
        for k, members in enumerate(self._members):
            if k == self._kind:
                continue
            theirs[k] = buf = self._host_empty(hi - lo, flat.dtype)
            for i, d in enumerate(members):  # the holders in kind k of the pieces of this rank's shard
                piece = _overlap((lo, hi), shard(c, len(members), i))
                if piece:
                    send[d].append(mine[piece[0] - lo:piece[1] - lo])
                    recv[d].append(buf[piece[0] - lo:piece[1] - lo])
        self._exchange(send, recv, flat.dtype)
        self._kind_order_sum(mine, theirs, partial)
        if nk > 1:  # native all-gather inside the kind
            self._inner._all_gather(padded, part, False)
            if padded is not flat:
                flat.copy_(padded[:c])

    # -- all_gather ---------------------------------------------------------------------------------
    def _all_gather(self, output, input, async_op):
        algo = self._choose("all_gather", output.numel() * output.element_size())
        if algo == "native":
            self._inner._all_gather(output.view(-1), input.view(-1), False)
        elif algo == "parallel":
            self._all_gather_parallel(output.view(-1), input.view(-1))
        else:
            self._all_gather_leader(output, input)

    def _all_gather_leader(self, output: torch.Tensor, input: torch.Tensor) -> None:
        n_in = input.numel()
        flat_out = output.view(-1)
        mine = torch.empty(self._inner.world_size * n_in, dtype=input.dtype, device=input.device)
        self._inner._all_gather(mine, input.view(-1), False)
        if self._leader_stage is not None:
            widest = max(len(m) for m in self._members)
            padded = torch.zeros(widest * n_in, dtype=input.dtype, device=input.device)
            padded[:mine.numel()] = mine
            every = torch.empty(len(self._members) * widest * n_in, dtype=input.dtype, device=input.device)
            self.cross_kind_bytes[0] += padded.numel() * padded.element_size()
            self.cross_kind_bytes[1] += (len(self._members) - 1) * padded.numel() * padded.element_size()
            self._leader_stage.all_gather(every, padded)
            every = every.view(len(self._members), widest, n_in)
            in_rank_order = torch.empty(self.world_size, n_in, dtype=input.dtype, device=input.device)
            for k, members in enumerate(self._members):
                in_rank_order[members] = every[k, :len(members)]
            flat_out.copy_(in_rank_order.view(-1))
        if self._inner.world_size > 1:
            self._inner._broadcast(flat_out, 0, False)

    def _all_gather_parallel(self, out: torch.Tensor, x: torch.Tensor) -> None:
        c, nk, j = x.numel(), len(self._mine), self._j
        if c == 0:
            return
        mine, foreign = self._mine, self._foreign[self._kind]
        contiguous = mine == list(range(mine[0], mine[0] + nk))
        own = out[mine[0] * c:(mine[-1] + 1) * c] if contiguous else torch.empty(nk * c, dtype=x.dtype,
                                                                                     device=x.device)
        work = None
        if nk > 1:  # this kind's inputs, natively, while the other kinds' shares cross the host
            work = self._inner._all_gather(own, x, True)
        else:
            own.copy_(x)
        total = len(foreign) * c
        s = -(-total // nk)
        share = torch.zeros(s, dtype=x.dtype, device=x.device)
        lo, hi = shard(total, nk, j)
        send: list[list[torch.Tensor]] = [[] for _ in range(self.world_size)]
        recv: list[list[torch.Tensor]] = [[] for _ in range(self.world_size)]
        for d in range(self.world_size):
            k = self._kind_index[d]
            if k == self._kind:
                continue
            # to d: the part of this rank's input inside d's share of kind k's foreign inputs
            p = self._foreign_pos[k][self.rank]
            members = self._members[k]
            their_total = len(self._foreign[k]) * c
            piece = _overlap((p * c, (p + 1) * c), shard(their_total, len(members), members.index(d)))
            if piece:
                send[d].append(x[piece[0] - p * c:piece[1] - p * c])
            # from d: the part of d's input inside this rank's share
            q = self._foreign_pos[self._kind][d]
            piece = _overlap((q * c, (q + 1) * c), (lo, hi))
            if piece:
                recv[d].append(share[piece[0] - lo:piece[1] - lo])
        self._exchange(send, recv, x.dtype)
        if work is not None:
            work.wait()
        if nk > 1:
            every = torch.empty(nk * s, dtype=x.dtype, device=x.device)
            self._inner._all_gather(every, share, False)
        else:
            every = share
        for pos, r, length in _runs(foreign):
            out[r * c:(r + length) * c].copy_(every[pos * c:(pos + length) * c])
        if not contiguous:
            for pos, r, length in _runs(mine):
                out[r * c:(r + length) * c].copy_(own[pos * c:(pos + length) * c])

    # -- reduce_scatter -----------------------------------------------------------------------------
    def _reduce_scatter(self, output, input, op, async_op):
        algo = self._choose("reduce_scatter", input.numel() * input.element_size())
        if algo == "native":
            self._inner._reduce_scatter(output, input, op, False)
            return
        if algo == "leader":
            reduced = input.clone()
            self._all_reduce_leader(reduced, "sum" if op == "avg" else op)
            output.view(-1).copy_(reduced.view(self.world_size, -1)[self.rank])
        else:
            self._reduce_scatter_parallel(output.view(-1), input.view(-1), "sum" if op == "avg" else op)
        if op == "avg":
            output.div_(self.world_size)

    def _reduce_scatter_parallel(self, out: torch.Tensor, x: torch.Tensor, partial: str) -> None:
        c, nk, j, n = out.numel(), len(self._mine), self._j, self.world_size
        if c == 0:
            return
        mine, foreign = self._mine, self._foreign[self._kind]
        total = len(foreign) * c
        s = -(-total // nk)
        rows = x.view(n, c)
        # per member i: [member i's output chunk | share i of the other kinds' chunks], reduced natively
        layout = torch.zeros(nk, c + s, dtype=x.dtype, device=x.device)
        layout[:, :c] = rows[mine]
        flat_foreign = rows[foreign].view(-1)
        for i in range(nk):
            a, b = shard(total, nk, i)
            layout[i, c:c + b - a] = flat_foreign[a:b]
        if nk > 1:
            part = torch.empty(c + s, dtype=x.dtype, device=x.device)
            self._inner._reduce_scatter(part, layout.view(-1), partial, False)
        else:
            part = layout.view(-1)
        lo, hi = shard(total, nk, j)
        send: list[list[torch.Tensor]] = [[] for _ in range(n)]
        recv: list[list[torch.Tensor]] = [[] for _ in range(n)]
        theirs = {k: self._host_empty(c, x.dtype) for k in range(len(self._members)) if k != self._kind}
        for d in range(n):
            k = self._kind_index[d]
            if k == self._kind:
                continue
            # to d: the part of d's chunk inside this rank's share
            q = self._foreign_pos[self._kind][d]
            piece = _overlap((q * c, (q + 1) * c), (lo, hi))
            if piece:
                send[d].append(part[c + piece[0] - lo:c + piece[1] - lo])
            # from d: the part of this rank's chunk inside d's share of kind k's layout
            p = self._foreign_pos[k][self.rank]
            members = self._members[k]
            piece = _overlap((p * c, (p + 1) * c), shard(len(self._foreign[k]) * c, len(members), members.index(d)))
            if piece:
                recv[d].append(theirs[k][piece[0] - p * c:piece[1] - p * c])
        self._exchange(send, recv, x.dtype)
        result = part[:c]
        self._kind_order_sum(result, theirs, partial)
        out.copy_(result)

    # -- all_to_all_single --------------------------------------------------------------------------
    def _all_to_all_single(self, output, input, output_splits, input_splits, async_op):
        algo = self._choose("all_to_all_single", max(input.numel(), output.numel()) * input.element_size())
        if algo == "native":
            self._inner._all_to_all_single(output, input, output_splits, input_splits, False)
        elif algo == "parallel":
            self._all_to_all_parallel(output, input, output_splits, input_splits)
        else:
            size = input.element_size()
            row = math.prod(input.shape[1:]) if input.dim() > 1 else 1
            foreign = [r for r in range(self.world_size) if self._kind_index[r] != self._kind]
            self.cross_kind_bytes[0] += sum(input_splits[r] for r in foreign) * row * size
            self.cross_kind_bytes[1] += sum(output_splits[r] for r in foreign) * row * size
            self._world_stage.all_to_all(output, input, output_splits, input_splits)

    def _all_to_all_parallel(self, output: torch.Tensor, input: torch.Tensor, output_splits: list[int],
                             input_splits: list[int]) -> None:
        n, mine = self.world_size, self._mine
        row = math.prod(input.shape[1:]) if input.dim() > 1 else 1
        src, dst = input.view(-1), output.view(-1)
        in_at, out_at = [0], [0]
        for a, b in zip(input_splits, output_splits):
            in_at.append(in_at[-1] + a * row)
            out_at.append(out_at[-1] + b * row)
        send = [[src[in_at[d]:in_at[d + 1]]] if self._kind_index[d] != self._kind else [] for d in range(n)]
        recv = [[dst[out_at[q]:out_at[q + 1]]] if self._kind_index[q] != self._kind else [] for q in range(n)]
        work, unpack = None, None
        if len(mine) > 1:  # the pieces within the kind, natively, while the others cross the host
            ins = [input_splits[q] * row for q in mine]
            outs = [output_splits[q] * row for q in mine]
            if mine == list(range(mine[0], mine[0] + len(mine))):
                inner_in = src[in_at[mine[0]]:in_at[mine[-1] + 1]]
                inner_out = dst[out_at[mine[0]]:out_at[mine[-1] + 1]]
            else:
                inner_in = torch.cat([src[in_at[q]:in_at[q + 1]] for q in mine])
                inner_out = torch.empty(sum(outs), dtype=dst.dtype, device=dst.device)
                unpack = inner_out
            work = self._inner._all_to_all_single(inner_out, inner_in, outs, ins, True)
        else:
            me = self.rank
            dst[out_at[me]:out_at[me + 1]].copy_(src[in_at[me]:in_at[me + 1]])
        self._exchange(send, recv, src.dtype)
        if work is not None:
            work.wait()
        if unpack is not None:
            at = 0
            for q in mine:
                dst[out_at[q]:out_at[q + 1]].copy_(unpack[at:at + out_at[q + 1] - out_at[q]])
                at += out_at[q + 1] - out_at[q]

    # -- broadcast, point to point, barrier ---------------------------------------------------------
    def _broadcast(self, tensor, src, async_op):
        if not self._multi_kind:
            self._inner._broadcast(tensor, self._mine.index(src), False)
            return
        source_kind = self._kind_index[src]
        mine = self._kind_index[self.rank] == source_kind
        if mine and self._inner.world_size > 1:
            self._inner._broadcast(tensor, self._members[source_kind].index(src), False)
        if self._leader_stage is not None:
            self._leader_stage.use_chunk(None)
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
    """``hier``: the chip's own collective inside a kind, the host between kinds (parallel shards or leaders)."""

    name = "hier"
    device_types = ()
    spans_kinds = True
    description = "chip kinds grouped: native inside a kind, host-staged shards between kinds"

    @classmethod
    def create(cls, backend: Any, pg: Any, **kwargs: Any) -> HierCommunicator:
        return create(backend, pg, **kwargs)
