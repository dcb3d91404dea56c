"""The `filter` stage: each rule on small English and Chinese inputs, YAML config, passthrough of fields."""

from __future__ import annotations

import json

import pytest
from conftest import read_output, write_jsonl

from openseek_hal.data.filters import FilterConfig, FlaggedWords, avg_sentence_chars
from openseek_hal.data.text import split_sentences
from openseek_hal.errors import ConfigError


def test_sentence_splitter_english_and_chinese():
    assert split_sentences("Pi is 3.14. Really? Yes!\nNew line") == [
        "Pi is 3.14.",
        "Really?",
        "Yes!",
        "New line",
    ]
    assert split_sentences("今天下雨了。你去吗？我不去！好；再见") == [
        "今天下雨了。",
        "你去吗？",
        "我不去！",
        "好；",
        "再见",
    ]
    assert avg_sentence_chars("ab. cdef.") == pytest.approx((3 + 5) / 2)


def test_flagged_ratio_counts_words_and_chinese_characters():
    fw = FlaggedWords(["spam", "赌博"])
    assert fw.ratio("Spam and eggs, spam!") == pytest.approx(2 / 4)
    assert fw.ratio("网上赌博违法") == pytest.approx(2 / 6)  # 6 character tokens, 2 of them flagged
    assert fw.ratio("") == 0.0


DOCS = [
    {"id": 0, "text": "A good sentence here. And another good one.", "src": "en"},
    {"id": 1, "text": "tiny", "src": "en"},
    {"id": 2, "text": "x" * 300, "src": "en"},
    {"id": 3, "text": "a. b. c. d. e. f.", "src": "en"},
    {"id": 4, "text": "Buy porn now, porn porn porn xxx.", "src": "en"},
    {"id": 5, "text": "這是一個繁體中文的句子。我們來測試轉換。", "src": "zh"},
    {"id": 6, "text": "网上赌博和博彩是违法的，赌博！", "src": "zh"},
]


def test_filter_rules_exact_output(cli, tmp_path):
    pytest.importorskip("opencc", reason="the data extra is not installed")
    inp = write_jsonl(tmp_path / "in.jsonl", DOCS, ("not json",))
    code, _, err = cli(
        "data",
        "filter",
        inp,
        "-o",
        tmp_path / "out",
        "--min-chars",
        10,
        "--max-chars",
        200,
        "--min-avg-sentence-chars",
        4,
        "--max-flagged-ratio",
        0.3,
        "--t2s",
        "-q",
    )
    assert code == 0
    assert read_output(tmp_path / "out") == [
        DOCS[0],
        {"id": 5, "text": "这是一个繁体中文的句子。我们来测试转换。", "src": "zh"},
    ]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["removed"] == {
        "max_chars": 1,
        "max_flagged_ratio": 2,
        "min_avg_sentence_chars": 1,
        "min_chars": 1,
    }
    assert (stats["docs_in"], stats["docs_out"], stats["malformed"]["count"]) == (7, 2, 1)
    assert stats["malformed"]["first"][0]["line"] == 8
    assert f"{inp}:8" in err  # the first malformed lines are also reported on stderr


def test_yaml_config_with_cli_override_and_user_word_list(cli, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", DOCS)
    (tmp_path / "words.txt").write_text("# mine\ngood\n")
    (tmp_path / "f.yaml").write_text(
        "min_chars: 1000\nmax_flagged_ratio: 0.1\ndefault_flagged_words: false\n"
    )
    code, _, _ = cli(
        "data",
        "filter",
        inp,
        "-o",
        tmp_path / "out",
        "--config",
        tmp_path / "f.yaml",
        "--min-chars",
        5,
        "--flagged-words",
        tmp_path / "words.txt",
        "-q",
    )
    assert code == 0
    # "good" is flagged now (2 of 8 words in doc 0); the default list is off, so doc 4 stays.
    assert [d["id"] for d in read_output(tmp_path / "out")] == [2, 3, 4, 5, 6]


def test_unknown_yaml_rule_is_a_clear_error(cli, tmp_path):
    (tmp_path / "f.yaml").write_text("min_chars: 1\nmax_charz: 5\n")
    with pytest.raises(ConfigError, match="unknown filter rule.*max_charz"):
        FilterConfig.from_yaml(tmp_path / "f.yaml")
    inp = write_jsonl(tmp_path / "in.jsonl", DOCS)
    code, _, err = cli("data", "filter", inp, "-o", tmp_path / "out", "--config", tmp_path / "f.yaml")
    assert code == 2 and "max_charz" in err and "Traceback" not in err


def test_workers_give_identical_output(cli, tmp_path):
    pytest.importorskip("opencc", reason="the data extra is not installed")
    inp = write_jsonl(tmp_path / "in.jsonl", DOCS * 50)
    for workers in (1, 2):
        assert (
            cli(
                "data",
                "filter",
                inp,
                "-o",
                tmp_path / f"w{workers}",
                "--min-chars",
                10,
                "--t2s",
                "--workers",
                workers,
                "--shard-docs",
                60,
                "-q",
            )[0]
            == 0
        )
    one, two = sorted((tmp_path / "w1").glob("part-*")), sorted((tmp_path / "w2").glob("part-*"))
    assert [p.name for p in one] == [p.name for p in two] and len(one) == 5  # 300 kept docs
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two))
