"""`data run`: a YAML pipeline equals the same stages run one by one."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import read_output, write_jsonl

from openseek_hal.data.shards import TokenShards

BASE = "Rivers carry water from the mountains to the sea and shape the valleys they pass through over time."


def _docs() -> list[dict]:
    return [
        {"id": 0, "text": BASE},
        {"id": 1, "text": "short"},
        {"id": 2, "text": BASE + "!"},
        {"id": 3, "text": "漢語的文字有很長的歷史，經過了許多的變化，今天仍然在使用。"},
    ]


def test_pipeline_matches_stages_run_by_hand(cli, tmp_path):
    pytest.importorskip("opencc", reason="the data extra is not installed")
    write_jsonl(tmp_path / "in.jsonl", _docs())
    (tmp_path / "p.yaml").write_text(
        "input: [in.jsonl]\noutput: work\nworkers: 1\nstages:\n"
        "  - filter: {min_chars: 10, t2s: true}\n  - dedup-minhash: {id_key: id}\n"
        "  - tokenize: {vocab_size: 300}\n"
    )
    code, _, err = cli("data", "run", tmp_path / "p.yaml", "-q")
    assert code == 0
    assert "openseek-hal data filter" in err and "--min-chars 10 --t2s" in err
    assert [d["id"] for d in read_output(tmp_path / "work" / "2-dedup-minhash")] == [0, 3]
    assert read_output(tmp_path / "work" / "2-dedup-minhash")[1]["text"].startswith("汉语的文字")
    # By hand, with the same flags:
    assert (
        cli("data", "filter", tmp_path / "in.jsonl", "-o", tmp_path / "h1", "--min-chars", 10, "--t2s", "-q")[
            0
        ]
        == 0
    )
    assert cli("data", "dedup-minhash", tmp_path / "h1", "-o", tmp_path / "h2", "-q")[0] == 0
    assert cli("data", "tokenize", tmp_path / "h2", "-o", tmp_path / "h3", "--vocab-size", 300, "-q")[0] == 0
    assert np.array_equal(
        TokenShards(tmp_path / "work" / "3-tokenize").tokens(), TokenShards(tmp_path / "h3").tokens()
    )


def test_pipeline_errors(cli, tmp_path):
    (tmp_path / "p.yaml").write_text("input: [x]\noutput: o\nstages:\n  - classify-train: {}\n")
    code, _, err = cli("data", "run", tmp_path / "p.yaml")
    assert code == 2 and "'classify-train' is not a pipeline stage" in err
    (tmp_path / "p.yaml").write_text("input: [x]\noutput: o\nstages: []\n")
    code, _, err = cli("data", "run", tmp_path / "p.yaml")
    assert code == 2 and "non-empty 'stages'" in err
