"""Synthesis against a real local HTTP server process with deterministic replies and injected 503s."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import write_jsonl

from openseek_hal.data.synth import segments


@pytest.fixture(scope="module")
def server():
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("fake_llm_server.py"))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _answered(url: str) -> int:
    with urllib.request.urlopen(url.replace("/v1", "/count")) as r:
        return json.loads(r.read())["ok"]


DOCS = [{"id": f"d{i}", "text": f"Word{i} alpha beta gamma.\n\nSecond paragraph {i} here."} for i in range(5)]


def _run(cli, tmp_path, server, *extra):
    inp = tmp_path / "in.jsonl"
    return cli(
        "data",
        "synthesize",
        inp,
        "-o",
        tmp_path / "out",
        "--endpoint",
        server,
        "--model",
        "fake",
        "--id-key",
        "id",
        "--retry-wait",
        0.001,
        "--concurrency",
        3,
        "-q",
        *extra,
    )


def test_segments_split_at_paragraphs():
    assert segments("aaaa\n\nbbbb\n\ncc\n\n\n", 10) == ["aaaa\n\nbbbb", "cc"]
    assert segments("x" * 30, 10) == ["x" * 30]


def test_qa_resumes_without_repeating_work(cli, tmp_path, server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    write_jsonl(tmp_path / "in.jsonl", DOCS, ("{torn",))
    before = _answered(server)
    code, _, _ = _run(cli, tmp_path, server, "--limit", 2)
    assert code == 0
    assert _answered(server) - before == 2
    out = tmp_path / "out" / "synth.jsonl"
    with open(out, "a") as fh:
        fh.write('{"source_id": "d9", "sou')  # an interrupted write: the torn line is dropped on resume
    code, _, _ = _run(cli, tmp_path, server)
    assert code == 0
    assert _answered(server) - before == 5  # only the three missing documents were asked for
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source_id"] for r in rows] == ["d0", "d1", "d2", "d3", "d4"]
    assert rows[3] == {
        "source_id": "d3",
        "source": DOCS[3]["text"],
        "qa": [{"question": "What comes first in Word3?", "answer": "Word3"}],
    }
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["skipped_already_done"] == 2 and stats["docs_out"] == 3 and stats["malformed"]["count"] == 1


def test_long_cot_backward(cli, tmp_path, server):
    write_jsonl(tmp_path / "in.jsonl", DOCS[:2])
    code, _, _ = _run(cli, tmp_path, server, "--mode", "cot", "--segment-chars", 20)
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "synth.jsonl").read_text().splitlines()]
    assert rows[1] == {
        "source_id": "d1",
        "source": DOCS[1]["text"],
        "summaries": ["SUMMARY[Word1 alpha beta]", "SUMMARY[Second paragraph 1]"],
        "cot": "COT[2]",
        "query": "QUERY[COT[2]]",
    }


def test_failures_are_counted_not_fatal_and_bad_key_is_one_error(cli, tmp_path, server, monkeypatch):
    write_jsonl(tmp_path / "in.jsonl", [{"id": "x", "text": "FAIL-ALWAYS please"}, DOCS[0]])
    code, _, _ = _run(cli, tmp_path, server, "--retries", 2)
    assert code == 0
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["removed"] == {"failed_after_retries": 1} and stats["docs_out"] == 1
    assert stats["failures"][0]["source_id"] == "x"
    monkeypatch.setenv("OPENAI_API_KEY", "bad")
    code, _, err = _run(cli, tmp_path, server)  # "x" is retried, with a key the server refuses
    assert code == 2 and "HTTP 401" in err and "Traceback" not in err


def test_unreachable_endpoint_stops_early(cli, tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    write_jsonl(tmp_path / "in.jsonl", DOCS)
    code, _, err = _run(cli, tmp_path, f"http://127.0.0.1:{port}/v1", "--retries", 0)
    assert code == 2 and "the first 3 documents all failed" in err
    assert (tmp_path / "out" / "synth.jsonl").read_text() == ""
