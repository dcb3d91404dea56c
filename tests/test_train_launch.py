"""The trainer as users launch it: torchrun over two "nodes", `train -n 2`, kill -9 and exact resume, a dead rank.

Each test starts real processes through the command line, on gloo, with the tiny model in float64
where runs along different reduction orders are compared (see test_train_parallel.py for the bound).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ARGS = ["--batch-size", "8", "--seq-len", "32", "--set", "tokenizer_vocab_size=512", "--set",
        "model.num_hidden_layers=2", "--set", "sample_tokens=2", "--set", "eval_batches=1", "--set", "log_every=1",
        "--set", "warmup_steps=2", "--set", "lr=1e-2", "--set", "comm_timeout=20"]


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ, OPENSEEK_HAL_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    # the tokenizer is trained once, before any parallel run reads it from the cache
    subprocess.run([sys.executable, "-m", "openseek_hal", "train", "--steps", "1", "--out", str(tmp_path / "warm"),
                    "--set", "save=false", *ARGS], env=e, check=True, capture_output=True)
    return e


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _train(args: list[str], env: dict, launcher: list[str] | None = None, **kw) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable, "-m", "openseek_hal"]) + ["train", *args, *ARGS]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, **kw)


def _children(pid: int) -> list[int]:
    """Child process ids of ``pid``, from /proc/*/stat (every Linux kernel has it)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # the field after the state is the parent's pid
            out.append(int(stat.parent.name))
    return sorted(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_nodes_of_two_ranks_match_one_rank(tmp_path, env):
    """torchrun --nnodes 2 --nproc-per-node 2 (a local c10d rendezvous): 4 ranks train what 1 rank does."""
    one = _train(["--steps", "3", "--out", str(tmp_path / "one"), "--set", "dtype=fp64"], env)
    assert one.returncode == 0, one.stderr
    port = _free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
                               "--node-rank", str(n), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                               "--rdzv-id", "t", "-m", "openseek_hal", "train", "--steps", "3", "--out",
                               str(tmp_path / "four"), "--set", "dtype=fp64", *ARGS],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (0, 1)]
    outs = [p.communicate(timeout=300) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert _losses(tmp_path / "four") == pytest.approx(_losses(tmp_path / "one"), rel=1e-9)
    manifest = json.loads((tmp_path / "four" / "checkpoints" / "step_000003" / "manifest.json").read_text())
    assert manifest["world_size"] == 4


def test_kill_9_of_a_rank_then_resume_is_bitwise_exact(tmp_path, env):
    """`train -n 2`: kill -9 one rank after a checkpoint; the launcher ends the job; --resume replays exactly."""
    steps = ["--steps", "12", "--set", "save_every=2", "-n", "2"]
    straight = _train([*steps, "--out", str(tmp_path / "straight")], env)
    assert straight.returncode == 0, straight.stderr
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "openseek_hal", "train", *steps, "--out", str(run), *ARGS],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    latest = run / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not latest.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert latest.exists(), "no checkpoint before the kill"
    ranks = _children(proc.pid)
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "was killed by SIGKILL" in err  # the launcher names the rank, stops the other
    resumed = _train(["--resume", str(run), "-n", "2"], env)  # an interrupted save's partial folder is removed
    assert resumed.returncode == 0, resumed.stderr
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".step")]
    final = json.loads((run / "checkpoints" / "step_000012" / "state.json").read_text())["losses"]
    expected = json.loads((tmp_path / "straight" / "checkpoints" / "step_000012" / "state.json").read_text())["losses"]
    assert final == expected  # bitwise
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))  # every step once, after the resume too


def test_a_dead_rank_fails_the_others_within_the_timeout_naming_it(tmp_path, env):
    """Two env:// ranks with no launcher to clean up: rank 1 is killed; rank 0 fails on its own, naming rank 1."""
    port = _free_port()
    procs = []
    for rank in (0, 1):
        e = dict(env, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", GROUP_RANK="0",
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "openseek_hal", "train", "--steps", "100000", "--out",
                                       str(tmp_path / "run"), *ARGS[:-2], "--set", "comm_timeout=10"],
                                      env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-2000:]
        time.sleep(0.05)
    procs[1].kill()
    killed_at = time.monotonic()
    _, err = procs[0].communicate(timeout=60)
    assert procs[0].returncode not in (0, None)
    assert time.monotonic() - killed_at < 10 + 15  # one timeout, plus teardown
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "rank 1" in lines[0], err[-3000:]
