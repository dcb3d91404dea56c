"""Joining a job: initialize torch.distributed with a rendezvous that names the ranks that never came.

Every adaptor rides on a torch.distributed default group (it carries the store, and gloo for the
host-staged paths). `init_distributed` starts it from ``env://`` (torchrun, SLURM through
`openseek_hal.train.launch`, ``openseek-hal train -n``) or from a given store (`launch`).

One timeout bounds everything: connecting to the store, the check-in, and every collective of the
default group. The check-in: each rank writes its own key and bumps a counter, then polls the
counter. The first rank whose deadline passes with ranks still missing writes a verdict (the exact
ranks whose keys are absent) that every other waiting rank adopts, so all of them raise the same
`CollectiveTimeoutError` naming the same missing ranks. A rank that hosts the store (rank 0 under
plain ``env://``) lingers a moment after its verdict so the others can read it before the store
goes away. No store or network error escapes raw: each becomes a one-line `CollectiveError` that
names the store's address.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from .base import describe_group
from .errors import CollectiveError, CollectiveTimeoutError

DEFAULT_TIMEOUT = 600.0
LINGER_S = 2.0  # how long a store host waits, after a failed check-in, for the others to read the verdict
_JOIN_PREFIX = "openseek_hal/rendezvous/"
_timeout_of_world: float | None = None
_kinds_of_world: list[str] | None = None


def process_group_backend(device_type: str, dist_backend: str) -> str:
    """The torch.distributed backend string: the chip's own, plus gloo for host (CPU) tensors.

    A CPU-type backend with its own library (``dist_backend`` other than gloo) gets ``cpu:<lib>``
    alone: torch maps one library per device type, so ``cpu:gloo,cpu:<lib>`` is not a valid string.
    The host-staged paths and the consistency check then make their own gloo group
    (`gloo_group`), as they do over any group without gloo.
    """
    if dist_backend == "gloo":
        return "gloo"
    if device_type == "cpu" or ":" in dist_backend:  # "cpu:<lib>", or a full "dev:lib,..." string as given
        return dist_backend if ":" in dist_backend else f"cpu:{dist_backend}"
    return f"cpu:gloo,{device_type}:{dist_backend}"


def world_timeout() -> float:
    """The timeout the default group was started with (`DEFAULT_TIMEOUT` if it was not started here)."""
    return _timeout_of_world if _timeout_of_world is not None else DEFAULT_TIMEOUT


def ranks_text(ranks: list[int]) -> str:
    """``rank 2``, ``ranks 1, 2`` or ``ranks 0-3, 7``: which ranks, in one short phrase."""
    spans: list[str] = []
    i = 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        if j - i >= 2:  # three or more in a row
            spans.append(f"{ranks[i]}-{ranks[j]}")
            i = j + 1
        else:
            spans.append(str(ranks[i]))
            i += 1
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(spans)


def init_distributed(device_type: str, dist_backend: str, *, rank: int | None = None,
                     world_size: int | None = None, store: Any | None = None,
                     timeout: float = DEFAULT_TIMEOUT, kind: str | None = None) -> None:
    """Start the default group unless it is running. Without ``store``, rendezvous through ``env://``.

    ``timeout`` (seconds) bounds the whole rendezvous (reaching the store and waiting for every rank,
    plus at most `LINGER_S` on the rank that hosts the store) and then each collective of the group.
    A rank that never joins gives every rank that did a `CollectiveTimeoutError` naming exactly the
    ranks that did not check in; an unreachable store gives one naming its address.

    ``kind`` labels this rank's chip kind (the trainer passes its backend's name; default: the
    torch.distributed backend string). Ranks check in with their label and backend string, so
    after the rendezvous `world_kinds` gives every rank's label. When the ranks' backend strings
    differ (a GPU rank and a CPU rank: they cannot share an NCCL group), the default group is
    started as ``gloo`` on every rank, which all of them can join; the ``hier`` adaptor then makes
    each kind's native group.
    """
    global _timeout_of_world, _kinds_of_world
    if dist.is_initialized():
        return
    if timeout <= 0:
        raise CollectiveError(f"the communication timeout must be positive, got {timeout:g} s", op="init")
    deadline = time.monotonic() + timeout
    hosts_store = False
    if store is None:
        store, rank, world_size, hosts_store = _env_store(timeout)
    if rank is None or world_size is None:
        raise CollectiveError("init_distributed with a store needs rank and world_size", op="init")
    where = store_address(store)
    own = process_group_backend(device_type, dist_backend)
    labels = _wait_for_everyone(store, rank, world_size, timeout, deadline=deadline, hosts_store=hosts_store,
                                label=json.dumps([kind or own, own]))
    labels = labels or [[kind or own, own]] * world_size
    pg_backend = own if len({b for _, b in labels}) == 1 else "gloo"  # mixed libraries: gloo joins them all
    try:
        dist.init_process_group(pg_backend, store=store, rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout))
    except RuntimeError as e:
        raise CollectiveError(f"starting the process group on rank {rank} of "
                              f"{describe_group('world', range(world_size))} (store {where}) failed: "
                              f"{_first_line(e)}", op="init", rank=rank, group="world") from e
    _timeout_of_world = timeout
    _kinds_of_world = [k for k, _ in labels]
    _start_heartbeat(store, rank, world_size)


def world_kinds() -> list[str] | None:
    """The kind label of every rank of the default group started by `init_distributed` (None if it
    was not started there): what each rank passed as ``kind``, else its torch.distributed backend."""
    return list(_kinds_of_world) if _kinds_of_world is not None else None


def store_address(store: Any) -> str:
    """``host:port`` of a (possibly prefixed) TCPStore, else the store's type."""
    while hasattr(store, "underlying_store"):
        store = store.underlying_store
    host, port = getattr(store, "host", None), getattr(store, "port", None)
    return f"{host}:{port}" if host is not None else type(store).__name__


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _env_int(var: str) -> int:
    text = os.environ.get(var, "")
    try:
        return int(text)
    except ValueError:
        raise CollectiveError(f"${var} must be an integer, got {text!r}", op="init", group="world") from None


def _env_store(timeout: float) -> tuple[Any, int, int, bool]:
    """The store, rank and world size that ``env://`` names, and whether this process hosts the store.

    As torch's own ``env://`` handler: with ``TORCHELASTIC_USE_AGENT_STORE=True`` the launcher (torchrun's
    agent, ``openseek-hal train -n``) hosts the store and every rank is a client; otherwise rank 0
    hosts it. Unlike torch's handler, rank 0 does not block until every rank has connected (that
    gave a raw ``DistStoreError`` that blamed nobody); the check-in below names who is missing.
    """
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        if not os.environ.get(var):
            raise CollectiveError(f"torch.distributed is not initialized and ${var} is not set: start the job "
                                  "with torchrun, srun or `openseek-hal train -n`, or use openseek_hal.comm.launch",
                                  op="init", group="world")
    rank, world_size, port = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("MASTER_PORT")
    addr = os.environ["MASTER_ADDR"]
    if world_size < 1 or not 0 <= rank < world_size:
        raise CollectiveError(f"$RANK={rank} is not a rank of $WORLD_SIZE={world_size}", op="init", group="world")
    if not 0 < port < 65536:
        raise CollectiveError(f"$MASTER_PORT={port} is not a TCP port", op="init", group="world")
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    hosts = rank == 0 and not agent
    td = timedelta(seconds=timeout)
    try:
        if not hosts:
            _reach(addr, port, time.monotonic() + timeout)
        if hosts:
            store = dist.TCPStore(addr, port, world_size, is_master=True, wait_for_workers=False, timeout=td,
                                  multi_tenant=True)
        else:
            store = dist.TCPStore(addr, port, world_size, is_master=False, timeout=td)
    except (RuntimeError, OSError) as e:
        group = describe_group("world", range(world_size))
        if hosts:
            raise CollectiveError(f"rank 0 of group {group} could not host the rendezvous store at {addr}:{port}: "
                                  f"{_first_line(e)}", op="rendezvous", rank=rank, group="world") from e
        host = "the launcher's agent" if agent else "rank 0"
        raise CollectiveTimeoutError(
            f"rendezvous on rank {rank} of group {group} failed: the store at {addr}:{port}, hosted by {host}, "
            f"did not answer within {timeout:g} s ({_first_line(e)}); {host} never started or is unreachable",
            op="rendezvous", rank=rank, group="world") from e
    return store, rank, world_size, hosts


def _reach(addr: str, port: int, deadline: float) -> None:
    """Wait until something listens at ``addr:port``, retrying until ``deadline``; raise the last error.

    TCPStore's client would retry on its own, but with back-off past its timeout and a C++ stack
    trace on stderr for each attempt; probing first keeps the wait within the deadline and quiet.
    """
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((addr, port), timeout=max(0.05, min(left, 2.0))):
                return
        except OSError as e:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{type(e).__name__}: {e}") from e
            time.sleep(min(0.2, left))


def _wait_for_everyone(store: Any, rank: int, world_size: int, timeout: float, *,
                       deadline: float | None = None, hosts_store: bool = False,
                       label: str = "1") -> list[Any] | None:
    """Check in under this rank's own key; wait until every rank has, or raise naming those that have not.

    Each rank checks in with ``label`` (JSON). When every rank's label equals the first one written,
    returns None (O(1) store traffic per rank, whatever the world size); when they differ, every rank
    reads every label and returns them in rank order (decoded).
    """
    if deadline is None:
        deadline = time.monotonic() + timeout
    prefix = f"{_JOIN_PREFIX}{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    count_key, verdict_key, ack_key = prefix + "count", prefix + "verdict", prefix + "ack"
    label_key, mixed_key = prefix + "label", prefix + "mixed"
    group = describe_group("world", range(world_size))
    where = store_address(store)
    interval = min(1.0, 0.1 + world_size / 2000)  # polls of one counter; fewer where thousands poll one store
    try:
        store.set(f"{prefix}joined/{rank}", label)
        # the first label written wins; a rank with another says so before it counts itself in, so the
        # flag is visible to every rank that sees the full count
        if _text(store.compare_set(label_key, "", label)) != label:
            store.set(mixed_key, "1")
        count = store.add(count_key, 1)
        while True:
            if store.check([verdict_key]):  # another rank gave up first: adopt its verdict
                missing = json.loads(store.get(verdict_key))
                store.add(ack_key, 1)
                break
            if count >= world_size:
                return _labels(store, prefix, world_size) if store.check([mixed_key]) else None
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [r for r in range(world_size) if not store.check([f"{prefix}joined/{r}"])]
                if not missing:
                    return _labels(store, prefix, world_size) if store.check([mixed_key]) else None
                missing = json.loads(store.compare_set(verdict_key, "", json.dumps(missing)))
                store.add(ack_key, 1)
                break
            time.sleep(min(interval, left))
            count = store.add(count_key, 0)
        if hosts_store:  # keep the store up until the ranks that joined have read the verdict
            linger_end = time.monotonic() + LINGER_S
            while time.monotonic() < linger_end and store.add(ack_key, 0) < store.add(count_key, 0):
                time.sleep(0.05)
    except RuntimeError as e:  # the store went away (its host died) or stopped answering
        raise CollectiveError(f"rendezvous on rank {rank} of group {group} failed: lost the store at {where} "
                              f"({_first_line(e)})", op="rendezvous", rank=rank, group="world") from e
    late = " (this rank joined after the others gave up)" if rank in missing else ""
    raise CollectiveTimeoutError(f"rendezvous on rank {rank} of group {group} timed out after {timeout:g} s: "
                                 f"{ranks_text(missing)} never joined{late} (store {where})",
                                 op="rendezvous", rank=rank, group="world")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _labels(store: Any, prefix: str, world_size: int) -> list[Any]:
    return [json.loads(_text(store.get(f"{prefix}joined/{r}"))) for r in range(world_size)]


def gloo_group(pg: Any, pg_backend: str, global_ranks: list[int], timeout: float) -> Any:
    """``pg`` itself when it carries CPU tensors over gloo, else a new gloo group over the same ranks.

    Like every group creation, all processes of the job call this in the same order, members of
    ``global_ranks`` or not (non-members pass the non-member ``pg`` and get a non-member back).
    """
    if "gloo" in pg_backend:
        return pg
    return dist.new_group(global_ranks, timeout=timedelta(seconds=timeout), backend="gloo")


# -- liveness: naming the rank that died when a collective fails -----------------------------------
HEARTBEAT_S = 0.5
_CLIENT_TIMEOUT_S = 5.0  # the heartbeat's own store connection: its calls return (or fail) within this
_HEARTBEAT_PREFIX = "openseek_hal/heartbeat/"
_heartbeat: _Heartbeat | None = None


class _Heartbeat:
    """Every rank bumps its own counter in the job's store every `HEARTBEAT_S`, from a daemon thread.

    When a collective fails, `silent_ranks` reads every counter twice, a few beats apart: a rank
    whose counter did not move has died (or hangs with its process frozen). Counters, not clocks,
    so hosts need not agree on the time. The thread has its own store connection where it can.
    """

    def __init__(self, store: Any, rank: int, world_size: int):
        self.store, self.rank, self.world_size = self._own_client(store), rank, world_size
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="openseek-hal-heartbeat", daemon=True)
        self._thread.start()

    @staticmethod
    def _own_client(store: Any) -> Any:
        base = store
        while hasattr(base, "underlying_store"):
            base = base.underlying_store
        host, port = getattr(base, "host", None), getattr(base, "port", None)
        if host is None:
            return store
        try:
            return dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                                 timeout=timedelta(seconds=_CLIENT_TIMEOUT_S))
        except (RuntimeError, ValueError):
            return store

    def _run(self) -> None:
        key = f"{_HEARTBEAT_PREFIX}{self.rank}"
        while not self._stop.is_set():
            try:
                self.store.add(key, 1)
            except Exception:  # noqa: BLE001  (the store's host is gone: the collective reports it)
                return
            self._stop.wait(HEARTBEAT_S)

    def counters(self) -> list[int]:
        return [int(self.store.add(f"{_HEARTBEAT_PREFIX}{r}", 0)) for r in range(self.world_size)]

    def stop(self, join: bool = True) -> None:
        """Stop beating; with ``join``, wait (a few beats at most) until the thread is out of the store.

        A process must not exit while the thread is inside a store call: interpreter teardown then destroys
        the store client under it, and the C++ runtime aborts the process ("terminate called without an
        active exception": a daemon thread that wakes up during finalization is ended with pthread_exit,
        whose unwinding through pybind11's frames calls std::terminate; seen twice under torchrun in CI)."""
        self._stop.set()
        if join and self._thread.is_alive() and threading.current_thread() is not self._thread:
            # a store call returns within the client's timeout (a gone store host included)
            self._thread.join(timeout=_CLIENT_TIMEOUT_S + 1.0)


def _start_heartbeat(store: Any, rank: int, world_size: int) -> None:
    global _heartbeat
    if _heartbeat is not None:
        _heartbeat.stop()
    _heartbeat = _Heartbeat(store, rank, world_size) if world_size > 1 else None


@atexit.register
def _stop_heartbeat_at_exit() -> None:  # atexit runs while daemon threads still do: join it before teardown
    if _heartbeat is not None:
        _heartbeat.stop()


def silent_ranks(beats: float = 2.0) -> str:
    """Why a collective may have failed: the ranks whose heartbeat stopped ("" when all beat, or unknown).

    Takes ``beats`` heartbeat periods; call it only on an error path.
    """
    hb = _heartbeat
    if hb is None:
        return ""
    try:
        before = hb.counters()
        time.sleep(beats * HEARTBEAT_S)
        after = hb.counters()
    except Exception:  # noqa: BLE001
        return "the job's store is unreachable: the rank hosting it (rank 0, or the launcher) has died"
    dead = [r for r, (a, b) in enumerate(zip(before, after)) if b <= a]
    return f"{ranks_text(dead)} stopped responding (no heartbeat for {beats * HEARTBEAT_S:g} s)" if dead else ""


def shutdown() -> None:
    """End the job's collectives: wait for every rank, then destroy torch.distributed's groups.

    The barrier matters: a rank that tears its gloo connections down while a peer still finishes a
    collective on them makes that peer's process abort.
    """
    if _heartbeat is not None:
        _heartbeat.stop()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
