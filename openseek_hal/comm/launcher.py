"""`launch`: run a function on N local ranks, each with a communicator, and collect what they return.

For tests, ``conform --level comm`` and ``bench comm`` (torchrun is for real jobs). The parent
hosts the TCP store (so no port is guessed), spawns one process per rank, and watches both each
rank's result pipe and its process sentinel: a rank that raises, dies or hangs is noticed without
polling the others' collectives. Once one rank fails, the others get a short grace period
(`GRACE_S`) to report, then are killed: ranks blocked in a collective with the failed rank are not
waited for (that would add a second timeout), so a hung rank makes `launch` return within one
timeout plus `GRACE_S`. No process outlives `launch`: ranks are killed when they outlive it, and
each rank asks the kernel for SIGKILL when its parent dies (so ``kill -9`` of the parent takes its
ranks along).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any

from ..errors import UserError
from ..procs import set_parent_death_signal
from .errors import CollectiveError, CollectiveTimeoutError

# Set in every rank we start: NVLink SHARP multicast off (it needs fabric-manager support that
# shared GPU machines do not give), for NCCL and for torch's symmetric memory.
CHILD_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
GRACE_S = 3.0  # after a rank fails, for the others to report before they are killed
_ENV_PREFIX = "OPENSEEK_HAL_"  # the caller's settings of this prefix reach the ranks as they are at launch
_PRELOAD = ["torch", "torch.distributed", "openseek_hal.backend", "openseek_hal.comm.launcher",
            "openseek_hal.comm.torch_dist", "openseek_hal.comm.host", "openseek_hal.comm.hier",
            "openseek_hal.comm.staging", "openseek_hal.comm.adaptors"]


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a rank, attached as the re-raised exception's cause."""

    def __str__(self) -> str:
        return self.args[0]


def launch(fn: Callable[..., Any], world_size: int, *, backend: str = "cpu", adaptor: str | None = None,
           timeout: float = 60.0, args: tuple = (), check: bool = True,
           kinds: Sequence[str] | None = None, options: dict[str, Any] | None = None) -> list:
    """Call ``fn(comm, *args)`` on ``world_size`` spawned local ranks; return their results in rank order.

    ``adaptor`` None takes the backend's own (``Backend.comm_adaptor``).
    ``fn`` must be picklable (a module-level function). ``timeout`` bounds the rendezvous and each
    collective; once a rank fails, the others are killed after `GRACE_S`. ``check`` turns on the
    cross-rank consistency check. ``kinds`` gives each rank a chip-kind label (``hier`` adaptor:
    simulate a mixed-chip job on one kind of device); ``options`` go to the adaptor. A rank's
    exception is re-raised here with the rank named (its traceback as the cause, the other ranks'
    failures as notes); a rank that dies raises `CollectiveError`.
    """
    from torch.distributed import TCPStore

    from ..backend import get_backend
    from . import adaptor_available, default_adaptor

    if world_size < 1:
        raise UserError(f"world_size must be at least 1, got {world_size}")
    if kinds is not None and len(kinds) != world_size:
        raise UserError(f"kinds has {len(kinds)} labels for {world_size} ranks")
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file is not None and not os.path.exists(main_file):  # python - <<EOF, notebooks' odd mains
        raise UserError(f"launch cannot start ranks from a main program read from {main_file}: ranks "
                        "re-import it; put the code in a file or a module (python -c works too)")
    be = get_backend(backend)
    adaptor = adaptor or default_adaptor(be)
    ok, reason = adaptor_available(adaptor)
    if ok:
        ok, reason = adaptor_available(adaptor, be.device_type)
    if not ok:
        raise UserError(f"adaptor '{adaptor}' is not available: {reason}")
    if be.device_type != "cpu" and be.device.count() < world_size:
        raise UserError(f"{world_size} ranks need {world_size} '{backend}' devices, "
                        f"found {be.device.count()}")

    store = TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                     timeout=timedelta(seconds=timeout))
    ctx = _context()
    # the fork server keeps the environment it started with: hand each rank the caller's settings now
    settings = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIX)}
    procs, conns = [], []
    try:
        for rank in range(world_size):
            recv_end, send_end = ctx.Pipe(duplex=False)
            opts = dict(options or {})
            if kinds is not None:
                opts["kind"] = kinds[rank]
            p = ctx.Process(target=_rank_main, name=f"openseek-hal-rank{rank}", daemon=True,
                            args=(rank, world_size, store.port, backend, adaptor, timeout, check, opts,
                                  fn, args, send_end, settings))
            p.start()
            send_end.close()
            procs.append(p)
            conns.append(recv_end)
        results, failures = _collect(procs, conns, timeout)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(5)
        for c in conns:
            c.close()
        del store
    if failures:
        raise _primary(failures)
    return [results[r] for r in range(world_size)]


def _context() -> Any:
    """Fresh interpreters, never a fork of this process (which may hold CUDA or threads).

    Where the platform has it, a fork server does the spawning: it imports torch once, and then each
    rank is a fork of that clean server instead of a new interpreter importing torch again (seconds
    per rank on a small machine). The server never touches a device, so forking it is safe.
    """
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _collect(procs: list, conns: list, timeout: float) -> tuple[dict[int, Any], dict[int, tuple]]:
    """Wait for every rank; failures[rank] = (exception or None, traceback text, summary).

    No wait here adds to ``timeout``: the ranks' own rendezvous and collectives are bounded by it, and
    once one rank has failed the others get only `GRACE_S` more.
    """
    results: dict[int, Any] = {}
    failures: dict[int, tuple] = {}
    pending = set(range(len(procs)))
    deadline: float | None = None
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        wait([conns[r] for r in pending] + [procs[r].sentinel for r in pending],
             timeout=1.0 if left is None else min(left, 1.0))
        for r in sorted(pending):
            if conns[r].poll():
                try:
                    msg = conns[r].recv()
                except EOFError:  # died without a word
                    procs[r].join(5)
                    failures[r] = _died(r, procs[r])
                else:
                    if msg[0] == "ok":
                        results[r] = msg[1]
                    else:
                        exc = _unpickle(msg[1], msg[3])
                        failures[r] = (exc, msg[2], f"rank {r} raised {type(exc).__name__}: {exc}")
                pending.discard(r)
            elif not procs[r].is_alive():
                failures[r] = _died(r, procs[r])
                pending.discard(r)
        if failures and deadline is None:
            deadline = time.monotonic() + GRACE_S
        if deadline is not None and time.monotonic() >= deadline:
            for r in sorted(pending):
                failures[r] = (None, "", f"rank {r} was still running {GRACE_S:g} s after another "
                                         "rank failed; killed")
            pending.clear()
    return results, failures


def _died(rank: int, proc: Any) -> tuple:
    return (None, "", f"rank {rank} exited with code {proc.exitcode} before returning")


def _primary(failures: dict[int, tuple]) -> BaseException:
    """The exception to raise: a rank's own error first, then a death, then a collective error."""
    def order(r: int) -> tuple[int, int]:
        exc = failures[r][0]
        if exc is not None and not isinstance(exc, CollectiveError):
            return (0, r)
        return (1, r) if exc is None and "exited" in failures[r][2] else (2, r)

    ranks = sorted(failures, key=order)
    first = ranks[0]
    exc, tb, summary = failures[first]
    others = [failures[r][2] for r in ranks[1:]]
    if exc is None:
        cls = CollectiveTimeoutError if "still running" in summary else CollectiveError
        exc = cls(summary + ("; " + "; ".join(others) if others else ""), rank=first, group="world")
        return exc
    if tb:
        exc.__cause__ = RemoteTraceback(f"\n[rank {first}] {tb}")
    if hasattr(exc, "add_note"):
        exc.add_note(f"(raised on rank {first} of {len(failures)} failed rank(s))")
        for line in others:
            exc.add_note(line)
    return exc


def _unpickle(payload: bytes | None, text: str) -> BaseException:
    if payload is not None:
        try:
            exc = pickle.loads(payload)
            if isinstance(exc, BaseException):
                return exc
        except Exception:  # a class the parent cannot import: fall back to the text
            pass
    return CollectiveError(text)


def _release_fork_server() -> None:
    """Close this rank's inherited copy of the fork server's keep-alive pipe (a rank that starts
    processes of its own through a fork server gets a new one)."""
    try:
        from multiprocessing import forkserver

        server = forkserver._forkserver  # type: ignore[attr-defined]
        fd = server._forkserver_alive_fd
        if fd is not None and server._forkserver_pid is None:  # inherited, not a server this process started
            os.close(fd)
            server._forkserver_alive_fd = None
    except (AttributeError, OSError):  # another Python's internals, or already closed: nothing to release
        pass


def _rank_main(rank: int, world_size: int, port: int, backend: str, adaptor: str, timeout: float,
               check: bool, options: dict[str, Any], fn: Callable[..., Any], args: tuple, conn: Any,
               settings: dict[str, str] | None = None) -> None:
    # The parent here is the fork server (or launch's process under spawn). The fork server exits
    # once launch's process and every rank have closed its keep-alive pipe, so each rank closes its
    # copy: then a kill -9 of launch's process ends the fork server, and the signal ends the ranks.
    _release_fork_server()
    parent = os.getppid()
    if set_parent_death_signal() and os.getppid() != parent:
        os._exit(1)
    if settings is not None:
        for key in [k for k in os.environ if k.startswith(_ENV_PREFIX) and k not in settings]:
            del os.environ[key]
        os.environ.update(settings)
    os.environ.update(CHILD_ENV)
    import torch
    import torch.distributed as dist

    if "OMP_NUM_THREADS" not in os.environ and world_size > 1:
        # as torchrun: N ranks of all-cores OpenMP would oversubscribe the host (and spin against each other)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))

    from ..backend import get_backend
    from . import create
    from .rendezvous import init_distributed, shutdown

    ok = False
    try:
        be = get_backend(backend)
        if be.device_type != "cpu":  # one device per rank
            be = get_backend(backend, device_index=rank)
        try:
            store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                                  timeout=timedelta(seconds=timeout))
            init_distributed(be.device_type, be.dist_backend, rank=rank, world_size=world_size, store=store,
                             timeout=timeout)
            comm = create(adaptor, be, timeout=timeout, check=check, **options)
        except RuntimeError as e:  # a peer that failed early breaks the setup: secondary, not the cause
            raise CollectiveError(f"setting up the '{adaptor}' communicator on rank {rank} of group 'world' "
                                  f"failed: {str(e).splitlines()[0]}", op="create", rank=rank,
                                  group="world") from e
        message: tuple = ("ok", fn(comm, *args))
        ok = True
    except BaseException as e:
        message = ("error", _pickle(e), traceback.format_exc(), f"{type(e).__name__}: {e}")
    try:
        conn.send(message)
    except Exception as e:  # an unpicklable return value
        ok = False
        err = CollectiveError(f"rank {rank} returned a value that cannot be sent to the parent: {e}")
        conn.send(("error", _pickle(err), "", str(err)))
    conn.close()
    if ok:
        shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: after a failure, communicator destructors may block on dead peers.
    os._exit(0 if ok else 1)


def _pickle(exc: BaseException) -> bytes | None:
    try:
        return pickle.dumps(exc)
    except Exception:
        return None
