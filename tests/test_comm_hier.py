"""The hier adaptor's algorithms (parallel shards vs leaders) with simulated chip kinds of equal and unequal
sizes, against exact references; the bytes each rank moves between kinds; the tuning table; faults."""

from __future__ import annotations

import json
import time

import hier_workers as w
import pytest

from openseek_hal.comm import CollectiveError, launch, tune
from openseek_hal.comm.hier import shard

CHUNK = 4096
KINDS = {
    "aab": ["a", "a", "b"],  # unequal, 3 ranks
    "abbb": ["a", "b", "b", "b"],  # unequal, 4 ranks
    "abab": ["a", "b", "a", "b"],  # equal sizes, interleaved
    "abbc": ["a", "b", "b", "c"],  # three kinds
}


@pytest.fixture(autouse=True)
def _no_table(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENSEEK_HAL_CACHE", str(tmp_path / "cache"))  # no cached table leaks in
    monkeypatch.delenv("OPENSEEK_HAL_COMM_ALGO", raising=False)
    monkeypatch.delenv("OPENSEEK_HAL_COMM_TUNE", raising=False)


@pytest.mark.parametrize("layout", list(KINDS))
def test_every_collective_and_algorithm_exact(layout):
    kinds = KINDS[layout]
    results = launch(w.every_collective, len(kinds), adaptor="hier", kinds=kinds, timeout=60,
                     options={"chunk_bytes": CHUNK})
    for rank, r in enumerate(results):
        assert r["problems"] == [], f"rank {rank}: " + "; ".join(r["problems"][:5])
        for op, algos in w.ALGOS.items():  # each algorithm really ran
            assert r["ran"][op] == sorted(algos), (op, r["ran"][op])
    assert all(r["digests"] == results[0]["digests"] for r in results)  # the same bits on every rank


def test_inexact_floats_same_bits_everywhere_and_within_the_bound():
    kinds = KINDS["abbb"]
    results = launch(w.random_floats, 4, adaptor="hier", kinds=kinds, timeout=60, options={"chunk_bytes": CHUNK})
    for key in results[0]:
        assert all(r[key] == results[0][key] for r in results), key  # bitwise equal across ranks
        assert results[0][key][1], f"{key}: error above the summation bound"


def test_each_rank_moves_a_shard_not_the_leader_everything():
    count = 6000  # float32 per rank
    kinds = KINDS["abbb"]
    moved = launch(w.moved_bytes, 4, adaptor="hier", kinds=kinds, timeout=60, args=(count,))
    size = 4 * count
    # leader: kind leaders (ranks 0 and 1) send the whole tensor; the others nothing
    assert [m["all_reduce/leader"][0] for m in moved] == [size, size, 0, 0]
    # parallel all_reduce: kind b's 3 ranks each send their third, rank 0 (kind a alone) sends its whole shard
    assert [m["all_reduce/parallel"] for m in moved] == [[size, size]] + [[size // 3, size // 3]] * 3
    # parallel all_gather: every rank sends its input to the other kind; rank 0 receives b's 3 inputs,
    # each b rank a third of a's one input
    assert [m["all_gather/parallel"] for m in moved] == [[size, 3 * size]] + [[size, size // 3]] * 3
    # parallel reduce_scatter: each rank receives the other kind's partial of its chunk
    assert [m["reduce_scatter/parallel"][1] for m in moved] == [size] * 4
    assert [m["reduce_scatter/parallel"][0] for m in moved] == [3 * size] + [size // 3] * 3
    # versus the leader path, ranks of the bigger kind move 1/3 of the bytes
    assert moved[1]["reduce_scatter/leader"][0] == 4 * size and moved[2]["reduce_scatter/leader"][0] == 0
    equal = launch(w.moved_bytes, 4, adaptor="hier", kinds=KINDS["abab"], timeout=60, args=(count,))
    for m in equal:  # two kinds of two: each rank moves half of what a leader moves
        assert m["all_reduce/parallel"] == [size // 2, size // 2]
    assert sorted(m["all_reduce/leader"][0] for m in equal) == [0, 0, size, size]


def test_shards_cover_every_element_once():
    for count in (0, 1, 5, 7, 100):
        for parts in (1, 2, 3, 4, 7):
            spans = [shard(count, parts, j) for j in range(parts)]
            covered = [i for lo, hi in spans for i in range(lo, hi)]
            assert covered == list(range(count))


# -- tuning -----------------------------------------------------------------------------------------

def test_fixed_defaults():
    gloo, nccl = "gloo", "cpu:gloo,cuda:nccl"
    assert tune.defaults(["a", "b"], {"a": gloo, "b": gloo}) == tune.DEFAULT_ALGORITHMS  # nothing inside a kind
    assert tune.defaults(["g", "g", "c"], {"g": nccl, "c": gloo}) == {op: "parallel" for op in tune.ALGORITHMS}
    assert tune.defaults(["g", "c", "c"], {"g": nccl, "c": gloo}) == {
        "all_reduce": "leader", "all_gather": "parallel", "reduce_scatter": "leader", "all_to_all_single": "staged"}


def test_algo_env_parsing():
    assert tune.parse_algo_env("parallel") == {op: "parallel" for op in tune.ALGORITHMS}
    assert tune.parse_algo_env("leader") == {"all_reduce": "leader", "all_gather": "leader",
                                             "reduce_scatter": "leader"}
    assert tune.parse_algo_env("all_reduce:leader, all_to_all_single:staged") == {
        "all_reduce": "leader", "all_to_all_single": "staged"}
    with pytest.raises(ValueError, match="unknown collective 'gossip'"):
        tune.parse_algo_env("gossip:leader")
    with pytest.raises(ValueError, match="all_to_all_single has no algorithm 'leader'"):
        tune.parse_algo_env("all_to_all_single:leader")
    with pytest.raises(ValueError, match="unknown algorithm 'fast'"):
        tune.parse_algo_env("fast")


def test_table_round_trip_and_lookup(tmp_path):
    path = tmp_path / "t.json"
    rows = {"all_reduce": [{"max_bytes": 1 << 20, "algo": "parallel"}, {"max_bytes": 1024, "algo": "leader"}]}
    tune.write_table(path, "hier/a:2+b:1", rows, {"command": "test"})
    tune.write_table(path, "host/cpu:2", {"all_gather": [{"max_bytes": 4096, "chunk_bytes": 8192}]}, {})
    data = tune.read_table(path)
    assert set(data["tables"]) == {"hier/a:2+b:1", "host/cpu:2"}  # the second write kept the first
    policy = tune.Policy(rows=tune.validate_rows(data["tables"]["hier/a:2+b:1"], "x"))
    assert [policy.algorithm("all_reduce", b) for b in (0, 1024, 1025, 1 << 20, 1 << 30)] == \
        ["leader", "leader", "parallel", "parallel", "parallel"]
    assert policy.algorithm("all_gather", 10) == tune.DEFAULT_ALGORITHMS["all_gather"]  # not in the table
    policy.forced = {"all_reduce": "parallel"}
    assert policy.algorithm("all_reduce", 10) == "parallel"
    with pytest.raises(ValueError, match="unknown algorithm 'fast'"):
        tune.validate_rows({"all_reduce": [{"max_bytes": 1, "algo": "fast"}]}, "k")
    with pytest.raises(ValueError, match="chunk_bytes must be an integer >= 4096"):
        tune.validate_rows({"all_reduce": [{"max_bytes": 1, "chunk_bytes": 12}]}, "k")


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": "something else"}),
                                     json.dumps({"format": tune.FORMAT, "tables": {"hier/a:1": {"all_reduce": 3}}})])
def test_corrupt_table_warns_and_falls_back(tmp_path, monkeypatch, content):
    path = tune.table_path()
    path.parent.mkdir(parents=True)
    path.write_text(content)
    policy, warning, error = tune.local_policy("hier/a:1", fixed_chunk=False)
    assert error == "" and "ignoring the comm tuning table" in warning and str(path) in warning
    assert policy.rows == {} and policy.algorithm("all_reduce", 1) == tune.DEFAULT_ALGORITHMS["all_reduce"]
    # a job with the corrupt table runs, with the defaults
    out = launch(w.chosen_algorithms, 3, adaptor="hier", kinds=KINDS["aab"], timeout=60)
    # CPU kinds of two ranks reduce over gloo inside: the fixed default keeps all_reduce on the leaders
    assert all(o[64]["all_reduce"] == "leader" and o[64]["all_gather"] == "parallel" and o["source"] == "default"
               for o in out)


def _table(tmp_path, name, algo_small):
    path = tmp_path / name
    tune.write_table(path, "hier/a:2+b:1", {op: [{"max_bytes": 4096, "algo": algo_small},
                                                 {"max_bytes": 1 << 30, "algo": "parallel"}]
                                            for op in ("all_reduce", "all_gather", "reduce_scatter")}, {})
    return str(path)


def test_cached_table_is_loaded_and_env_overrides_it(tmp_path, monkeypatch):
    path = tune.table_path()
    path.parent.mkdir(parents=True)
    path.write_text(open(_table(tmp_path, "t.json", "leader")).read())
    out = launch(w.chosen_algorithms, 3, adaptor="hier", kinds=KINDS["aab"], timeout=60)
    for o in out:
        assert o[64]["all_reduce"] == o[64]["all_gather"] == o[64]["reduce_scatter"] == "leader"
        assert o[65536]["all_reduce"] == "parallel" and o[64]["all_to_all_single"] == "staged"  # gloo default
        assert o["source"].startswith("table ")
    monkeypatch.setenv("OPENSEEK_HAL_COMM_ALGO", "all_reduce:parallel,all_to_all_single:staged")
    out = launch(w.chosen_algorithms, 3, adaptor="hier", kinds=KINDS["aab"], timeout=60)
    for o in out:
        assert o[64]["all_reduce"] == "parallel" and o[64]["all_gather"] == "leader"
        assert o[65536]["all_to_all_single"] == "staged"
    monkeypatch.setenv("OPENSEEK_HAL_COMM_TUNE", "off")
    monkeypatch.delenv("OPENSEEK_HAL_COMM_ALGO")
    out = launch(w.chosen_algorithms, 3, adaptor="hier", kinds=KINDS["aab"], timeout=60)
    assert all(o[64]["all_gather"] == "parallel" and o["source"] == "default" for o in out)


def test_bad_algo_env_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("OPENSEEK_HAL_COMM_ALGO", "all_reduce:fastest")
    with pytest.raises(CollectiveError, match=r"create on rank \d of group 'world'.*all_reduce has no algorithm "
                                              r"'fastest'"):
        launch(w.chosen_algorithms, 3, adaptor="hier", kinds=KINDS["aab"], timeout=30)


def test_every_rank_uses_rank_zeros_table(tmp_path):
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{")
    tables = [_table(tmp_path, "zero.json", "leader"), _table(tmp_path, "one.json", "parallel"), str(corrupt)]
    out = launch(w.rank_zero_table_wins, 3, adaptor="hier", kinds=KINDS["aab"], timeout=60, args=(tables,))
    for o in out:
        assert o[64]["all_reduce"] == "leader" and "zero.json" in o["source"]
        assert o["warnings"] == []  # rank 2's corrupt file is never read


def test_host_chunk_per_call_from_the_table(tmp_path, monkeypatch):
    path = tune.table_path()
    tune.write_table(path, "host/cpu:2", {"all_reduce": [{"max_bytes": 4096, "chunk_bytes": 8192},
                                                         {"max_bytes": 1 << 30, "chunk_bytes": 4 << 20}]}, {})
    out = launch(w.host_chunks, 2, adaptor="host", timeout=60)
    assert out[0] == out[1] == {"slot": 4 << 20, 400: 8192, 400_000: 4 << 20}
    monkeypatch.setenv("OPENSEEK_HAL_HOST_CHUNK_BYTES", "64K")  # a fixed chunk wins over the table
    out = launch(w.host_chunks, 2, adaptor="host", timeout=60)
    assert out[0] == {"slot": 65536, 400: 65536, 400_000: 65536}


def test_uneven_all_to_all_chooses_alike_on_every_rank(tmp_path):
    path = tune.table_path()
    tune.write_table(path, "hier/a:1+b:3", {"all_to_all_single": [{"max_bytes": 4096, "algo": "staged"},
                                                                  {"max_bytes": 1 << 20, "algo": "parallel"}]}, {})
    tune.write_table(path, "host/cpu:3", {"all_to_all_single": [{"max_bytes": 4096, "chunk_bytes": 4096},
                                                                {"max_bytes": 1 << 20, "chunk_bytes": 8192}]}, {})
    out = launch(w.uneven_all_to_all_with_a_table, 4, adaptor="hier", kinds=KINDS["abbb"], timeout=30)
    assert all(o["problems"] == [] and o["algo"] == "parallel" for o in out)
    out = launch(w.uneven_all_to_all_with_a_table, 3, adaptor="host", timeout=30)
    assert all(o["problems"] == [] and o["chunk"] == 8192 for o in out)


# -- faults -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("op,kinds,victim", [("all_reduce", "aab", 2), ("all_to_all_single", "abbb", 1)])
def test_a_dead_rank_fails_the_others_naming_collective_rank_group(op, kinds, victim):
    start = time.monotonic()
    with pytest.raises(CollectiveError) as info:
        launch(w.die_during, len(KINDS[kinds]), adaptor="hier", kinds=KINDS[kinds], timeout=30, check=False,
               args=(op, victim))
    assert time.monotonic() - start < 20  # well below the 30 s timeout
    text = str(info.value) + " ".join(getattr(info.value, "__notes__", []))
    assert f"rank {victim} exited with code 3" in text
    assert f"{op} on rank" in text and "of group 'world'" in text and "(hier adaptor) failed" in text
