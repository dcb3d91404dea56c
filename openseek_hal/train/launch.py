"""Where a training process stands in its job, and the one-host launcher behind ``openseek-hal train -n G``.

One code path for every way a job starts:

- ``torchrun --nnodes N --nproc-per-node G -m openseek_hal train ...``: torchrun's variables;
- ``srun ... python -m openseek_hal train ...`` under SLURM: `world_from_env` reads ``SLURM_*`` and
  exports the variables of ``env://`` (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ...);
- ``openseek-hal train -n G``: `spawn_local` starts G ranks the way torchrun does (it hosts the
  rendezvous store, as torchrun's agent does, and gives each rank torchrun's variables);
- plain ``openseek-hal train``: a single process.

A rank started by a launcher calls, first thing and from its main thread, `die_with_parent` (so a
``kill -9`` of the launcher takes the rank along), then `world_from_env`, then
``comm.rendezvous.init_distributed(..., timeout=comm_timeout)`` when the world has more than one rank.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from itertools import product
from typing import IO, Literal

from ..errors import UserError
from ..procs import set_parent_death_signal

Source = Literal["torchrun", "slurm", "single"]
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCHER_PID_VAR = "OPENSEEK_HAL_LAUNCHER_PID"  # set by spawn_local in its ranks
STOP_GRACE_S = 15.0  # after SIGTERM, how long ranks get to exit before SIGKILL
SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 15000  # MASTER_PORT = base + job id % span: below Linux's ephemeral ports
DEFAULT_ENTRY = ("-m", "openseek_hal", "train")


class LaunchError(UserError):
    """The launch environment is inconsistent (partial or contradictory torchrun/SLURM variables)."""


@dataclass(frozen=True)
class World:
    """This process's place in the job: its global rank, its rank on this node, and who started it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    source: Source

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs and writes shared files."""
        return self.rank == 0


def world_from_env(env: MutableMapping[str, str] | None = None) -> World:
    """Read this process's `World` from the environment (``os.environ`` unless ``env`` is given).

    torchrun's variables win (also when torchrun itself runs under srun: ``TORCHELASTIC_RUN_ID`` is
    set); else SLURM's task variables, from which ``MASTER_ADDR`` (first host of the job's node
    list), ``MASTER_PORT`` (``$MASTER_PORT``, else derived from ``$SLURM_JOB_ID``), ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and ``GROUP_RANK`` are exported into ``env``
    so that the ``env://`` rendezvous works; else a single process. Calling it again is harmless.
    Partial or contradictory variables raise `LaunchError` naming them.
    """
    env = os.environ if env is None else env
    has_torchrun = any(var in env for var in TORCHRUN_VARS if not var.startswith("MASTER_"))
    if "TORCHELASTIC_RUN_ID" in env or (has_torchrun and "SLURM_PROCID" not in env):
        return _torchrun_world(env)
    if "SLURM_PROCID" in env:
        return _slurm_world(env)
    return World(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0, source="single")


def _int(env: MutableMapping[str, str], var: str, source: str) -> int:
    text = env[var]
    try:
        return int(text)
    except ValueError:
        raise LaunchError(f"{source} launch: ${var} must be an integer, got {text!r}") from None


def _check(world: World, what: str) -> World:
    if world.world_size < 1 or not 0 <= world.rank < world.world_size:
        raise LaunchError(f"{what}: rank {world.rank} is not in a world of {world.world_size}")
    if world.local_world_size < 1 or world.local_world_size > world.world_size:
        raise LaunchError(f"{what}: {world.local_world_size} ranks per node in a world of {world.world_size}")
    if not 0 <= world.local_rank < world.local_world_size:
        raise LaunchError(f"{what}: local rank {world.local_rank} is not in {world.local_world_size} ranks per node")
    if world.node_rank < 0:
        raise LaunchError(f"{what}: node rank {world.node_rank} is negative")
    return world


def _torchrun_world(env: MutableMapping[str, str]) -> World:
    missing = [var for var in TORCHRUN_VARS if not env.get(var)]
    if missing:
        present = [var for var in TORCHRUN_VARS if env.get(var)]
        raise LaunchError(f"torchrun-style launch: {', '.join('$' + v for v in present) or 'its run id'} set but "
                          f"{', '.join('$' + v for v in missing)} not: set all of {', '.join(TORCHRUN_VARS)} "
                          "(torchrun does), or none")
    _int(env, "MASTER_PORT", "torchrun-style")
    return _check(World(rank=_int(env, "RANK", "torchrun-style"), world_size=_int(env, "WORLD_SIZE", "torchrun-style"),
                        local_rank=_int(env, "LOCAL_RANK", "torchrun-style"),
                        local_world_size=_int(env, "LOCAL_WORLD_SIZE", "torchrun-style"),
                        node_rank=_int(env, "GROUP_RANK", "torchrun-style"), source="torchrun"),
                  "torchrun-style launch")


def _slurm_world(env: MutableMapping[str, str]) -> World:
    needed = ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID"]
    missing = [var for var in needed if not env.get(var)]
    if not env.get("SLURM_NTASKS_PER_NODE") and not env.get("SLURM_TASKS_PER_NODE"):
        missing.append("SLURM_TASKS_PER_NODE")
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not env.get("MASTER_ADDR") and not nodelist:
        missing.append("SLURM_JOB_NODELIST")
    if not env.get("MASTER_PORT") and not env.get("SLURM_JOB_ID"):
        missing.append("SLURM_JOB_ID")
    if missing:
        raise LaunchError(f"SLURM launch: $SLURM_PROCID is set but {', '.join('$' + v for v in missing)} not "
                          "(start the ranks with srun)")
    rank, world_size = _int(env, "SLURM_PROCID", "SLURM"), _int(env, "SLURM_NTASKS", "SLURM")
    local_rank, node_rank = _int(env, "SLURM_LOCALID", "SLURM"), _int(env, "SLURM_NODEID", "SLURM")
    if env.get("SLURM_NTASKS_PER_NODE"):
        local_world_size = _int(env, "SLURM_NTASKS_PER_NODE", "SLURM")
    else:
        per_node = tasks_per_node(env["SLURM_TASKS_PER_NODE"])
        if sum(per_node) != world_size:
            raise LaunchError(f"SLURM launch: $SLURM_TASKS_PER_NODE={env['SLURM_TASKS_PER_NODE']} adds up to "
                              f"{sum(per_node)} tasks, $SLURM_NTASKS={world_size}")
        if node_rank >= len(per_node):
            raise LaunchError(f"SLURM launch: $SLURM_NODEID={node_rank} but $SLURM_TASKS_PER_NODE="
                              f"{env['SLURM_TASKS_PER_NODE']} names {len(per_node)} node(s)")
        local_world_size = per_node[node_rank]
    world = _check(World(rank=rank, world_size=world_size, local_rank=local_rank,
                         local_world_size=local_world_size, node_rank=node_rank, source="slurm"), "SLURM launch")
    addr = env.get("MASTER_ADDR") or expand_nodelist(nodelist or "")[0]
    if env.get("MASTER_PORT"):
        port = _int(env, "MASTER_PORT", "SLURM")
    else:
        port = SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID", "SLURM") % SLURM_PORT_SPAN
    exports = {"MASTER_ADDR": addr, "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world_size),
               "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(local_world_size),
               "GROUP_RANK": str(node_rank)}
    clash = [f"${var}={env[var]} but SLURM says {value}" for var, value in exports.items()
             if var not in ("MASTER_ADDR", "MASTER_PORT") and env.get(var) and env[var] != value]
    if clash:
        raise LaunchError(f"SLURM launch: {'; '.join(clash)} (unset them, or launch with torchrun)")
    env.update(exports)
    return world


def tasks_per_node(text: str) -> list[int]:
    """SLURM's ``SLURM_TASKS_PER_NODE`` (``2(x3),1``) as a count per node: ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if m is None:
            raise LaunchError(f"SLURM launch: cannot read $SLURM_TASKS_PER_NODE={text!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def expand_nodelist(text: str) -> list[str]:
    """A SLURM host list in full: ``node[01-03,07],gpu-a[1-2]-ib,login5`` -> ``node01 node02 ...``.

    Ranges keep their zero padding; an item may have several bracket groups (``r[1-2]n[1-2]``,
    expanded in order, last group fastest), as ``scontrol show hostnames`` does.
    """
    hosts: list[str] = []
    for item in _split_top_level(text):
        if not re.fullmatch(r"(?:[^\[\]]+|\[[^\[\]]*\])+", item):
            raise LaunchError(f"SLURM launch: cannot read the node list {text!r}")
        parts = [[literal] if literal else _expand_ranges(group, text)
                 for literal, group in re.findall(r"([^\[\]]+)|\[([^\[\]]*)\]", item)]
        hosts += ["".join(p) for p in product(*parts)]
    if not hosts:
        raise LaunchError(f"SLURM launch: the node list {text!r} names no host")
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if depth < 0:
            raise LaunchError(f"SLURM launch: cannot read the node list {text!r}")
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    items.append(current)
    return [item.strip() for item in items if item.strip()]


def _expand_ranges(group: str, text: str) -> list[str]:
    out: list[str] = []
    for span in group.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", span)
        if m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise LaunchError(f"SLURM launch: cannot read the range [{group}] in the node list {text!r}")
        first, last = m.group(1), m.group(2) or m.group(1)
        width = len(first) if first.startswith("0") else 0
        out += [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
    return out


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Make this rank die (by ``sig``) when the launcher that started it dies, even by ``kill -9``.

    Call it first thing in a rank, from the main thread. It arms only under a launcher that is this
    process's parent: `spawn_local` (``$OPENSEEK_HAL_LAUNCHER_PID``) or torchrun's agent
    (``$TORCHELASTIC_RUN_ID``). Anywhere else (a shell, nohup, srun's step daemon, which stops its
    tasks itself) it does nothing and returns False, so a job does not die with a closed terminal.
    It uses Linux's ``PR_SET_PDEATHSIG``, which fires when the parent *thread* that started this
    process exits (`spawn_local` starts ranks from its main thread); elsewhere it returns False. After
    arming it checks ``getppid()``: a launcher that died before the call is noticed at once (this
    process then gets ``sig`` itself). Safe to call more than once (it removes
    ``$OPENSEEK_HAL_LAUNCHER_PID``, which names this process's parent, not its children's). Returns
    whether it armed.
    """
    expected: int | None = None
    if os.environ.get(LAUNCHER_PID_VAR):  # taken out: this process's own children have another parent
        try:
            expected = int(os.environ.pop(LAUNCHER_PID_VAR))
        except ValueError:
            return False
    elif not os.environ.get("TORCHELASTIC_RUN_ID"):
        return False
    if not set_parent_death_signal(sig):
        return False
    parent = os.getppid()
    if parent == 1 or (expected is not None and parent != expected):  # the launcher is already gone
        os.kill(os.getpid(), sig)
    return True


# Run in each rank before the real command: arm the parent-death signal (it survives exec), make
# sure the launcher is still the parent, then become `python <entry> <argv>`. Doing it here rather
# than in a preexec_fn keeps the launcher's fork safe while its store's threads run.
_TRAMPOLINE = (
    "import ctypes, os, sys\n"
    "prctl = getattr(ctypes.CDLL(None), 'prctl', None)\n"
    "if prctl is not None:\n"
    "    prctl(1, {sig}, 0, 0, 0)\n"
    "if os.getppid() != {parent}:\n"
    "    os._exit(1)\n"
    "os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n"
)


def spawn_local(argv: list[str], nproc_per_node: int, *, timeout: float | None = None,
                entry: Sequence[str] = DEFAULT_ENTRY, grace: float = STOP_GRACE_S) -> int:
    """Run ``python <entry> <argv>`` as ``nproc_per_node`` ranks on this host, as torchrun would; return the exit code.

    ``entry`` defaults to ``-m openseek_hal train``. Each rank gets torchrun's environment (``RANK``,
    ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK=0``, ``MASTER_ADDR=127.0.0.1``,
    ``MASTER_PORT``, ``TORCHELASTIC_USE_AGENT_STORE=True``, ...) plus `CHILD_ENV`: this process hosts
    the rendezvous store on a port the kernel picks (no race), as torchrun's agent does, with
    ``timeout`` (the job's communication timeout; default ``rendezvous.DEFAULT_TIMEOUT``) for its
    operations. Rank 0's output passes
    through; the other ranks' stderr is copied to ours with a ``[rank N]`` prefix.

    The first rank that exits non-zero ends the job: one line names it and its code, the others get
    SIGTERM and, ``grace`` seconds later, SIGKILL, and that code is returned (128 + N for a rank
    killed by signal N). SIGTERM or SIGINT here is forwarded to the ranks (a second one kills them);
    once they are gone 128 + the signal number is returned. Ranks die with this process even on
    ``kill -9`` (parent-death signal). Call it from the main thread.
    """
    if nproc_per_node < 1:
        raise UserError(f"--nproc-per-node must be at least 1, got {nproc_per_node}")
    from torch.distributed import TCPStore

    from ..comm.launcher import CHILD_ENV
    from ..comm.rendezvous import DEFAULT_TIMEOUT

    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    store = TCPStore("127.0.0.1", 0, nproc_per_node, is_master=True, wait_for_workers=False,
                     timeout=timedelta(seconds=timeout))
    base = {**os.environ, **CHILD_ENV,
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "WORLD_SIZE": str(nproc_per_node),
            "LOCAL_WORLD_SIZE": str(nproc_per_node), "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1",
            "ROLE_NAME": "default", "ROLE_WORLD_SIZE": str(nproc_per_node),
            "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
            "TORCHELASTIC_RUN_ID": uuid.uuid4().hex, "TORCHELASTIC_USE_AGENT_STORE": "True",
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
            LAUNCHER_PID_VAR: str(os.getpid())}
    if "OMP_NUM_THREADS" not in os.environ and nproc_per_node > 1:
        base["OMP_NUM_THREADS"] = "1"  # as torchrun: G ranks of all-cores OpenMP would oversubscribe
    for var in [v for v in base if v.startswith("SLURM_")]:  # the ranks' world is this one, not an srun step's
        del base[var]
    trampoline = _TRAMPOLINE.format(sig=int(signal.SIGKILL), parent=os.getpid())

    job = _LocalJob(grace)
    with job.forwarding_signals():
        try:
            for rank in range(nproc_per_node):
                if job.signal is not None:  # stopped while starting
                    break
                env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "ROLE_RANK": str(rank)}
                job.start(rank, [sys.executable, "-c", trampoline, *entry, *argv], env)
        except OSError as e:
            job.stop_all()
            job.wait_all()
            raise UserError(f"could not start rank {len(job.procs)}: {e}") from e
        code = job.wait_all()
    del store
    return code


class _LocalJob:
    """The ranks of `spawn_local`: start them, copy their stderr, stop them together."""

    def __init__(self, grace: float):
        self.grace = grace
        self.procs: list[subprocess.Popen] = []
        self.readers: list[threading.Thread] = []
        self.signal: int | None = None
        self.failed: tuple[int, int] | None = None  # (rank, exit code) of the first rank that failed
        self.kill_at: float | None = None

    def start(self, rank: int, cmd: list[str], env: dict[str, str]) -> None:
        # Rank 0 writes to our stdout/stderr; the others' stderr comes through a prefixing reader.
        # Each rank leads its own process group: a terminal's Ctrl-C reaches only us, and we forward it.
        quiet = rank != 0
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL if quiet else None,
                                stderr=subprocess.PIPE if quiet else None, start_new_session=True)
        self.procs.append(proc)
        if quiet:
            reader = threading.Thread(target=_copy_prefixed, args=(proc.stderr, f"[rank {rank}] "), daemon=True,
                                      name=f"openseek-hal-rank{rank}-stderr")
            reader.start()
            self.readers.append(reader)

    def forwarding_signals(self) -> _SignalForwarding:
        return _SignalForwarding(self)

    def on_signal(self, signum: int) -> None:
        if self.signal is not None:  # a second one: no more patience
            self.kill_all()
            return
        self.signal = signum
        _say(f"got {signal.Signals(signum).name}; stopping {len(self.procs)} rank(s)")
        self.send(signum)
        self.kill_at = time.monotonic() + self.grace

    def send(self, signum: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    def stop_all(self) -> None:
        self.send(signal.SIGTERM)
        self.kill_at = time.monotonic() + self.grace

    def kill_all(self) -> None:
        self.send(signal.SIGKILL)

    def wait_all(self) -> int:
        """Watch the ranks until all have exited; return the job's exit code."""
        pending = set(range(len(self.procs)))
        while pending:
            for rank in sorted(pending):
                code = self.procs[rank].poll()
                if code is None:
                    continue
                pending.discard(rank)
                if code != 0 and self.failed is None and self.signal is None:
                    self.failed = (rank, 128 - code if code < 0 else code)
                    how = (f"was killed by {signal.Signals(-code).name}" if code < 0 and -code in _SIGNALS
                           else f"exited with code {code}")
                    _say(f"rank {rank} {how}" + (f"; stopping the other {len(pending)} rank(s)" if pending else ""))
                    self.stop_all()
            if self.kill_at is not None and time.monotonic() >= self.kill_at and pending:
                self.kill_all()
                self.kill_at = None
            if pending:
                time.sleep(0.05)
        for reader in self.readers:
            reader.join(2.0)
        if self.signal is not None:
            return 128 + self.signal
        return self.failed[1] if self.failed is not None else 0


_SIGNALS = {int(s) for s in signal.Signals}


class _SignalForwarding:
    """While active (in the main thread), SIGTERM and SIGINT go to the job's ranks instead of killing us."""

    def __init__(self, job: _LocalJob):
        self.job = job
        self.saved: dict[int, object] = {}

    def __enter__(self) -> _SignalForwarding:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self.saved[signum] = signal.signal(signum, lambda s, _frame: self.job.on_signal(s))
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.saved.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]


def _copy_prefixed(stream: IO[bytes], prefix: str) -> None:
    out = getattr(sys.stderr, "buffer", None)
    for line in iter(stream.readline, b""):
        if out is not None:
            out.write(prefix.encode() + line)
            out.flush()
        else:
            sys.stderr.write(prefix + line.decode(errors="replace"))
            sys.stderr.flush()
    stream.close()


def _say(message: str) -> None:
    sys.stderr.write(f"openseek-hal: {message}\n")
    sys.stderr.flush()
