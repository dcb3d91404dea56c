"""Launching: the world from torchrun/SLURM/nothing, torchrun across two "nodes", `spawn_local`'s ranks
living and dying with their parent, and rendezvous/launch faults that fail within one timeout."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import comm_workers as w
import pytest
import torch.distributed as torch_dist

from openseek_hal.comm import CollectiveTimeoutError, launch
from openseek_hal.comm.launcher import GRACE_S
from openseek_hal.comm.rendezvous import LINGER_S
from openseek_hal.train.cli import _forward_args
from openseek_hal.train.launch import (
    LAUNCHER_PID_VAR,
    SLURM_PORT_BASE,
    SLURM_PORT_SPAN,
    LaunchError,
    World,
    die_with_parent,
    expand_nodelist,
    spawn_local,
    tasks_per_node,
    world_from_env,
)

ROOT = Path(__file__).resolve().parent.parent
TARGET = str(Path(__file__).with_name("launch_target.py"))
WORLD_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
              "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE", LAUNCHER_PID_VAR)


@pytest.fixture
def clean_env(monkeypatch):
    for var in list(os.environ):
        if var in WORLD_VARS or var.startswith("SLURM_"):
            monkeypatch.delenv(var)
    return monkeypatch


def _env(**extra: str) -> dict[str, str]:
    """Our environment for a subprocess: this worktree first on the path, no launcher's variables."""
    env = {k: v for k, v in os.environ.items() if k not in WORLD_VARS and not k.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return {**env, **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _wait_for(predicate, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _pids(piddir: Path, n: int, seconds: float = 60) -> list[int]:
    assert _wait_for(lambda: all((piddir / str(r)).exists() for r in range(n)), seconds), "ranks did not start"
    return [int((piddir / str(r)).read_text()) for r in range(n)]


def _reap(pids: list[int]) -> None:
    for pid in pids:  # only processes this test started
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


# --- world_from_env -------------------------------------------------------------------------------

def test_single_process_without_launcher_variables(clean_env):
    assert world_from_env() == World(0, 1, 0, 1, 0, "single")
    assert "RANK" not in os.environ


def test_torchrun_variables(clean_env):
    for var, value in dict(RANK="5", WORLD_SIZE="8", LOCAL_RANK="1", LOCAL_WORLD_SIZE="4", GROUP_RANK="1",
                           MASTER_ADDR="10.0.0.1", MASTER_PORT="29500").items():
        clean_env.setenv(var, value)
    world = world_from_env()
    assert world == World(rank=5, world_size=8, local_rank=1, local_world_size=4, node_rank=1, source="torchrun")
    assert not world.is_main


def test_torchrun_under_srun_is_torchrun(clean_env):
    for var, value in dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", GROUP_RANK="1",
                           MASTER_ADDR="h1", MASTER_PORT="29500", TORCHELASTIC_RUN_ID="x", SLURM_PROCID="1",
                           SLURM_NTASKS="2").items():
        clean_env.setenv(var, value)
    assert world_from_env() == World(3, 4, 1, 2, 1, "torchrun")


@pytest.mark.parametrize("env, fragment", [
    (dict(RANK="0"), "$RANK set but $WORLD_SIZE, $LOCAL_RANK, $LOCAL_WORLD_SIZE, $GROUP_RANK, $MASTER_ADDR, "
                     "$MASTER_PORT not"),
    (dict(RANK="4", WORLD_SIZE="4", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", GROUP_RANK="0", MASTER_ADDR="h",
          MASTER_PORT="1"), "rank 4 is not in a world of 4"),
    (dict(RANK="0", WORLD_SIZE="two", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", GROUP_RANK="0", MASTER_ADDR="h",
          MASTER_PORT="1"), "$WORLD_SIZE must be an integer, got 'two'"),
    (dict(SLURM_PROCID="0", SLURM_LOCALID="0"), "$SLURM_PROCID is set but $SLURM_NTASKS, $SLURM_NODEID, "
                                                "$SLURM_TASKS_PER_NODE, $SLURM_JOB_NODELIST, $SLURM_JOB_ID not"),
    (dict(SLURM_PROCID="1", SLURM_NTASKS="4", SLURM_LOCALID="1", SLURM_NODEID="0", SLURM_TASKS_PER_NODE="2(x3)",
          SLURM_JOB_NODELIST="n[1-3]", SLURM_JOB_ID="7"), "adds up to 6 tasks, $SLURM_NTASKS=4"),
    (dict(SLURM_PROCID="1", SLURM_NTASKS="4", SLURM_LOCALID="1", SLURM_NODEID="0", SLURM_TASKS_PER_NODE="2(x2)",
          SLURM_JOB_NODELIST="n[1-2]", SLURM_JOB_ID="7", RANK="3"), "$RANK=3 but SLURM says 1"),
    (dict(SLURM_PROCID="1", SLURM_NTASKS="4", SLURM_LOCALID="2", SLURM_NODEID="0", SLURM_NTASKS_PER_NODE="2",
          SLURM_JOB_NODELIST="n[1-2]", SLURM_JOB_ID="7"), "local rank 2 is not in 2 ranks per node"),
])
def test_partial_or_contradictory_variables_are_one_clear_error(clean_env, env, fragment):
    for var, value in env.items():
        clean_env.setenv(var, value)
    with pytest.raises(LaunchError) as info:
        world_from_env()
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_slurm_variables_export_the_env_rendezvous(clean_env):
    for var, value in dict(SLURM_PROCID="5", SLURM_NTASKS="7", SLURM_LOCALID="0", SLURM_NODEID="2",
                           SLURM_TASKS_PER_NODE="2(x2),3", SLURM_JOB_NODELIST="gpu[07-09],login1",
                           SLURM_JOB_ID="123456").items():
        clean_env.setenv(var, value)
    world = world_from_env()
    assert world == World(rank=5, world_size=7, local_rank=0, local_world_size=3, node_rank=2, source="slurm")
    port = SLURM_PORT_BASE + 123456 % SLURM_PORT_SPAN
    assert {v: os.environ[v] for v in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                       "LOCAL_WORLD_SIZE", "GROUP_RANK")} == dict(
        MASTER_ADDR="gpu07", MASTER_PORT=str(port), RANK="5", WORLD_SIZE="7", LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="3", GROUP_RANK="2")
    assert world_from_env() == world  # again, with its own exports in the environment


def test_slurm_keeps_a_given_master_and_ntasks_per_node(clean_env):
    for var, value in dict(SLURM_PROCID="0", SLURM_NTASKS="4", SLURM_LOCALID="0", SLURM_NODEID="0",
                           SLURM_NTASKS_PER_NODE="2", SLURM_TASKS_PER_NODE="2(x2)", SLURM_NODELIST="a,b",
                           MASTER_ADDR="ib-a", MASTER_PORT="31000").items():
        clean_env.setenv(var, value)
    assert world_from_env() == World(0, 4, 0, 2, 0, "slurm")
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("ib-a", "31000")


@pytest.mark.parametrize("text, hosts", [
    ("node01", ["node01"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("a[8-10],b", ["a8", "a9", "a10", "b"]),
    ("gpu[1-2]-ib,cpu[009-011]", ["gpu1-ib", "gpu2-ib", "cpu009", "cpu010", "cpu011"]),
    ("r[1-2]n[1,3]", ["r1n1", "r1n3", "r2n1", "r2n3"]),
])
def test_nodelist_expansion(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize("text", ["node[1-", "node]1[", "n[3-1]", "n[a-b]", ""])
def test_bad_nodelists_are_errors(text):
    with pytest.raises(LaunchError, match="node list"):
        expand_nodelist(text)


def test_tasks_per_node():
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    with pytest.raises(LaunchError):
        tasks_per_node("2x3")


def test_die_with_parent_does_nothing_without_a_launcher(clean_env):
    assert die_with_parent() is False


# --- torchrun, two nodes on one host ---------------------------------------------------------------

def test_torchrun_two_nodes_of_two_ranks(tmp_path):
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
                               "2", "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint",
                               f"127.0.0.1:{port}", "--rdzv-id", "test", TARGET, "world"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)
             for node in (0, 1)]
    try:
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    lines = sorted(line for out, _ in outs for line in out.splitlines() if line.startswith("world "))
    assert len(lines) == 4, lines
    for rank, line in enumerate(lines):
        assert line.startswith(f"world rank={rank} size=4 local={rank % 2}/2 node={rank // 2} source=torchrun "
                               "armed=True sum=10 "), line


# --- spawn_local ---------------------------------------------------------------------------------

def test_spawn_local_gives_ranks_torchruns_world(clean_env, capfd):
    clean_env.setenv("PYTHONPATH", str(ROOT))
    code = spawn_local(["world"], 2, timeout=30, entry=[TARGET])
    out, err = capfd.readouterr()
    assert code == 0, err
    assert "world rank=0 size=2 local=0/2 node=0 source=torchrun armed=True sum=3 nccl_nvls=0 agent_store=True" in out
    assert "world rank=1" not in out  # only rank 0's output passes through ...
    assert "[rank 1] stderr of rank 1" in err and "stderr of rank 0" in err  # ... and every rank's stderr


def test_spawn_local_stops_the_job_when_a_rank_fails(clean_env, capfd, tmp_path):
    clean_env.setenv("PYTHONPATH", str(ROOT))
    start = time.monotonic()
    code = spawn_local(["fail", str(tmp_path)], 2, timeout=30, entry=[TARGET], grace=2)
    elapsed = time.monotonic() - start
    _, err = capfd.readouterr()
    assert code == 3
    assert "openseek-hal: rank 1 exited with code 3; stopping the other 1 rank(s)" in err.splitlines()
    assert "[rank 1] rank 1 fails on purpose" in err
    assert not _alive(int((tmp_path / "0").read_text()))
    assert elapsed < 30  # rank 0 would sleep 120 s


def _parent(tmp_path: Path) -> subprocess.Popen:
    code = (f"import sys; from openseek_hal.train.launch import spawn_local; "
            f"sys.exit(spawn_local(['sleep', {str(tmp_path)!r}], 2, timeout=30, entry=[{TARGET!r}], grace=3))")
    return subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_sigterm_to_the_parent_stops_the_ranks(tmp_path):
    parent = _parent(tmp_path)
    pids: list[int] = []
    try:
        pids = _pids(tmp_path, 2)
        parent.send_signal(signal.SIGTERM)
        _, err = parent.communicate(timeout=20)
        assert parent.returncode == 128 + signal.SIGTERM, err
        assert "openseek-hal: got SIGTERM; stopping 2 rank(s)" in err
        assert not any(_alive(pid) for pid in pids)  # the parent exits only after its ranks
    finally:
        parent.kill()
        _reap(pids)


def test_kill_9_of_the_parent_takes_the_ranks_along(tmp_path):
    parent = _parent(tmp_path)
    pids: list[int] = []
    try:
        pids = _pids(tmp_path, 2)
        assert all(_alive(pid) for pid in pids)
        parent.kill()
        parent.wait(10)
        assert _wait_for(lambda: not any(_alive(pid) for pid in pids), 5), [p for p in pids if _alive(p)]
    finally:
        _reap(pids)


def test_kill_9_of_a_launch_caller_takes_its_ranks_along(tmp_path):
    code = (f"import comm_workers as w; from openseek_hal.comm import launch; "
            f"launch(w.rank_one_never_joins, 2, timeout=60, args=({str(tmp_path)!r},))")
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env["PYTHONPATH"]])
    caller = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    pids: list[int] = []
    try:
        pids = _pids(tmp_path, 2)
        caller.kill()
        caller.wait(10)
        assert _wait_for(lambda: not any(_alive(pid) for pid in pids), 5), [p for p in pids if _alive(p)]
    finally:
        caller.kill()
        _reap(pids)


# --- the CLI ---------------------------------------------------------------------------------------

def test_cli_forwards_every_option_but_nproc_per_node():
    params = dict(backend="cpu", steps=3, config_path="c.yaml", data=None, out="o", resume=None, batch_size=None,
                  seq_len=None, lr=0.001, seed=None, nproc_per_node=2, model_preset="tiny",
                  sets=("a=1", "model.x=2"))
    assert _forward_args(params) == ["--backend", "cpu", "--steps", "3", "--config", "c.yaml", "--out", "o",
                                     "--lr", "0.001", "--model", "tiny", "--set", "a=1", "--set", "model.x=2"]


@pytest.mark.parametrize("args, fragment", [
    (["train", "--data-parallel", "2"], "No such option '--data-parallel'"),
    (["train", "-n", "0"], "Invalid value for '--nproc-per-node'"),
    (["train", "-n", "3"], "3 ranks asked for, but this process is rank 1 of a torchrun job with 2 rank(s) per node"),
])
def test_cli_launch_errors_are_one_line_exit_2(args, fragment):
    env = _env(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", GROUP_RANK="0",
               MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    r = subprocess.run([sys.executable, "-m", "openseek_hal", *args], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("openseek-hal: error: ") and fragment in lines[0], r.stderr


# --- faults within one timeout ---------------------------------------------------------------------

def _env_rank(rank: int, world_size: int, port: int, timeout: float) -> subprocess.Popen:
    env = _env(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
               GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return subprocess.Popen([sys.executable, TARGET, "rendezvous", str(timeout)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_rank_that_never_starts_is_named_by_every_rank_within_the_timeout():
    timeout, port = 5.0, _free_port()
    procs = [_env_rank(rank, 3, port, timeout) for rank in (0, 1)]  # rank 2 never starts
    try:
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rank, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 1, err[-2000:]
        line = out.strip()
        assert line.startswith("CollectiveTimeoutError after "), (out, err)
        assert (f"rendezvous on rank {rank} of group 'world' (global ranks 0-2) timed out after 5 s: "
                f"rank 2 never joined (store 127.0.0.1:{port})") in line
        assert float(line.split()[2]) < timeout + LINGER_S + 0.5
        assert "Traceback" not in err


def test_a_missing_store_host_is_named_within_the_timeout():
    timeout, port = 3.0, _free_port()
    p = _env_rank(1, 3, port, timeout)  # rank 0, which hosts the store under env://, never starts
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1, err[-2000:]
    assert (f"the store at 127.0.0.1:{port}, hosted by rank 0, did not answer within 3 s" in out
            and "rank 0 never started or is unreachable" in out), out
    assert float(out.split()[2]) < timeout + 0.5
    assert "Traceback" not in err and "socket.cpp" not in err


def test_a_hung_rank_makes_launch_return_within_one_timeout(tmp_path):
    timeout = 4.0
    with pytest.raises(CollectiveTimeoutError) as info:
        launch(w.hang_on_rank_one, 2, timeout=timeout, args=(str(tmp_path),))
    since_hang = time.time() - float((tmp_path / "hang").read_text())
    assert timeout - 0.5 < since_hang < timeout + GRACE_S + 1.5  # was 2 x timeout + GRACE_S
    assert "all_reduce on rank 0 of group 'world'" in str(info.value)
    assert any("rank 1 was still running" in note for note in info.value.__notes__)


@pytest.mark.parametrize("error, line", [
    (CollectiveTimeoutError("rendezvous on rank 0 of group 'world' (global ranks 0-2) timed out after 5 s: rank 2 "
                            "never joined (store 127.0.0.1:1)"),
     "openseek-hal: error: rendezvous on rank 0 of group 'world' (global ranks 0-2) timed out after 5 s: rank 2 "
     "never joined (store 127.0.0.1:1)"),
    (torch_dist.DistStoreError("Timed out after 5 seconds waiting for clients. 2/3 clients joined.\nmore"),
     "openseek-hal: error: torch.distributed: DistStoreError: Timed out after 5 seconds waiting for clients. "
     "2/3 clients joined."),
])
def test_cli_prints_collective_and_store_failures_as_one_line_exit_1(capsys, error, line):
    import click

    from openseek_hal.cli import cli, main

    @click.command("fails-for-test")
    def fails() -> None:
        raise error

    cli.add_command(fails)
    try:
        with pytest.raises(SystemExit) as info:
            main(["fails-for-test"])
    finally:
        cli.commands.pop("fails-for-test")
    assert info.value.code == 1
    assert capsys.readouterr().err.splitlines() == [line]
