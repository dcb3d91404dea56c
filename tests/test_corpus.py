"""`train --data` reads files the way the data tools do: stage outputs, compression, malformed lines."""

from __future__ import annotations

import gzip
import json

import pytest

from openseek_hal.cli import main
from openseek_hal.errors import UserError
from openseek_hal.train.corpus import read_documents

TEXTS = [f"Training document number {chr(97 + i)} with some words in it." for i in range(12)]


def _cli(*args) -> int:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code


def _jsonl(path, texts, extra: bytes = b""):
    path.write_bytes("".join(json.dumps({"text": t}) + "\n" for t in texts).encode() + extra)
    return path


def test_reads_a_zst_stage_output_and_not_its_side_files(tmp_path):
    pytest.importorskip("zstandard")
    inp = _jsonl(tmp_path / "in.jsonl", TEXTS + TEXTS[:3])  # 3 copies for dedup-minhash to remove
    assert _cli("data", "filter", inp, "-o", tmp_path / "f", "--compression", "zst", "--shard-docs", 5,
                "--min-chars", 1, "-q") == 0
    assert sorted(p.name for p in (tmp_path / "f").glob("part-*")) == [f"part-0000{i}.jsonl.zst" for i in range(3)]
    assert read_documents(str(tmp_path / "f")).texts == TEXTS + TEXTS[:3]
    assert _cli("data", "dedup-minhash", tmp_path / "f", "-o", tmp_path / "d", "-q") == 0
    assert (tmp_path / "d" / "clusters.jsonl").stat().st_size > 0
    docs = read_documents(str(tmp_path / "d"))
    assert docs.texts == TEXTS and docs.malformed.count == 0  # not stats.json, not clusters.jsonl
    # A folder holding stage outputs (a pipeline's work folder): each one's data files, once.
    assert read_documents(str(tmp_path)).texts == TEXTS + (TEXTS + TEXTS[:3]) * 2  # d/, f/, in.jsonl


def test_invalid_utf8_is_a_skipped_line_with_its_number(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl.gz", [])
    raw = b"".join(json.dumps({"text": t}).encode() + b"\n" for t in TEXTS[:2])
    raw += b'{"text": "bad \xff byte"}\n' + json.dumps({"text": TEXTS[2]}).encode() + b"\n"
    data.write_bytes(gzip.compress(raw))
    docs = read_documents(str(data))
    assert docs.texts == TEXTS[:3]
    at = len(b'{"text": "bad ')
    assert docs.skipped == [(str(data), 3, f"invalid UTF-8 at byte {at} of the line")]


def test_invalid_utf8_text_file_is_reported_with_its_line(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"line one\nline \xc3( two\n")
    (tmp_path / "b.md").write_text("# fine\n")
    docs = read_documents(str(tmp_path))
    assert docs.texts == ["# fine\n"]
    assert docs.skipped == [(str(tmp_path / "a.txt"), 2, "invalid UTF-8 at byte 5 of the line")]


def test_unsupported_file_and_incomplete_folder(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unsupported data file"):
        read_documents(str(tmp_path / "x.csv"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".incomplete").write_text("{}")
    (tmp_path / "out" / "part-00000.jsonl").write_text(json.dumps({"text": "half"}) + "\n")
    with pytest.raises(UserError, match="incomplete stage output"):
        read_documents(str(tmp_path / "out"))
