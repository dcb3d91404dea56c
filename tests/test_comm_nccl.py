"""The CuPy-NCCL adaptor's pieces that need no GPU: availability, dtype/op codes, unique-id transport."""

from __future__ import annotations

import ctypes
import sys
import types

import pytest
import torch

from openseek_hal.comm import CollectiveError, adaptor_available, create, nccl
from openseek_hal.errors import UserError


def test_unavailable_without_cupy_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError, with or without CuPy
    ok, reason = adaptor_available("nccl")
    assert not ok and "CuPy" in reason and "cupy-cuda" in reason
    with pytest.raises(CollectiveError, match="adaptor 'nccl' is not available: CuPy"):
        create("nccl", "cpu")


def test_launch_refuses_an_unavailable_adaptor(monkeypatch):
    from openseek_hal.comm import launch

    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(UserError, match="adaptor 'nccl' is not available"):
        launch(print, 2, adaptor="nccl")


def test_importing_the_adaptor_does_not_import_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    import importlib

    importlib.reload(nccl)  # would raise if the module imported CuPy at import time


def test_dtype_and_reduce_op_codes_match_nccl_h():
    # ncclDataType_t / ncclRedOp_t from nccl.h
    assert nccl.nccl_dtype(torch.float32) == 7 and nccl.nccl_dtype(torch.bfloat16) == 9
    assert nccl.nccl_dtype(torch.float16) == 6 and nccl.nccl_dtype(torch.int64) == 4
    assert nccl.nccl_dtype(torch.uint8) == 1 and nccl.nccl_dtype(torch.float8_e4m3fn) == 10
    assert nccl.NCCL_OPS == {"sum": 0, "max": 2, "min": 3, "avg": 4}
    with pytest.raises(CollectiveError, match="no data type for torch.complex64"):
        nccl.nccl_dtype(torch.complex64)


def test_unique_id_survives_the_store_round_trip():
    uid = tuple(((i * 37) % 256) - 128 for i in range(nccl.UNIQUE_ID_BYTES))  # CuPy: signed chars
    data = nccl.encode_unique_id(uid)
    assert isinstance(data, bytes) and len(data) == 128
    assert nccl.decode_unique_id(data) == uid
    with pytest.raises(ValueError):
        nccl.encode_unique_id(uid[:5])


# -- the adaptor's NCCL calls against an in-process fake of cupy.cuda.nccl (no GPU here) -----------

_FAKE_DTYPES = {v: k for k, v in nccl.NCCL_DTYPES.items()}


class _Fabric:
    """Two (or more) fake NCCL ranks in one process: a call completes when every rank has made it."""

    def __init__(self, world_size):
        self.world_size, self.pending, self.group = world_size, {}, None

    @staticmethod
    def read(ptr, count, dt):
        dtype = _FAKE_DTYPES[dt]
        size = count * torch.empty((), dtype=dtype).element_size()
        return torch.frombuffer(bytearray(ctypes.string_at(ptr, size)), dtype=dtype).clone() if count else \
            torch.empty(0, dtype=dtype)

    @staticmethod
    def write(ptr, t):
        ctypes.memmove(ptr, t.data_ptr(), t.numel() * t.element_size())

    def call(self, comm, kind, args):
        seq = comm.calls
        comm.calls += 1
        calls = self.pending.setdefault(seq, {})
        calls[comm.rank] = (kind, args)
        if len(calls) == self.world_size:
            kinds = {k for k, _ in calls.values()}
            assert len(kinds) == 1, f"ranks disagree: {calls}"
            getattr(self, "_" + kinds.pop())({r: a for r, (_, a) in calls.items()})
            del self.pending[seq]

    def _reduce(self, tensors, op):
        stack = torch.stack([t.double() for t in tensors])
        reduced = {0: stack.sum(0), 2: stack.amax(0), 3: stack.amin(0), 4: stack.mean(0)}[op]
        return reduced.to(tensors[0].dtype)

    def _all_reduce(self, args):
        out = self._reduce([self.read(a[0], a[2], a[3]) for a in args.values()], args[0][4])
        for a in args.values():
            self.write(a[1], out)

    def _all_gather(self, args):
        out = torch.cat([self.read(args[r][0], args[r][2], args[r][3]) for r in sorted(args)])
        for a in args.values():
            self.write(a[1], out)

    def _reduce_scatter(self, args):
        n = self.world_size
        out = self._reduce([self.read(a[0], a[2] * n, a[3]) for a in args.values()], args[0][4])
        for r, a in args.items():
            self.write(a[1], out.view(n, -1)[r])

    def _broadcast(self, args):
        root = args[0][4]
        out = self.read(args[root][0], args[root][2], args[root][3])
        for a in args.values():
            self.write(a[1], out)

    def _group(self, args):
        for dst, ops in args.items():
            for kind, ptr, count, dt, src in ops:
                if kind != "recv":
                    continue
                match = next(o for o in args[src] if o[0] == "send" and o[4] == dst)
                args[src].remove(match)
                assert match[2] == count, f"rank {src} sends {match[2]} to {dst}, which receives {count}"
                self.write(ptr, self.read(match[1], count, dt))


class _FakeComm:
    def __init__(self, fabric, rank):
        self.fabric, self.rank, self.calls = fabric, rank, 0

    def allReduce(self, s, r, count, dt, op, stream):
        self.fabric.call(self, "all_reduce", (s, r, count, dt, op))

    def allGather(self, s, r, count, dt, stream):
        self.fabric.call(self, "all_gather", (s, r, count, dt))

    def reduceScatter(self, s, r, count, dt, op, stream):
        self.fabric.call(self, "reduce_scatter", (s, r, count, dt, op))

    def broadcast(self, s, r, count, dt, root, stream):
        self.fabric.call(self, "broadcast", (s, r, count, dt, root))

    def send(self, ptr, count, dt, peer, stream):
        self.fabric.group[self].append(("send", ptr, count, dt, peer))

    def recv(self, ptr, count, dt, peer, stream):
        self.fabric.group[self].append(("recv", ptr, count, dt, peer))

    def check_async_error(self):
        pass


def _fake_comms(monkeypatch, world_size):
    fabric = _Fabric(world_size)
    comms = [_FakeComm(fabric, r) for r in range(world_size)]

    class Group(dict):
        def __missing__(self, comm):
            self[comm] = []
            return self[comm]

    def group_start():
        fabric.group = Group()

    def group_end():
        for comm, ops in fabric.group.items():
            fabric.call(comm, "group", ops)
        fabric.group = None

    fake_nccl = types.SimpleNamespace(groupStart=group_start, groupEnd=group_end)
    fake_cuda = types.SimpleNamespace(nccl=fake_nccl)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=fake_cuda))
    monkeypatch.setitem(sys.modules, "cupy.cuda", fake_cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", fake_nccl)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: None)
    monkeypatch.setattr(nccl, "_raw_stream", lambda index: 0)
    out = []
    for r, comm in enumerate(comms):
        host = types.SimpleNamespace(rank=r, world_size=world_size, group_name="world",
                                     global_ranks=list(range(world_size)), timeout=5.0, pg=None)
        out.append(nccl.NcclCommunicator(comm, host, torch.device("cpu", 0), check=False))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_nccl_adaptor_calls_against_a_fake_nccl(monkeypatch, dtype):
    ranks = _fake_comms(monkeypatch, 2)
    x = [torch.arange(6, dtype=dtype) + 10 * r for r in range(2)]
    for r, c in enumerate(ranks):
        c.all_reduce(x[r], op="max")
    assert all(torch.equal(t, torch.arange(6, dtype=dtype) + 10) for t in x)

    # the fake completes a call when the last rank makes it: inputs must outlive the loop
    gathered, shards = [torch.empty(8, dtype=dtype) for _ in range(2)], [torch.full((4,), r + 1, dtype=dtype)
                                                                         for r in range(2)]
    for r, c in enumerate(ranks):
        c.all_gather(gathered[r], shards[r])
    assert all(g.tolist() == [1] * 4 + [2] * 4 for g in gathered)

    scattered, full = [torch.empty(3, dtype=dtype) for _ in range(2)], [torch.arange(6, dtype=dtype) * (r + 1)
                                                                        for r in range(2)]
    for r, c in enumerate(ranks):
        c.reduce_scatter(scattered[r], full[r])
    assert scattered[0].tolist() == [0, 3, 6] and scattered[1].tolist() == [9, 12, 15]

    b = [torch.full((5,), r, dtype=dtype) for r in range(2)]
    for r, c in enumerate(ranks):
        c.broadcast(b[r], src=1)
    assert all(t.tolist() == [1] * 5 for t in b)

    # uneven all-to-all, rows of 3: rank 0 sends 1 row to itself and 2 to rank 1; rank 1 sends 0 and 3
    sends = [[1, 2], [0, 3]]
    inputs = [torch.arange(9, dtype=dtype).view(3, 3) + 100 * r for r in range(2)]
    outputs = [torch.empty(1, 3, dtype=dtype), torch.empty(5, 3, dtype=dtype)]
    for r, c in enumerate(ranks):
        c.all_to_all_single(outputs[r], inputs[r], [sends[s][r] for s in range(2)], sends[r])
    assert torch.equal(outputs[0], inputs[0][:1])
    assert torch.equal(outputs[1], torch.cat([inputs[0][1:], inputs[1]]))

    empty = [torch.empty(0, dtype=dtype) for _ in range(2)]
    for r, c in enumerate(ranks):  # nothing to send: no NCCL call at all
        c.all_reduce(empty[r])
    assert not ranks[0]._comm.fabric.pending


def test_nccl_avg_code_reaches_nccl(monkeypatch):
    ranks = _fake_comms(monkeypatch, 2)
    x = [torch.full((4,), float(r)) for r in range(2)]
    for r, c in enumerate(ranks):
        c.all_reduce(x[r], op="avg")
    assert all(t.tolist() == [0.5] * 4 for t in x)


@pytest.mark.parametrize("id_type", [bytes, tuple])
def test_connect_accepts_either_cupy_unique_id_type(monkeypatch, id_type):
    """CuPy 13+ gives and takes the NCCL id as bytes, older CuPy as a tuple of signed chars."""
    raw = bytes(range(200, 256)) + bytes(range(72))  # 128 bytes, some above 127
    made = []

    class FakeNcclCommunicator:
        def __init__(self, ndev, comm_id, rank):
            if not isinstance(comm_id, id_type):
                raise TypeError(f"Argument 'commId' has incorrect type (expected {id_type.__name__})")
            made.append((ndev, nccl.encode_unique_id(comm_id), rank))

    fake_nccl = types.SimpleNamespace(
        get_unique_id=lambda: raw if id_type is bytes else nccl.decode_unique_id(raw),
        NcclCommunicator=FakeNcclCommunicator)
    fake_cupy = types.ModuleType("cupy")
    fake_cupy.cuda = types.SimpleNamespace(nccl=fake_nccl, Device=lambda i: __import__("contextlib").nullcontext())
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", fake_cupy.cuda)
    store: dict[str, bytes] = {}
    fake_store = types.SimpleNamespace(set=store.__setitem__, get=store.__getitem__)
    monkeypatch.setattr(nccl.dist.distributed_c10d, "_get_default_store", lambda: fake_store)
    host = types.SimpleNamespace(rank=0, world_size=2)
    nccl._connect(host, "nccl-id", 0)
    assert made == [(2, raw, 0)] and store["nccl-id"] == raw
