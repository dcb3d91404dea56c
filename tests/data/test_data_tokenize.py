"""Tokenize into shards and read them back with TokenShards: ids, boundaries, dtype, index.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_jsonl
from tokenizers import Tokenizer

from openseek_hal.data.shards import ConcatenatedTokens, TokenShards, dtype_for
from openseek_hal.errors import UserError

TEXTS = [
    "The cat sat on the mat.",
    "机器学习是人工智能的一个分支。",
    "Numbers: 3.14159 and 2.71828!",
    "Mixed 中英文 text, with ünïcödé.",
] * 30


def test_dtype_choice():
    assert dtype_for(65536) == np.uint16 and dtype_for(65537) == np.uint32


def test_tokenize_trained_bpe_roundtrip(cli, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": t, "n": i} for i, t in enumerate(TEXTS)], ("{bad",))
    code, _, err = cli(
        "data", "tokenize", inp, "-o", tmp_path / "tok", "--vocab-size", 400, "--shard-tokens", 700, "-q"
    )
    assert code == 0 and f"{inp}:121" in err
    shards = TokenShards(tmp_path / "tok")
    index = json.loads((tmp_path / "tok" / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["vocab_size"] == shards.vocab_size <= 400
    assert shards.num_documents == len(TEXTS) and len(index["shards"]) > 1
    assert all(s["tokens"] <= 700 for s in index["shards"])
    tok = Tokenizer.from_file(str(shards.tokenizer_path))
    assert tok.token_to_id("<|endoftext|>") == shards.eos_id
    all_tokens = shards.tokens()
    assert isinstance(all_tokens, ConcatenatedTokens) and len(all_tokens) == shards.num_tokens
    # Every document decodes back to its text and is followed by exactly one EOS.
    decoded, base = [], 0
    for i in range(len(index["shards"])):
        offsets = shards.document_offsets(i)
        ids = np.asarray(shards.shard(i))
        for a, b in zip(offsets[:-1], offsets[1:]):
            assert ids[b - 1] == shards.eos_id and shards.eos_id not in ids[a : b - 1]
            assert np.array_equal(all_tokens[base + a : base + b], ids[a:b])
            decoded.append(tok.decode(ids[a : b - 1].tolist()))
        base += len(ids)
    assert decoded == TEXTS
    assert np.array_equal(
        np.asarray(all_tokens), np.concatenate([shards.shard(i) for i in range(len(index["shards"]))])
    )
    assert all_tokens[-1] == shards.eos_id


def test_tokenize_given_tokenizer_deterministic_across_workers(cli, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])
    assert cli("data", "tokenize", inp, "-o", tmp_path / "a", "--vocab-size", 300, "-q")[0] == 0
    for w in (1, 2):
        assert (
            cli(
                "data",
                "tokenize",
                inp,
                "-o",
                tmp_path / f"w{w}",
                "--tokenizer",
                tmp_path / "a" / "tokenizer.json",
                "--workers",
                w,
                "-q",
            )[0]
            == 0
        )
    one, two = TokenShards(tmp_path / "w1"), TokenShards(tmp_path / "w2")
    assert isinstance(one.tokens(), np.memmap)
    assert np.array_equal(one.tokens(), TokenShards(tmp_path / "a").tokens())
    assert np.array_equal(one.tokens(), two.tokens())
    tok = Tokenizer.from_file(str(tmp_path / "a" / "tokenizer.json"))
    want = [i for t in TEXTS for i in tok.encode(t, add_special_tokens=False).ids + [one.eos_id]]
    assert one.tokens().tolist() == want


def test_tokenize_errors(cli, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    code, _, err = cli("data", "tokenize", inp, "-o", tmp_path / "o")
    assert code == 2 and "exactly one of --tokenizer" in err
    from tokenizers import Tokenizer as T
    from tokenizers.models import WordLevel

    T(WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "t.json"))
    code, _, err = cli("data", "tokenize", inp, "-o", tmp_path / "o", "--tokenizer", tmp_path / "t.json")
    assert code == 2 and "--eos-token" in err
    with pytest.raises(UserError, match="no index.json"):
        TokenShards(tmp_path)
