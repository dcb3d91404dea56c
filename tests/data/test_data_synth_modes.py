"""Synthesis modes from the OpenSeek seed: knowledge-point tags, forward Long-CoT refinement, RAG Long-CoT,
RL sampling by difficulty, scoring with rules and a reward judge. Helpers against hand-computed values and
independent references; the modes end to end against the fake OpenAI-compatible server."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import write_jsonl

from openseek_hal.data.synth_modes import (
    BM25Index,
    Rules,
    extract_answer,
    han_share,
    load_taxonomy,
    parse_reward,
    parse_tags,
    passages_of,
    repetition,
    same_answer,
)
from openseek_hal.data.text import normalize, tokens
from openseek_hal.errors import UserError


@pytest.fixture(scope="module")
def server():
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("fake_llm_server.py"))], stdout=subprocess.PIPE, text=True
    )
    try:
        yield f"http://127.0.0.1:{int(proc.stdout.readline())}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _synth(cli, tmp_path, server, docs, mode, *extra):
    write_jsonl(tmp_path / "in.jsonl", docs)
    code, _, err = cli(
        "data", "synthesize", tmp_path / "in.jsonl", "-o", tmp_path / "out", "--endpoint", server, "--model", "m",
        "--id-key", "id", "--retry-wait", 0.001, "--concurrency", 3, "-q", "--mode", mode, *extra,
    )
    rows = []
    if code == 0:
        rows = [json.loads(line) for line in (tmp_path / "out" / "synth.jsonl").read_text().splitlines()]
    return code, err, rows


# -- helpers ----------------------------------------------------------------------------------------------


def test_taxonomy_files(tmp_path):
    (tmp_path / "t.txt").write_text("# tags\nmath/algebra\n\nmath/geometry  # shapes\nmath/algebra\nhistory\n")
    assert load_taxonomy(tmp_path / "t.txt") == ["math/algebra", "math/geometry", "history"]
    (tmp_path / "t.yaml").write_text("math:\n  algebra: [linear equations, quadratics]\n  geometry: null\nart: {}\n")
    assert load_taxonomy(tmp_path / "t.yaml") == [
        "math", "math/algebra", "math/algebra/linear equations", "math/algebra/quadratics", "math/geometry", "art",
    ]
    (tmp_path / "e.txt").write_text("# nothing\n")
    for bad in ("e.txt", "missing.txt"):
        with pytest.raises(UserError):
            load_taxonomy(tmp_path / bad)


def test_parse_tags():
    tax = ["math/algebra", "math/geometry", "history"]
    assert parse_tags('Sure: ["MATH/Algebra", 3, "made/up", 1, 9, true]', tax) == (
        ["math/algebra", "history"], ["made/up", "9", "True"],
    )
    with pytest.raises(ValueError):
        parse_tags("no array here", tax)


def test_final_answers():
    assert extract_answer("Step 1...\nFinal answer: 42.") == "42."
    assert extract_answer("so \\boxed{\\frac{1}{2}} and then \\boxed{x^{2}}") == "x^{2}"
    assert extract_answer("Final answer: $\\boxed{7}$") == "7"
    assert extract_answer("推理……\n最终答案：三角形") == "三角形"
    assert extract_answer("no answer") is None
    assert same_answer("42.", "42") and same_answer("1,000", "1000.0") and same_answer(" Paris ", "paris")
    assert not same_answer("41", "42") and not same_answer(None, "42")


def _bm25_reference(passages: list[str], query: str, k1: float = 1.5, b: float = 0.75) -> list[float]:
    """Okapi BM25, written out term by term."""
    docs = [Counter(tokens(normalize(p))) for p in passages]
    avg = sum(sum(d.values()) for d in docs) / len(docs)
    out = []
    for d in docs:
        total = 0.0
        for term in set(tokens(normalize(query))):
            df = sum(1 for e in docs if term in e)
            if term in d:
                idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
                total += idf * d[term] * (k1 + 1) / (d[term] + k1 * (1 - b + b * sum(d.values()) / avg))
        out.append(total)
    return out


CORPUS = [
    {"id": "opt", "text": "Light bends when it passes from air into water: refraction, described by Snell's law."},
    {"id": "alg", "text": "A quadratic equation has at most two real roots; the discriminant tells how many."},
    {"id": "geo", "text": "The angles of a triangle add up to 180 degrees.\n\nA square has four right angles."},
    {"id": "zh", "text": "光从空气进入水中时会发生折射，折射遵循斯涅尔定律。"},
    {"id": "his", "text": "The printing press spread across Europe in the fifteenth century."},
]


def test_bm25_matches_reference():
    passages = passages_of(((d["id"], d["text"]) for d in CORPUS), 60)
    assert [p["id"] for p in passages] == ["opt#0", "alg#0", "geo#0", "geo#1", "zh#0", "his#0"]
    index = BM25Index(passages)
    for query in ("How many right angles does a square have?", "光的折射定律", "quadratic roots discriminant"):
        ref = _bm25_reference([p["text"] for p in passages], query)
        assert index.scores(query).tolist() == pytest.approx(ref, rel=1e-12)
        best = sorted(range(len(ref)), key=lambda i: (-ref[i], i))[:2]
        assert [i for i, _ in index.search(query, 2)] == [i for i in best if ref[i] > 0]
    assert index.search("zzz unknown words", 3) == []


def test_rules_and_reward():
    assert repetition("a b c d e a b c d e a b c d e") == pytest.approx(1 - 5 / 11)
    assert repetition("one two three") == 0.0
    assert han_share("abc 中文字") == pytest.approx(3 / 6)
    rules = Rules(min_chars=10, max_repetition=0.3, max_language_gap=0.5)
    assert rules.failures("short") == ["too_short"]
    assert rules.failures("x y z w v " * 5) == ["repetitive"]
    zh = "光从空气进入水中时会发生折射"
    assert rules.failures("An English answer about light.", source=zh) == ["language_mismatch"]
    assert rules.failures("光从空气进入水中时会发生折射。", source="光的折射") == []
    assert parse_reward("Score: 7/10") == 0.7
    for bad in ("great", "11"):
        with pytest.raises(ValueError):
            parse_reward(bad)


# -- the modes end to end ---------------------------------------------------------------------------------


def test_tag_mode(cli, tmp_path, server):
    tax = ["math/algebra", "math/geometry", "physics/optics", "history"]
    (tmp_path / "tags.txt").write_text("\n".join(tax) + "\n")
    docs = [
        {"id": "a", "text": "Notes on Algebra and a little geometry."},
        {"id": "b", "text": "Optics: lenses and mirrors."},
        {"id": "c", "text": "Nothing that matches. FIRST-BY-NUMBER"},
    ]
    code, err, rows = _synth(cli, tmp_path, server, docs, "tag", "--tags", tmp_path / "tags.txt")
    assert code == 0, err
    for doc, row in zip(docs, rows):
        want = [t for t in tax if t.rsplit("/", 1)[-1] in doc["text"].lower()]
        if "FIRST-BY-NUMBER" in doc["text"]:
            want.append(tax[0])
        assert (row["source_id"], row["tags"], row["unknown_tags"]) == (doc["id"], want, ["invented/tag"])
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["config"]["tags"] == 4
    code, _, err = cli("data", "synthesize", tmp_path / "in.jsonl", "-o", tmp_path / "o2", "--endpoint", server,
                       "--model", "m", "--mode", "tag")
    assert code == 2 and "--mode tag needs --tags" in err


def test_forward_long_cot_refinement(cli, tmp_path, server):
    docs = [{"id": "p", "text": "What is the capital of France? Paris"}]
    code, err, rows = _synth(cli, tmp_path, server, docs, "cot-forward", "--refine-rounds", 2)
    assert code == 0, err
    first = "STEP[What is the]"
    assert rows[0]["drafts"] == [f"{first}\nFinal answer: Paris", f"REFINED({first})\nFinal answer: Paris"]
    assert rows[0]["cot"] == f"REFINED(REFINED({first}))\nFinal answer: Paris" and rows[0]["answer"] == "Paris"


def test_rag_long_cot_over_a_local_index(cli, tmp_path, server):
    write_jsonl(tmp_path / "corpus.jsonl", CORPUS)
    docs = [{"id": "q1", "text": "Why does light bend in water? refraction"}, {"id": "q2", "text": "zzz qqq"}]
    code, err, rows = _synth(
        cli, tmp_path, server, docs, "rag-cot", "--index", tmp_path / "corpus.jsonl", "--top-k", 2,
        "--passage-chars", 60,
    )
    assert code == 0, err
    passages = passages_of(((d["id"], d["text"]) for d in CORPUS), 60)
    ref = _bm25_reference([p["text"] for p in passages], docs[0]["text"])
    best = [i for i in sorted(range(len(ref)), key=lambda i: (-ref[i], i))[:2] if ref[i] > 0]
    assert [r["id"] for r in rows[0]["retrieved"]] == [passages[i]["id"] for i in best]
    assert [r["score"] for r in rows[0]["retrieved"]] == pytest.approx([ref[i] for i in best], abs=1e-6)
    cited = [passages[i]["text"].split()[0] for i in best]
    assert rows[0]["cot"] == f"USED{cited}\nFinal answer: refraction" and rows[0]["answer"] == "refraction"
    assert rows[1]["retrieved"] == [] and rows[1]["cot"].startswith("USED[]")
    (tmp_path / "x").mkdir()
    code, err, _ = _synth(cli, tmp_path / "x", server, docs, "rag-cot")
    assert code == 2 and "needs --index" in err


def test_rl_sampling_by_difficulty(cli, tmp_path, server):
    docs = [{"id": f"k{k}", "text": f"Problem {k}: find it. K={k}", "answer": "42"} for k in range(0, 9, 2)]
    docs += [{"id": "float", "text": "Problem: K=3", "answer": 42.0}, {"id": "none", "text": "NOANSWER K=8",
             "answer": "42"}, {"id": "noref", "text": "Problem K=1"}]
    code, err, rows = _synth(cli, tmp_path, server, docs, "rl-sample", "--samples", 8)
    assert code == 0, err
    got = {r["source_id"]: r for r in rows}
    for k in range(0, 9, 2):
        r = got[f"k{k}"]
        assert r["pass_rate"] == k / 8 and r["difficulty"] == 1 - k / 8
        assert r["selected"] == (1 / 8 <= k / 8 <= 7 / 8)
        assert r["answers"] == ["42"] * k + ["41"] * (8 - k)
    assert got["float"]["pass_rate"] == 3 / 8 and got["none"]["pass_rate"] == 0 and not got["none"]["selected"]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert "noref" not in got and stats["removed"] == {"failed_after_retries": 1}
    assert (stats["selected"], stats["not_selected"]) == (4, 3)  # k = 2, 4, 6 and float; k = 0, 8 and none
    (tmp_path / "y").mkdir()
    code, err, _ = _synth(cli, tmp_path / "y", server, docs, "rl-sample", "--min-pass", 0.9, "--max-pass", 0.1)
    assert code == 2 and "--min-pass" in err


def test_score_with_rules_and_reward(cli, tmp_path, server):
    good = "Light bends at the boundary because its speed changes; Snell's law gives the angle."
    docs = [
        {"id": "good", "text": good, "source": "A passage about refraction of light."},
        {"id": "short", "text": "ok", "source": "x"},
        {"id": "rep", "text": "the same words again " * 6},
        {"id": "lang", "text": good, "source": "光从空气进入水中时会发生折射，折射遵循斯涅尔定律。"},
        {"id": "tiny-reward", "text": "Refraction explained briefly."},
    ]
    code, err, rows = _synth(cli, tmp_path, server, docs, "score", "--min-score", 0.5)
    assert code == 0, err
    got = {r["source_id"]: r for r in rows}
    assert got["good"]["reward"] == 1.0 and got["good"]["score"] == 1.0 and got["good"]["selected"]
    assert got["good"]["record"] == {"id": "good", "source": docs[0]["source"]}
    assert (got["short"]["rule_failures"], got["short"]["score"]) == (["too_short"], 0.0)
    assert got["rep"]["rule_failures"] == ["repetitive"] and not got["rep"]["selected"]
    assert got["lang"]["rule_failures"] == ["language_mismatch"]
    assert got["tiny-reward"]["reward"] == 0.3 and got["tiny-reward"]["score"] == 0.3  # 3 words -> 3/10
    assert not got["tiny-reward"]["selected"]
    (tmp_path / "r").mkdir()
    code, err, rows = _synth(cli, tmp_path / "r", server, docs, "score", "--rules-only")
    assert code == 0, err
    assert [r["score"] for r in rows] == [1.0, 0.0, 0.0, 0.0, 1.0] and rows[0]["reward"] is None
