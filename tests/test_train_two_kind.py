"""A job whose ranks use different backends (two chip kinds), trained through ``hier``, on the CPU.

The second kind is ``cpu-twin``: a plugin backend (a dist-info folder on PYTHONPATH, as a vendor's
package would be installed) whose ops are the CPU's own, so that the two kinds compute the same
numbers and what differs from one rank with the whole batch is only the reduction order. The ranks
are started as users start them: ``train -n 2 --backend cpu,cpu-twin`` and two torchrun "nodes"
started with different ``--backend``.

Bounds. float64, as tests/test_train_parallel.py: AdamW turns a gradient difference dg into an
update difference of at most lr * dg / eps / (1 - beta1), and dg <= n * u * |g| (n summed terms,
|g| <= 1 after clipping, u = 2**-53). float32 (u = 2**-24), where that worst case is larger than an
update: the update g / (|g| + eps) moves by dg * eps / (|g| + eps)**2 <= n * u / 4 for dg = n * u * |g|
(largest at |g| = eps) in the first step; later steps divide by the square root of a second moment
that can shrink towards eps**2, which amplifies again (with eps = 1e-8 the routed experts' weights
differed by 5e-6 after 3 steps, measured), so the float32 run takes eps = 1e-3, and the bound is
lr * n * u per step plus one rounding of the new weight (u * |w|, |w| <= 1: the norms) in each run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from openseek_hal.comm import launch
from openseek_hal.errors import ConfigError
from openseek_hal.train.checkpoint import CheckpointReader
from openseek_hal.train.config import load_config
from openseek_hal.train.kinds import job_adaptor, job_weight_mode, parse_backends, rank_backend

ARGS = ["--batch-size", "8", "--seq-len", "32", "--set", "tokenizer_vocab_size=512", "--set",
        "model.num_hidden_layers=2", "--set", "sample_tokens=2", "--set", "eval_batches=1", "--set", "log_every=1",
        "--set", "warmup_steps=2", "--set", "lr=1e-2", "--set", "comm_timeout=30", "--set", "bucket_mb=0.05"]
STEPS = 3
LR, BETA1, BATCH, SEQ = 1e-2, 0.9, 8, 32

TWIN = '''
from openseek_hal.backends.cpu import CPUBackend


class CPUTwin(CPUBackend):
    """The CPU under another name: a second chip kind with the CPU's numbers."""

    name = "cpu-twin"
    priority = -1
'''


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_kind")
    site = root / "site"
    info = site / "cpu_twin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cpu_twin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[openseek_hal.backends]\ncpu-twin = cpu_twin:CPUTwin\n")
    (site / "cpu_twin.py").write_text(TWIN)
    e = dict(os.environ, OPENSEEK_HAL_CACHE=str(root / "cache"), OMP_NUM_THREADS="1",
             PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    e.pop("OPENSEEK_HAL_BACKEND", None)
    # the tokenizer is trained once, before any parallel run reads it from the cache
    subprocess.run([sys.executable, "-m", "openseek_hal", "train", "--steps", "1", "--out", str(root / "warm"),
                    "--set", "save=false", *ARGS], env=e, check=True, capture_output=True)
    return e


def _train(args: list[str], env: dict, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable, "-m", "openseek_hal"]) + ["train", *args, *ARGS]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _bound(unit_roundoff: float, eps: float) -> float:
    return STEPS * LR * BATCH * SEQ * unit_roundoff / eps / (1 - BETA1)


def _fp32_bound() -> float:
    u = 2.0**-24
    return STEPS * (LR * BATCH * SEQ * u + 2 * u)


def _assert_same_weights(a: Path, b: Path, bound: float) -> None:
    wa, wb = CheckpointReader(a).full_state_dict(), CheckpointReader(b).full_state_dict()
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wb[name].dtype == wa[name].dtype, name
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=bound, msg=name)


def test_two_kinds_from_one_command_match_one_rank_in_float64(tmp_path, env):
    """``train -n 2 --backend cpu,cpu-twin``: local rank i on backend i, DP 2 (ZeRO-1) through hier."""
    fp64 = ["--steps", str(STEPS), "--set", "dtype=fp64"]
    one = _train([*fp64, "--out", str(tmp_path / "one"), "--backend", "cpu"], env)
    assert one.returncode == 0, one.stderr
    two = _train([*fp64, "--out", str(tmp_path / "two"), "-n", "2", "--backend", "cpu,cpu-twin"], env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "backends rank 0: cpu, rank 1: cpu-twin through hier" in two.stdout
    bound = _bound(2.0**-53, 1e-8)
    assert bound < 1e-5  # far below one update (lr = 1e-2): the comparison means something
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-9)
    _assert_same_weights(tmp_path / "one", tmp_path / "two", bound)
    manifest = json.loads((tmp_path / "two" / "checkpoints" / f"step_{STEPS:06d}" / "manifest.json").read_text())
    assert manifest["world_size"] == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(out: Path, env: dict, node_args: list[list[str]]) -> list[tuple[int, str, str]]:
    """torchrun --nnodes 2 --nproc-per-node 1 on this host (static rendezvous: node n is rank n), each
    "node" with its own extra options; (exit code, stdout, stderr) of each."""
    port = _free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(n), "--master-addr", "127.0.0.1", "--master-port", str(port),
                               "-m", "openseek_hal", "train", "--steps", str(STEPS), "--out", str(out), *ARGS, *extra],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n, extra in enumerate(node_args)]
    outs = [p.communicate(timeout=300) for p in nodes]
    return [(p.returncode, *o) for p, o in zip(nodes, outs)]


def test_two_nodes_started_with_their_own_backend_train_fp32_and_match_one_rank(tmp_path, env):
    """Nodes started with different ``--backend`` (the one option that may differ): ``dtype: auto`` takes the
    job's one regime, fp32 on both kinds; losses and weights within the float32 reduction-order bound."""
    eps = ["--set", "eps=1e-3"]
    one = _train(["--steps", str(STEPS), "--out", str(tmp_path / "one"), "--backend", "cpu", "--set", "dtype=fp32",
                  *eps], env)
    assert one.returncode == 0, one.stderr
    outs = _two_nodes(tmp_path / "two", env, [["--backend", "cpu", *eps], ["--backend", "cpu-twin", *eps]])
    assert [o[0] for o in outs] == [0, 0], outs[0][2][-2000:] + outs[1][2][-2000:]
    assert "weights float32, moments float32" in outs[0][1]  # dtype auto: the job's one regime
    bound = _fp32_bound()
    assert bound < 1e-5  # a thousandth of one update (lr = 1e-2)
    # a loss is a mean over the batch: its terms in another order move it by about n * u
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=BATCH * SEQ * 2.0**-24)
    _assert_same_weights(tmp_path / "one", tmp_path / "two", bound)


def test_a_mixed_job_refuses_an_adaptor_that_cannot_span_kinds(tmp_path, env):
    run = _train(["--steps", "1", "--out", str(tmp_path / "run"), "-n", "2", "--backend", "cpu,cpu-twin",
                  "--set", "comm_adaptor=torch"], env)
    assert run.returncode == 2, run.stderr[-2000:]
    assert ("comm_adaptor 'torch' cannot span chip kinds, but the ranks use different backends "
            "(rank 0: cpu, rank 1: cpu-twin): use comm_adaptor hier") in run.stderr
    assert "Traceback" not in run.stderr


def test_a_per_rank_backend_list_must_fit_the_ranks_of_the_node(tmp_path, env):
    run = _train(["--steps", "1", "--out", str(tmp_path / "run"), "-n", "4", "--backend", "cpu=2,cpu-twin"], env)
    assert run.returncode == 2 and "names 3 per-rank backends, but this node runs 4 rank(s)" in run.stderr, run.stderr


# -- the pieces, without processes ----------------------------------------------------------------

def test_backend_lists_and_counts_parse_and_pick_each_ranks_device(monkeypatch):
    monkeypatch.delenv("OPENSEEK_HAL_BACKEND", raising=False)
    assert parse_backends("cuda,cpu") == ["cuda", "cpu"]
    assert parse_backends("cuda=2, cpu") == ["cuda", "cuda", "cpu"]
    with pytest.raises(ConfigError, match="cannot read 'cuda=0'"):
        parse_backends("cuda=0,cpu")
    with pytest.raises(ConfigError, match="cannot read ''"):
        load_config(None, {"backend": "cuda,,cpu"})
    # one name: every rank, on the device of its local rank; a list: the next device of the rank's type
    assert rank_backend("cuda", 3, 4) == ("cuda", 3)
    assert rank_backend("cpu,cuda,cuda", 2, 3) == ("cuda", 1)
    assert rank_backend(None, 0, 2) == (None, 0)
    monkeypatch.setenv("OPENSEEK_HAL_BACKEND", "cuda,cpu")  # read per rank when --backend is not given
    assert rank_backend(None, 1, 2) == ("cpu", 0)
    with pytest.raises(ConfigError, match=r"\$OPENSEEK_HAL_BACKEND 'cuda,cpu' names 2 per-rank backends, but this "
                                          r"node runs 1 rank\(s\): start it with -n 2"):
        rank_backend(None, 0, 1)


def test_a_mixed_job_takes_one_regime_and_a_spanning_adaptor():
    assert job_weight_mode("auto", {"cuda", "cpu"}) == "fp32"
    assert job_weight_mode("auto", {"cuda"}) == "bf16" and job_weight_mode("auto", {"cpu"}) == "fp32"
    assert job_weight_mode("bf16", {"cuda", "cpu"}) == "bf16"  # an explicit dtype holds on every rank
    assert job_adaptor("", ["cuda", "cuda"]) == "" and job_adaptor("nccl", ["cuda", "cuda"]) == "nccl"
    assert job_adaptor("", ["cuda", "cpu"]) == "hier" and job_adaptor("hier", ["cuda", "cpu"]) == "hier"
    with pytest.raises(ConfigError, match="comm_adaptor 'nccl' cannot span chip kinds.*rank 0: cuda, rank 1: cpu"):
        job_adaptor("nccl", ["cuda", "cpu"])


def _check(comm, cfg, field, values):
    from openseek_hal.train.trainer import _check_same_config

    return _check_same_config(dataclasses.replace(cfg, **{field: values[comm.rank]}), comm,
                              ["cpu", "cpu-twin"][comm.rank])


def test_the_config_check_lets_only_the_backend_differ(tmp_path):
    """The start-of-job check (the trainer's own function, on 2 gloo ranks): backend may differ, nothing else."""
    cfg = load_config(None, {"out": str(tmp_path)})
    names = launch(_check, 2, args=(cfg, "backend", ["cpu", "cpu-twin"]), timeout=60)
    assert names == [["cpu", "cpu-twin"]] * 2  # every rank learns every rank's backend
    for field, values in (("lr", [1e-3, 2e-3]), ("dtype", ["fp32", "bf16"]), ("comm_adaptor", ["hier", "host"])):
        with pytest.raises(ConfigError, match="rank 1 started with another configuration"):
            launch(_check, 2, args=(cfg, field, values), timeout=60)
