"""`bench comm` on the CPU at tiny sizes: it runs, checks its results, and computes bandwidths right."""

from __future__ import annotations

import json

import click
import pytest
import torch
from click.testing import CliRunner

from openseek_hal.comm import bench


def test_bench_comm_runs_on_cpu_and_writes_reports(tmp_path):
    result = CliRunner().invoke(bench.comm, [
        "--backend", "cpu", "--adaptor", "torch,host,hier,nccl", "--min-bytes", "1K", "--max-bytes", "4K",
        "--iters", "3", "--min-iters", "1", "--warmup", "1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "skipping adaptor 'nccl'" in result.output  # no CuPy here
    assert "## all_reduce" in result.output and "torch.distributed" in result.output
    report = json.loads((tmp_path / "comm_bench.json").read_text())
    rows, problems = report["results"], report["problems"]
    assert problems == {}
    impls = {"torch.distributed", "torch", "host", "hier/leader", "hier/parallel"}
    assert {(r["op"], r["impl"], r["bytes"]) for r in rows} == {
        (op, impl, b) for op in bench.OPS for impl in impls for b in (1024, 2048, 4096)}
    for r in rows:
        assert r["check"] == "ok"
        assert r["algbw_GBps"] == pytest.approx(r["bytes"] / (r["time_us"] * 1e-6) / 1e9)
        assert r["busbw_GBps"] == pytest.approx(r["algbw_GBps"] * (1.0 if r["op"] == "all_reduce" else 0.5))
        assert r["count"] == r["bytes"] // 2  # bf16
    assert report["meta"]["world_size"] == 2 and report["meta"]["env"]["NCCL_NVLS_ENABLE"] == "0"
    assert report["meta"]["provenance"]["commit"] and report["meta"]["provenance"]["torch"] == torch.__version__
    md = (tmp_path / "comm_bench.md").read_text()
    assert "| size | torch.distributed time |" in md and "| 4 KiB |" in md


def test_tune_writes_the_table_that_communicators_load(tmp_path, monkeypatch):
    from openseek_hal.comm import launch, tune

    monkeypatch.setenv("OPENSEEK_HAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("OPENSEEK_HAL_COMM_TUNE", raising=False)
    monkeypatch.delenv("OPENSEEK_HAL_COMM_ALGO", raising=False)
    result = CliRunner().invoke(bench.comm, [
        "--backend", "cpu", "-n", "3", "--kinds", "a,a,b", "--tune", "--adaptor", "hier,host,torch",
        "--op", "all_reduce,all_to_all_single", "--min-bytes", "3K", "--max-bytes", "12K", "--factor", "4",
        "--iters", "2", "--min-iters", "1", "--warmup", "1", "--dtype", "float32", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = tune.read_table(tune.table_path())
    assert set(data["tables"]) == {"hier/a:2+b:1", "host/cpu:3"}
    hier = data["tables"]["hier/a:2+b:1"]
    assert [r["max_bytes"] for r in hier["all_reduce"]] == [3072, 12288]
    for op, rows in hier.items():
        for r in rows:  # the choice is the fastest measured
            assert r["algo"] == min(r["us"], key=r["us"].get) and set(r["us"]) == set(tune.ALGORITHMS[op])
    assert all(r["chunk_bytes"] in bench.TUNE_CHUNKS for r in data["tables"]["host/cpu:3"]["all_reduce"])
    assert data["meta"]["hier/a:2+b:1"]["provenance"]["commit"]
    # a communicator of that topology takes its choices from the table
    from comm_workers import policy_source

    assert all(s.startswith("table ") for s in launch(policy_source, 3, adaptor="hier", kinds=["a", "a", "b"]))
    assert (tmp_path / "comm_tune.json").exists()


def test_targets_are_judged_against_the_baselines():
    def row(op, impl, nbytes, time_us, busbw):
        return {"op": op, "impl": impl, "bytes": nbytes, "time_us": time_us, "busbw_GBps": busbw}

    big = 64 * 2**20
    results = [row("all_reduce", "torch.distributed", big, 1, 300), row("all_reduce", "nccl", big, 1, 294),
               row("all_reduce", "torch", big, 1, 280),
               row("all_reduce", "cupy-direct", 8192, 12, 0), row("all_reduce", "nccl", 8192, 17, 0),
               row("all_reduce", "torch.distributed", 8192, 49, 0), row("all_reduce", "torch", 8192, 61, 0)]
    got = {t["target"]: (round(t["value"], 3), t["met"]) for t in bench.targets(results)}
    assert got["nccl all_reduce busbw / raw torch.distributed, >= 64 MiB (worst)"] == (0.98, True)
    assert got["torch all_reduce busbw / raw torch.distributed, >= 64 MiB (worst)"] == (0.933, False)
    assert got["nccl all_reduce time / cupy-direct at 8 KiB"] == (1.417, True)
    assert got["torch all_reduce added time at 8 KiB (us)"] == (12, False)


def test_sizes_and_units():
    assert bench.parse_bytes("8K") == 8192 and bench.parse_bytes("1GiB") == 2**30
    assert bench.parse_bytes("64m") == 64 * 2**20 and bench.parse_bytes("512") == 512
    with pytest.raises(click.BadParameter):
        bench.parse_bytes("lots")
    assert bench.sizes(8192, 2**30, 2)[-1] == 2**30 and len(bench.sizes(8192, 2**30, 2)) == 18
    assert bench.human(8192) == "8 KiB" and bench.human(3 * 2**29) == "1.5 GiB"


def test_bad_collective_is_one_clear_error():
    result = CliRunner().invoke(bench.comm, ["--backend", "cpu", "--op", "all_reduce,gossip"])
    assert result.exit_code == 2 and "unknown collective(s) ['gossip']" in result.output
