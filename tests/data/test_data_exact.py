"""Exact substring dedup: the mask against brute force, and the stage on English and Chinese text."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from conftest import read_output, write_jsonl

from openseek_hal.data.dedup_exact import repeated_spans

pytest.importorskip("pydivsufsort", reason="the data extra is not installed")


def _brute_force(docs: list[bytes], n: int) -> np.ndarray:
    """Bytes inside an n-byte window that occurred earlier (no window crosses a document end)."""
    buf = b"\xff".join(docs) + b"\xff"
    removed = np.zeros(len(buf), dtype=bool)
    for p in range(len(buf) - n + 1):
        w = buf[p : p + n]
        if b"\xff" not in w and buf.find(w) < p:
            removed[p : p + n] = True
    return buf, removed


@pytest.mark.parametrize("low_memory,chunk", [(False, 1 << 22), (True, 1 << 22), (False, 3)])
def test_repeated_spans_match_brute_force(low_memory, chunk, monkeypatch):
    monkeypatch.setattr("openseek_hal.data.dedup_exact._CHUNK", chunk)  # 3: every step crosses chunks
    rng = random.Random(0)
    for _ in range(300):
        docs = [
            "".join(rng.choice("abé中") for _ in range(rng.randrange(0, 25))).encode()
            for _ in range(rng.randrange(1, 5))
        ]
        n = rng.randrange(1, 20)
        buf, want = _brute_force(docs, n)
        arr = np.frombuffer(bytearray(buf), dtype=np.uint8)
        ends = np.cumsum([len(d) + 1 for d in docs]) - 1
        starts, ends = repeated_spans(arr, ends, n, low_memory)
        got = np.zeros(len(buf), dtype=bool)
        for a, b in zip(starts, ends):
            got[a:b] = True
        # A character only partly inside a repeat is kept whole.
        starts = [i for i in range(len(buf)) if buf[i] & 0xC0 != 0x80]
        for s, e in zip(starts, starts[1:] + [len(buf)]):
            if not want[s:e].all():
                want[s:e] = False
        assert np.array_equal(got, want), (docs, n)


BOILER = "Subscribe to our newsletter for the latest updates and offers. "
ZH_BOILER = "本网站所有内容均为原创，未经许可不得转载。"


def test_dedup_exact_stage(cli, tmp_path):
    docs = [
        {"id": 1, "text": "First article about rivers!" + BOILER},
        {"id": 2, "text": "Second article about mountains." + BOILER + "The end."},
        {"id": 3, "text": "第一篇文章讲历史。" + ZH_BOILER},
        {"id": 4, "text": ZH_BOILER + "第二篇文章讲地理。"},
        {"id": 5, "text": BOILER},
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", docs, ("nope",))
    # The repeats are exactly the boilerplate: the bytes around each copy differ.
    code, _, _ = cli("data", "dedup-exact", inp, "-o", tmp_path / "out", "--min-bytes", 30, "-q")
    assert code == 0
    assert read_output(tmp_path / "out") == [
        docs[0],
        {"id": 2, "text": "Second article about mountains.The end."},
        docs[2],
        {"id": 4, "text": "第二篇文章讲地理。"},
    ]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    removed_bytes = 2 * len(BOILER) + len(ZH_BOILER.encode())
    assert stats["bytes_in"] - stats["bytes_out"] == stats["bytes_removed"] == removed_bytes
    assert stats["removed"] == {"exact_duplicate_doc": 1} and stats["malformed"]["count"] == 1


def test_dedup_exact_shards_find_repeats_within_a_shard(cli, tmp_path):
    docs = [{"text": BOILER + str(i)} for i in range(4)]
    inp = write_jsonl(tmp_path / "in.jsonl", docs)
    assert (
        cli(
            "data", "dedup-exact", inp, "-o", tmp_path / "out", "--min-bytes", 20, "--shard-bytes", 130, "-q"
        )[0]
        == 0
    )
    # Shards of two documents: the second of each pair loses the boilerplate.
    assert [d["text"] for d in read_output(tmp_path / "out")] == [BOILER + "0", "1", BOILER + "2", "3"]


def test_dedup_exact_over_token_ids(cli, tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    boiler = "all rights reserved by the site owner since the year"
    docs = [
        {"text": f"first page text {boiler}"},
        {"text": f"second page {boiler} goodbye"},
        {"text": "third page rights reserved by the site"},
    ]  # only 5 tokens of it: kept
    words = sorted({w for d in docs for w in d["text"].split()})
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(tmp_path / "tok.json"))
    inp = write_jsonl(tmp_path / "in.jsonl", docs)
    code, _, _ = cli(
        "data",
        "dedup-exact",
        inp,
        "-o",
        tmp_path / "out",
        "--tokenizer",
        tmp_path / "tok.json",
        "--min-tokens",
        6,
        "-q",
    )
    assert code == 0
    assert [d["text"] for d in read_output(tmp_path / "out")] == [
        docs[0]["text"],
        "second page  goodbye",
        docs[2]["text"],
    ]
    code, _, err = cli(
        "data",
        "dedup-exact",
        inp,
        "-o",
        tmp_path / "o2",
        "--tokenizer",
        tmp_path / "tok.json",
        "--low-memory",
    )
    assert code == 2 and "--low-memory works on bytes only" in err
