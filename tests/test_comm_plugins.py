"""Communicator adaptors as plugins: discovery and its failure modes, the backend's own collective path,
and the out-of-tree example package (examples/acme_ccl) installed into a temporary folder, found,
passing `conform --level comm` and carrying a 2-rank training run whose losses match the torch adaptor's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from openseek_hal.comm import CollectiveError, adaptor_available, adaptor_names, create
from openseek_hal.comm.adaptors import (
    UnknownAdaptorError,
    discover_adaptors,
    get_adaptor,
    list_adaptors,
)
from openseek_hal.comm.rendezvous import process_group_backend

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "acme_ccl"


def _write_plugin(root: Path, dist: str, entry_lines: str, modules: dict[str, str]) -> None:
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[openseek_hal.comm_adaptors]\n{entry_lines}\n")
    for name, src in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(src))


_ADAPTOR = """
    from openseek_hal.comm.adaptors import Adaptor
    from openseek_hal.comm import torch_dist

    class ChipAdaptor(Adaptor):
        name = {name!r}
        device_types = {device_types!r}

        @classmethod
        def is_available(cls):
            return {available!r}, "" if {available!r} else "libchipccl.so.3 not found"

        @classmethod
        def create(cls, backend, pg, **kwargs):
            return torch_dist.create(backend, pg, **kwargs)
"""


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """Fake installed adaptor packages (dist-info folders on sys.path); discovery is reset afterwards."""
    _write_plugin(tmp_path, "good_ccl", "goodccl = good_ccl_mod:detect", {"good_ccl_mod": _ADAPTOR.format(
        name="goodccl", device_types=("cpu",), available=True) + "\n    def detect():\n        return ChipAdaptor\n"})
    _write_plugin(tmp_path, "absent_ccl", "absentccl = absent_ccl_mod:ChipAdaptor", {"absent_ccl_mod": _ADAPTOR.format(
        name="absentccl", device_types=("npu",), available=False)})
    _write_plugin(tmp_path, "broken_ccl", "brokenccl = broken_ccl_mod:ChipAdaptor",
                  {"broken_ccl_mod": "raise ImportError('vendor library libbroken.so not found')"})
    _write_plugin(tmp_path, "dup_a", "dup = dup_a_mod:ChipAdaptor",
                  {"dup_a_mod": _ADAPTOR.format(name="dup", device_types=(), available=True)})
    _write_plugin(tmp_path, "dup_b", "dup = dup_b_mod:ChipAdaptor",
                  {"dup_b_mod": _ADAPTOR.format(name="dup", device_types=(), available=True)})
    _write_plugin(tmp_path, "fake_torch", "torch = fake_torch_mod:ChipAdaptor",
                  {"fake_torch_mod": _ADAPTOR.format(name="torch", device_types=(), available=True)})
    monkeypatch.syspath_prepend(str(tmp_path))
    discover_adaptors(refresh=True)
    yield tmp_path
    monkeypatch.undo()
    discover_adaptors(refresh=True)


def test_in_tree_adaptors_register_through_the_entry_point_group():
    found, errors = discover_adaptors(refresh=True)
    assert adaptor_names()[:4] == ["torch", "nccl", "host", "hier"] and not errors
    infos = {i.name: i for i in list_adaptors()}
    assert infos["nccl"].device_types == ("cuda",) and infos["torch"].device_types == ()
    assert all(infos[n].package == "openseek-hal" for n in ("torch", "nccl", "host", "hier"))
    assert adaptor_available("torch", "cpu") == (True, "")
    ok, reason = adaptor_available("nccl", "cpu")
    assert not ok and reason  # no CuPy here, or (with it) not a cuda device


def test_plugins_are_found_and_their_faults_are_reported(plugins):
    found, errors = discover_adaptors()
    assert found["goodccl"].__module__ == "good_ccl_mod"  # through the zero-argument function
    assert adaptor_available("goodccl", "cpu") == (True, "")
    assert adaptor_available("goodccl", "npu") == (False, "it serves device types cpu, not 'npu'")
    assert adaptor_available("absentccl") == (False, "libchipccl.so.3 not found")
    # a broken plugin is reported and never breaks the others
    assert "libbroken.so" in errors["brokenccl"]
    with pytest.raises(UnknownAdaptorError, match="plugin failed to load: ImportError: vendor library libbroken"):
        get_adaptor("brokenccl")
    # one name from two packages: unusable, naming both, whatever the install order
    assert "dup" not in found and "'dup_a'" in errors["dup"] and "'dup_b'" in errors["dup"]
    # a plugin reusing an in-tree name takes the name away from both, loudly
    assert "torch" not in found and "'openseek-hal'" in errors["torch"] and "'fake_torch'" in errors["torch"]
    infos = {i.name: i for i in list_adaptors()}
    assert not infos["brokenccl"].available and infos["brokenccl"].package == "broken_ccl"
    assert infos["goodccl"].available and infos["goodccl"].package == "good_ccl"


def test_create_refuses_what_cannot_run_before_any_traffic(plugins, monkeypatch):
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    installed = "installed: nccl, host, hier, absentccl, goodccl;"  # torch and dup are taken away
    with pytest.raises(UnknownAdaptorError, match=f"unknown adaptor 'nope' \\({installed}"):
        create("nope", "cpu")
    with pytest.raises(UnknownAdaptorError, match="more than one package"):
        create("dup", "cpu")
    with pytest.raises(CollectiveError, match="adaptor 'absentccl' is not available: libchipccl.so.3"):
        create("absentccl", "cpu")
    npu = types.SimpleNamespace(name="npu-test", device_type="npu")  # create stops before touching a device
    with pytest.raises(CollectiveError, match="'goodccl' serves device types cpu, not 'npu' .backend 'npu-test'"):
        create("goodccl", npu)


def test_cli_lists_adaptors_and_errors_are_one_line(plugins):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugins), os.environ.get("PYTHONPATH", "")]),
               COLUMNS="250")
    listed = subprocess.run([sys.executable, "-m", "openseek_hal.cli", "backends"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    table = listed.stdout.split("communicator adaptors", 1)[1]
    rows = {line.split("│")[1].strip(): line for line in table.splitlines() if line.count("│") > 3}
    assert "yes" in rows["goodccl"] and "good_ccl" in rows["goodccl"]
    assert "no" in rows["absentccl"] and "libchipccl.so.3 not found" in rows["absentccl"]
    assert "failed to load" in rows["brokenccl"]
    assert "more than one package" in rows["dup"]
    bad = subprocess.run([sys.executable, "-m", "openseek_hal.cli", "bench", "comm", "--adaptor", "nope",
                          "--max-bytes", "8K"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "unknown adaptor" in bad.stderr and "Traceback" not in bad.stderr


def test_a_cpu_backend_with_its_own_library_starts_without_a_duplicate_device_type():
    assert process_group_backend("cpu", "gloo") == "gloo"
    assert process_group_backend("cpu", "acme") == "cpu:acme"  # was "cpu:gloo,cpu:acme": torch refuses it
    assert process_group_backend("cuda", "nccl") == "cpu:gloo,cuda:nccl"
    assert process_group_backend("npu", "cpu:gloo,npu:hccl") == "cpu:gloo,npu:hccl"


# -- the example package, installed for real -----------------------------------------------------

@pytest.fixture(scope="module")
def acme(tmp_path_factory):
    """examples/acme_ccl built and installed (no deps, no network) into a temporary folder; the
    environment of a process that sees it (PYTHONPATH), as a user's venv would."""
    tmp = tmp_path_factory.mktemp("acme")
    source = tmp / "src"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "build"))
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(site), str(source)], check=True, capture_output=True, timeout=300)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
               OPENSEEK_HAL_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1", COLUMNS="250")
    return tmp, env


def _hal(env: dict, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "openseek_hal", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_example_adaptor_is_discovered_and_passes_conform(acme):
    tmp, env = acme
    listed = _hal(env, "backends")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.split("communicator adaptors", 1)[1].splitlines()
               if line.startswith("│ acme "))
    assert "yes" in row and "openseek-hal-acme-ccl" in row
    # the cpu backend: every available adaptor, the vendor's included, with 2 gloo ranks
    run = _hal(env, "conform", "--backend", "cpu", "--level", "comm", "--world-size", "2", "--report", str(tmp / "r"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    checks = [c for c in json.loads((tmp / "r" / "conform-cpu.json").read_text())["checks"] if c["level"] == "comm"]
    by_adaptor = {a: [c["status"] for c in checks if c["impl"] == a] for a in {c["impl"] for c in checks}}
    assert set(by_adaptor) == {"torch", "host", "hier", "acme"}
    assert all(s == ["pass"] * len(by_adaptor["torch"]) for s in by_adaptor.values())
    # the acme backend: a CPU backend whose own torch.distributed library (cpu:acme) is the default group,
    # and whose declared adaptor is the default one
    trace = tmp / "trace_conform"
    trace.mkdir()
    run = _hal(dict(env, ACME_CCL_TRACE=str(trace)), "conform", "--backend", "acme", "--level", "comm", "--quick")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    calls = (trace / "rank1.log").read_text().split()
    assert {"allreduce", "all_gather_single", "reduce_scatter_single", "all_to_all_single", "broadcast"} <= set(calls)


TRAIN = ["--steps", "3", "--batch-size", "8", "--seq-len", "32", "--set", "tokenizer_vocab_size=512", "--set",
         "model.num_hidden_layers=2", "--set", "sample_tokens=2", "--set", "eval_batches=1", "--set", "log_every=1",
         "--set", "warmup_steps=2", "--set", "lr=1e-2", "--set", "comm_timeout=30", "--set", "save=false",
         "--set", "dtype=fp64"]


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_trainer_runs_data_parallel_through_the_example_adaptor(acme):
    tmp, env = acme
    warm = _hal(env, "train", "--out", str(tmp / "warm"), *TRAIN[:1], "1", *TRAIN[2:])  # the tokenizer, once
    assert warm.returncode == 0, warm.stderr[-2000:]
    base = _hal(env, "train", "-n", "2", "--out", str(tmp / "torch"), *TRAIN)
    assert base.returncode == 0, base.stderr[-2000:]
    runs = {"adaptor": ["--set", "comm_adaptor=acme"], "backend": ["--backend", "acme"]}
    for label, extra in runs.items():
        trace = tmp / f"trace_{label}"
        trace.mkdir()
        run = _hal(dict(env, ACME_CCL_TRACE=str(trace)), "train", "-n", "2", "--out", str(tmp / label), *TRAIN, *extra)
        assert run.returncode == 0, run.stderr[-2000:]
        # fp64, the same reduction order (gloo moves the bytes under acme too): equal up to rounding
        assert _losses(tmp / label) == pytest.approx(_losses(tmp / "torch"), rel=1e-12, abs=0)
        for rank in (0, 1):  # the gradients and weights travelled through the vendor's library on both ranks
            calls = (trace / f"rank{rank}.log").read_text().split()
            assert calls.count("reduce_scatter_single") >= 3 and calls.count("all_gather_single") >= 3, calls
    bad = _hal(env, "train", "-n", "2", "--out", str(tmp / "bad"), *TRAIN, "--set", "comm_adaptor=nope")
    assert bad.returncode != 0 and "unknown adaptor 'nope'" in bad.stderr and "Traceback" not in bad.stderr
