"""Decontamination against JSONL and text benchmark files."""

from __future__ import annotations

import json

from conftest import read_output, write_jsonl

Q = "Which planet in our solar system has the largest number of confirmed moons as of this year"


def test_decontaminate(cli, tmp_path):
    bench = write_jsonl(tmp_path / "bench.jsonl", [{"question": Q, "choices": ["Saturn", "Jupiter"]}])
    (tmp_path / "zh.txt").write_text(
        "床前明月光，疑是地上霜。举头望明月，低头思故乡。\n短\n", encoding="utf-8"
    )
    docs = [
        {"id": 1, "text": f"Trivia night! {Q.upper()}? Answer: Saturn."},  # shares 13-grams after normalizing
        {"id": 2, "text": "Which planet has moons? Many do. " + " ".join(Q.split()[:12])},  # only 12 in a row
        {"id": 3, "text": "李白写道：床前明月光，疑是地上霜。举头望"},  # 13 Han characters in a row
        {"id": 4, "text": "李白写道：床前明月光，疑是地上霜。"},  # only 10
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", docs)
    code, _, _ = cli(
        "data",
        "decontaminate",
        inp,
        "-o",
        tmp_path / "out",
        "--benchmark",
        bench,
        "--benchmark",
        tmp_path / "zh.txt",
        "-q",
    )
    assert code == 0
    assert [d["id"] for d in read_output(tmp_path / "out")] == [2, 4]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["removed"] == {"contaminated:bench.jsonl": 1, "contaminated:zh.txt": 1}
    assert stats["config"]["short_benchmark_items_skipped"] == 3  # "Saturn", "Jupiter", "短"


def test_decontaminate_missing_benchmark(cli, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "x"}])
    code, _, err = cli(
        "data", "decontaminate", inp, "-o", tmp_path / "out", "--benchmark", tmp_path / "b.jsonl"
    )
    assert code == 2 and "benchmark file not found" in err
