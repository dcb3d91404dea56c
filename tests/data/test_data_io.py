"""Inputs and outputs every stage shares: discovery, compressed/Parquet reading, malformed lines, shards."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import read_output, write_jsonl

from openseek_hal.data.io import Malformed, ShardWriter, discover, iter_raw, parse
from openseek_hal.errors import UserError

ROWS = [{"id": i, "text": f"document number {i}", "meta": {"k": [i, None]}} for i in range(5)]


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.jsonl.zst"])
def test_reads_plain_and_compressed(tmp_path, name):
    if name.endswith(".zst"):
        pytest.importorskip("zstandard", reason="the data extra is not installed")
    path = write_jsonl(tmp_path / name, ROWS)
    malformed = Malformed()
    docs = [parse(r, "text", malformed) for r in iter_raw(discover([path]))]
    assert docs == ROWS and malformed.count == 0


def test_reads_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(
        pa.Table.from_pylist([{"id": 1, "text": "a"}, {"id": 2, "text": None}]), tmp_path / "x.parquet"
    )
    malformed = Malformed()
    docs = [parse(r, "text", malformed) for r in iter_raw(discover([tmp_path]))]
    assert docs == [{"id": 1, "text": "a"}, None]
    assert malformed.first == [
        {"file": str(tmp_path / "x.parquet"), "line": 2, "error": "missing or non-string field 'text'"}
    ]


def test_malformed_lines_are_counted_with_location(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", ROWS[:1], ("{oops", "[1]", '{"text": 3}', '{"body": "x"}'))
    malformed = Malformed()
    docs = [d for r in iter_raw([path]) if (d := parse(r, "text", malformed)) is not None]
    assert docs == ROWS[:1]
    assert [(m["line"], m["error"].split(":")[0]) for m in malformed.first] == [
        (2, "Expecting property name enclosed in double quotes at column 2 (invalid JSON)"),
        (3, "not a JSON object"),
        (4, "missing or non-string field 'text'"),
        (5, "missing or non-string field 'text'"),
    ]


def test_discover_folder_and_errors(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", ROWS)
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "a.jsonl.gz", ROWS)
    (tmp_path / "notes.txt").write_text("ignored")
    assert [p.name for p in discover([tmp_path])] == ["b.jsonl", "a.jsonl.gz"]
    with pytest.raises(UserError, match="input not found: .*missing.jsonl"):
        discover([tmp_path / "missing.jsonl"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no JSONL or Parquet files in folder"):
        discover([tmp_path / "empty"])


def test_shard_writer_is_atomic_and_replaces_a_previous_run(tmp_path):
    out = tmp_path / "out"
    w = ShardWriter(out, shard_docs=2, compression="gz")
    for r in ROWS:
        w.write(json.dumps(r) + "\n")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "part-00000.jsonl.gz",
        "part-00001.jsonl.gz",
    ]  # the third shard is still a hidden temp file
    w.close()
    assert read_output(out) == ROWS
    w = ShardWriter(out, shard_docs=10, compression="gz")
    w.write(json.dumps(ROWS[0]) + "\n")
    w.close()
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.jsonl.gz"]


def test_cli_missing_input_is_one_line_exit_2(cli, tmp_path):
    code, out, err = cli("data", "filter", tmp_path / "nope.jsonl", "-o", tmp_path / "o")
    assert code == 2
    assert err.strip().splitlines() == [f"openseek-hal: error: input not found: {tmp_path / 'nope.jsonl'}"]


def test_cli_refuses_output_folder_holding_the_input(cli, tmp_path):
    write_jsonl(tmp_path / "in.jsonl", ROWS)
    code, _, err = cli("data", "filter", tmp_path, "-o", tmp_path)
    assert code == 2 and "contains input" in err


def test_cli_ray_without_ray_says_how_to_install(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError, installed or not
    write_jsonl(tmp_path / "in.jsonl", ROWS)
    code, _, err = cli(
        "data", "filter", tmp_path / "in.jsonl", "-o", tmp_path / "o", "--executor", "ray", "-q"
    )
    assert code == 2 and "pip install 'openseek-hal[ray]'" in err


def test_a_lone_surrogate_escape_is_a_malformed_line_not_a_crash(cli, tmp_path):
    """json accepts "\\ud800" and gives a string no UTF-8 writer takes: counted like invalid UTF-8."""
    good = [{"text": "first document, long enough to keep " * 3}, {"text": "third: a pair \U0001F600 is fine " * 3}]
    path = write_jsonl(tmp_path / "s.jsonl", good[:1], ('{"text": "lone \\ud800 high surrogate"}',
                                                       '{"text": "ok", "meta": {"k": "\\udc00"}}'))
    with path.open("a") as f:
        f.write(json.dumps(good[1]) + "\n")  # ensure_ascii: the pair is written as two escapes
    malformed = Malformed()
    docs = [d for r in iter_raw([path]) if (d := parse(r, "text", malformed)) is not None]
    assert docs == good
    assert [(m["line"], "invalid Unicode" in m["error"]) for m in malformed.first] == [(2, True), (3, True)]
    code, _, err = cli("data", "filter", path, "-o", tmp_path / "out", "--min-chars", "1")
    assert code == 0, err
    assert read_output(tmp_path / "out") == good
