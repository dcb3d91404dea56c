"""What every adaptor shares: argument checks, the cross-rank consistency check, error translation.

`BaseCommunicator` implements the public `Communicator` methods once. Each validates its
arguments locally, optionally checks that every rank of the group is making the same call (see
`consistency check` below), then hands the transport to the adaptor's ``_all_reduce``,
``_all_gather``, ... and wraps what the transport raises into `CollectiveError` /
`CollectiveTimeoutError` naming the collective, the rank and the group. Adaptors therefore only
move bytes.

Consistency check: with ``check=True`` each collective first all-gathers a small integer
fingerprint of the call (collective, reduce op, dtype, element counts, root, all-to-all splits)
over a gloo group and compares. Ranks that disagree on shapes, dtypes, roots or splits then get one
clear error instead of a hang or silently wrong data. It costs one tiny collective per call, so
it is on in tests and conformance (`launch` turns it on) and off by default elsewhere, like
``TORCH_DISTRIBUTED_DEBUG=DETAIL`` in torch.distributed; ``OPENSEEK_HAL_COMM_CHECK=1`` turns it on.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from .errors import CollectiveError, CollectiveTimeoutError

ENV_CHECK = "OPENSEEK_HAL_COMM_CHECK"
REDUCE_OPS = ("sum", "avg", "max", "min")
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all_single", "broadcast",
               "send", "recv", "barrier")
# Fixed codes for the fingerprint; the order is part of nothing outside this module.
_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2,
)
_FP_FIXED = 8  # op, reduce op, dtype, input numel, output numel, root, input dim 0, output dim 0
# torch 2.13 renamed the flat all-gather; 2.11 (the GPU image) has only the old name.
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def check_default() -> bool:
    return os.environ.get(ENV_CHECK, "") in ("1", "true", "yes")


def is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text or isinstance(exc, TimeoutError)


def describe_group(name: str, ranks: Sequence[int]) -> str:
    ranks = list(ranks)
    if ranks and ranks == list(range(ranks[0], ranks[0] + len(ranks))) and len(ranks) > 2:
        span = f"{ranks[0]}-{ranks[-1]}"
    else:
        span = ",".join(map(str, ranks))
    return f"'{name}' (global ranks {span})"


class StagedWork:
    """A transport's handle plus what must run after it completes (copy back, divide for avg)."""

    __slots__ = ("_work", "_after")

    def __init__(self, work: Any | None, after: Callable[[], None]):
        self._work, self._after = work, after

    def wait(self) -> None:
        if self._work is not None:
            self._work.wait()
        self._after()


class Work:
    """The handle `Communicator` methods return with ``async_op=True``; ``wait()`` raises like the call."""

    __slots__ = ("_work", "_comm", "_op", "_done")

    def __init__(self, work: Any | None, comm: BaseCommunicator, op: str):
        self._work, self._comm, self._op, self._done = work, comm, op, False

    def wait(self) -> None:
        if self._done:
            return
        self._done = True
        if self._work is not None:
            try:
                self._work.wait()
            except RuntimeError as e:
                raise self._comm.error(self._op, e) from e

    def is_completed(self) -> bool:
        if self._done or self._work is None:
            return True
        probe = getattr(self._work, "is_completed", None)
        return bool(probe()) if probe is not None else False


class BaseCommunicator:
    """The public collectives, written once; subclasses implement the ``_name`` transports."""

    adaptor: ClassVar[str]

    def __init__(self, *, rank: int, world_size: int, group_name: str, global_ranks: Sequence[int],
                 device: torch.device, timeout: float, check_group: Any | None = None):
        self._rank, self._world_size = rank, world_size
        self.group_name, self.global_ranks = group_name, tuple(global_ranks)
        self.device, self.timeout = device, timeout
        self._check_group = check_group  # a gloo ProcessGroup when the consistency check is on
        self._group_text = describe_group(group_name, self.global_ranks)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def check(self) -> bool:
        return self._check_group is not None

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} adaptor={self.adaptor!r} rank {self.rank}/{self.world_size} "
                f"group {self._group_text} on {self.device}>")

    # -- errors -------------------------------------------------------------------------------
    def where(self, op: str) -> str:
        return f"{op} on rank {self.rank} of group {self._group_text} ({self.adaptor} adaptor)"

    def error(self, op: str, cause: BaseException | str) -> CollectiveError:
        if isinstance(cause, CollectiveError):
            return cause
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        from .rendezvous import silent_ranks

        dead = silent_ranks() if not isinstance(cause, str) else ""
        if not isinstance(cause, str) and is_timeout(cause):
            return CollectiveTimeoutError(f"{self.where(op)} timed out after {self.timeout:g} s: "
                                          + (f"{dead} (transport: {text})" if dead else text),
                                          op=op, rank=self.rank, group=self.group_name)
        return CollectiveError(f"{self.where(op)} failed: " + (f"{dead} (transport: {text})" if dead else text),
                               op=op, rank=self.rank, group=self.group_name)

    def _bad(self, op: str, why: str) -> CollectiveError:
        return CollectiveError(f"{self.where(op)}: {why}", op=op, rank=self.rank, group=self.group_name)

    def _run(self, op: str, transport: Callable[[], Any], async_op: bool) -> Work | None:
        try:
            work = transport()
        except RuntimeError as e:
            raise self.error(op, e) from e
        # transports complete synchronous calls before returning (what they return then is not a handle)
        return Work(work, self, op) if async_op else None

    # -- local argument checks -----------------------------------------------------------------
    def _tensor(self, op: str, t: torch.Tensor, what: str = "tensor") -> None:
        if not isinstance(t, torch.Tensor):
            raise self._bad(op, f"{what} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_contiguous():
            raise self._bad(op, f"{what} must be contiguous (call .contiguous() first)")

    def _pair(self, op: str, output: torch.Tensor, input: torch.Tensor) -> None:
        self._tensor(op, output, "output")
        self._tensor(op, input, "input")
        if output.dtype != input.dtype:
            raise self._bad(op, f"output dtype {output.dtype} differs from input dtype {input.dtype}")
        if output.device != input.device:
            raise self._bad(op, f"output on {output.device} but input on {input.device}")

    def _peer(self, op: str, peer: int, what: str) -> None:
        if not 0 <= peer < self.world_size:
            raise self._bad(op, f"{what}={peer} is not a rank of this group (0..{self.world_size - 1})")

    def _reduce_op(self, op: str, reduce: str, dtype: torch.dtype) -> str:
        if reduce not in REDUCE_OPS:
            raise self._bad(op, f"unknown reduce op {reduce!r} (choose from {', '.join(REDUCE_OPS)})")
        if reduce == "avg" and not (dtype.is_floating_point or dtype.is_complex):
            raise self._bad(op, f"'avg' needs a floating-point tensor, got {dtype}")
        return reduce

    # -- the consistency check -----------------------------------------------------------------
    def _consistent(self, op: str, reduce: str | None, input: torch.Tensor | None,
                    output: torch.Tensor | None, root: int = -1,
                    splits: tuple[Sequence[int], Sequence[int]] | None = None) -> None:
        if self._check_group is None:
            return
        n = self.world_size
        fp = torch.full((_FP_FIXED + 2 * n,), -1, dtype=torch.int64)
        ref = input if input is not None else output
        fp[0] = COLLECTIVES.index(op)
        fp[1] = REDUCE_OPS.index(reduce) if reduce else -1
        if ref is not None:
            fp[2] = _DTYPES.index(ref.dtype) if ref.dtype in _DTYPES else 100 + hash(str(ref.dtype)) % 1000
        fp[3] = input.numel() if input is not None else -1
        fp[4] = output.numel() if output is not None else -1
        fp[5] = root
        fp[6] = input.shape[0] if input is not None and input.dim() else -1
        fp[7] = output.shape[0] if output is not None and output.dim() else -1
        if splits is not None:  # ranks of an all-to-all may send different totals; rows must agree
            fp[3] = math.prod(input.shape[1:])
            fp[4] = math.prod(output.shape[1:])
            fp[6] = fp[7] = -1
            fp[_FP_FIXED:_FP_FIXED + n] = torch.tensor(splits[0], dtype=torch.int64)
            fp[_FP_FIXED + n:] = torch.tensor(splits[1], dtype=torch.int64)
        everyone = torch.empty(n, fp.numel(), dtype=torch.int64)
        try:
            all_gather_flat(everyone.view(-1), fp, group=self._check_group)
        except RuntimeError as e:
            raise self.error(op, e) from e
        problem = _disagreement(everyone, n)
        if problem:
            raise self._bad(op, f"ranks disagree: {problem}")

    # -- the public collectives ----------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", async_op: bool = False) -> Work | None:
        self._tensor("all_reduce", tensor)
        self._reduce_op("all_reduce", op, tensor.dtype)
        self._consistent("all_reduce", op, tensor, tensor)
        return self._run("all_reduce", lambda: self._all_reduce(tensor, op, async_op), async_op)

    def all_gather(self, output: torch.Tensor, input: torch.Tensor, async_op: bool = False) -> Work | None:
        """Concatenate every rank's ``input`` along dim 0 into ``output`` (world_size x input elements)."""
        self._pair("all_gather", output, input)
        if output.numel() != self.world_size * input.numel():
            raise self._bad("all_gather", f"output has {output.numel()} elements, expected world_size x "
                                          f"input = {self.world_size} x {input.numel()}")
        self._consistent("all_gather", None, input, output)
        return self._run("all_gather", lambda: self._all_gather(output, input, async_op), async_op)

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor, op: str = "sum",
                       async_op: bool = False) -> Work | None:
        """Reduce ``input`` across ranks; rank r keeps chunk r (``output``) of its dim-0 split."""
        self._pair("reduce_scatter", output, input)
        self._reduce_op("reduce_scatter", op, input.dtype)
        if input.numel() != self.world_size * output.numel():
            raise self._bad("reduce_scatter", f"input has {input.numel()} elements, expected world_size x "
                                              f"output = {self.world_size} x {output.numel()}")
        self._consistent("reduce_scatter", op, input, output)
        return self._run("reduce_scatter", lambda: self._reduce_scatter(output, input, op, async_op),
                         async_op)

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor,
                          output_split_sizes: list[int] | None = None,
                          input_split_sizes: list[int] | None = None,
                          async_op: bool = False) -> Work | None:
        """Rank r sends rows ``input_split_sizes[j]`` of ``input`` (dim 0) to rank j, in rank order."""
        op = "all_to_all_single"
        self._pair(op, output, input)
        in_splits = self._splits(op, input, input_split_sizes, "input")
        out_splits = self._splits(op, output, output_split_sizes, "output")
        if (input.dim() > 1 or output.dim() > 1) and input.shape[1:] != output.shape[1:]:
            raise self._bad(op, f"input rows {tuple(input.shape[1:])} and output rows "
                                f"{tuple(output.shape[1:])} differ")
        self._consistent(op, None, input, output, splits=(in_splits, out_splits))
        return self._run(op, lambda: self._all_to_all_single(output, input, out_splits, in_splits, async_op),
                         async_op)

    def _splits(self, op: str, t: torch.Tensor, splits: list[int] | None, what: str) -> list[int]:
        # on the latency path of every all-to-all: plain integer arithmetic only
        n, rows = self._world_size, t.size(0) if t.dim() else t.numel()
        if splits is None:
            if rows % n:
                raise self._bad(op, f"{what} has {rows} rows, not divisible by world_size {n}; "
                                    f"pass {what}_split_sizes")
            return [rows // n] * n
        if len(splits) != n or sum(splits) != rows or min(splits) < 0:
            raise self._bad(op, f"{what}_split_sizes {list(splits)} must be {n} non-negative "
                                f"sizes summing to the {rows} rows of {what}")
        return list(splits)

    def broadcast(self, tensor: torch.Tensor, src: int, async_op: bool = False) -> Work | None:
        self._tensor("broadcast", tensor)
        self._peer("broadcast", src, "src")
        self._consistent("broadcast", None, tensor, tensor, root=src)
        return self._run("broadcast", lambda: self._broadcast(tensor, src, async_op), async_op)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self._tensor("send", tensor)
        self._peer("send", dst, "dst")
        if dst == self.rank:
            raise self._bad("send", "cannot send to itself")
        if self.check:
            # the header goes over the check group (gloo, host memory), whatever the transport
            header = _header(tensor)
            peer = self.global_ranks[dst]
            self._run("send", lambda: dist.send(header, peer, group=self._check_group), False)
        self._run("send", lambda: self._send(tensor, dst), False)

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        self._tensor("recv", tensor)
        self._peer("recv", src, "src")
        if src == self.rank:
            raise self._bad("recv", "cannot receive from itself")
        if self.check:
            header = torch.empty(2, dtype=torch.int64)
            peer = self.global_ranks[src]
            self._run("recv", lambda: dist.recv(header, peer, group=self._check_group), False)
            if header.tolist() != _header(tensor).tolist():
                sent = _DTYPES[int(header[0])] if 0 <= header[0] < len(_DTYPES) else "?"
                if sent != "?":  # take the payload anyway, so that the sender is not left blocked
                    scratch = torch.empty(int(header[1]), dtype=sent, device=tensor.device)
                    self._run("recv", lambda: self._recv(scratch, src), False)
                theirs, mine = (str(d).replace("torch.", "") for d in (sent, tensor.dtype))
                raise self._bad("recv", f"rank {src} sent {theirs}[{int(header[1])} elements] but this rank "
                                        f"receives into {mine}[{tensor.numel()} elements]")
        self._run("recv", lambda: self._recv(tensor, src), False)

    def barrier(self) -> None:
        self._run("barrier", self._barrier, False)

    def new_group(self, ranks: Sequence[int]) -> BaseCommunicator | None:
        """A communicator of the same adaptor over ``ranks`` (ranks of this group).

        Like ``torch.distributed.new_group``, every rank of the job calls it with the same ranks;
        ranks outside ``ranks`` get None.
        """
        ranks = sorted(set(int(r) for r in ranks))
        if not ranks or ranks[0] < 0 or ranks[-1] >= self.world_size:
            raise self._bad("new_group", f"ranks {ranks} are not ranks of this group "
                                         f"(0..{self.world_size - 1})")
        return self._new_group(ranks)

    def close(self) -> None:
        """Release what the adaptor created (process groups stay with torch.distributed)."""

    # -- transports (adaptors implement these; each may return a handle with wait()) -----------
    def _all_reduce(self, tensor, op, async_op): raise NotImplementedError
    def _all_gather(self, output, input, async_op): raise NotImplementedError
    def _reduce_scatter(self, output, input, op, async_op): raise NotImplementedError
    def _all_to_all_single(self, output, input, output_splits, input_splits, async_op):
        raise NotImplementedError
    def _broadcast(self, tensor, src, async_op): raise NotImplementedError
    def _send(self, tensor, dst): raise NotImplementedError
    def _recv(self, tensor, src): raise NotImplementedError
    def _barrier(self): raise NotImplementedError
    def _new_group(self, ranks: list[int]) -> BaseCommunicator | None: raise NotImplementedError


def _header(t: torch.Tensor) -> torch.Tensor:
    code = _DTYPES.index(t.dtype) if t.dtype in _DTYPES else len(_DTYPES)
    return torch.tensor([code, t.numel()], dtype=torch.int64)


def _call_text(row: list[int]) -> str:
    op = COLLECTIVES[row[0]]
    dtype = str(_DTYPES[row[2]]).replace("torch.", "") if 0 <= row[2] < len(_DTYPES) else "?"
    parts = [REDUCE_OPS[row[1]]] if row[1] >= 0 else []
    unit = "elements per row" if op == "all_to_all_single" else "elements"
    parts.append(f"{dtype}, input {row[3]} {unit}")
    if op in ("all_gather", "reduce_scatter", "all_to_all_single"):
        parts.append(f"output {row[4]} {unit}")
    if row[5] >= 0:
        parts.append(f"src={row[5]}")
    return f"{op}({', '.join(parts)})"


def _disagreement(everyone: torch.Tensor, n: int) -> str:
    """A sentence naming what each rank called when they differ, or "" when every rank agrees."""
    rows = everyone.tolist()
    if any(row[:_FP_FIXED] != rows[0][:_FP_FIXED] for row in rows):
        return "; ".join(f"rank {r} calls {_call_text(row)}" for r, row in enumerate(rows))
    if COLLECTIVES[rows[0][0]] == "all_to_all_single":
        for src in range(n):
            for dst in range(n):
                sends, expects = rows[src][_FP_FIXED + dst], rows[dst][_FP_FIXED + n + src]
                if sends != expects:
                    return (f"rank {src} sends {sends} rows to rank {dst}, but rank {dst} expects "
                            f"{expects} rows from rank {src}")
    return ""
