"""Candidate verification: sketch Jaccard against exact set Jaccard, and precision/recall on a corpus of
planted duplicates (Jaccard 0.80-0.90) and near misses (0.55-0.75), English and Chinese."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from conftest import write_jsonl
from test_data_minhash_lsh import _jaccard, _shingles

from openseek_hal.data.minhash import MinHashConfig, MinHasher, accept_pairs, sketch_jaccard, verify_margin


def _vocab(lang: str, rng: random.Random):
    if lang == "en":
        vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randrange(3, 9)))
                 for _ in range(20000)]
        return vocab, " ".join
    vocab = [chr(c) for c in range(0x4E00, 0x9FA6)]
    return vocab, lambda toks: "，".join("".join(toks[i : i + 17]) for i in range(0, len(toks), 17)) + "。"


def _edited(toks, vocab, join, rng, lo, hi, subs):
    """A copy of ``toks`` with substituted tokens whose exact word-5-gram Jaccard is in [lo, hi]."""
    base = join(toks)
    while True:
        edited = list(toks)
        for pos in rng.sample(range(len(toks)), rng.randrange(*subs)):
            edited[pos] = rng.choice(vocab)
        j = _jaccard(base, join(edited))
        if lo <= j <= hi:
            return join(edited), j


def _planted(lang: str, pairs: int, rng: random.Random, length=(100, 200)):
    """``pairs`` duplicate pairs (J 0.80-0.90) and ``pairs`` near-miss pairs (J 0.55-0.75), each pair on
    a base document of its own; returns docs, dup -> base, near-miss ids, the Jaccards of both kinds."""
    vocab, join = _vocab(lang, rng)
    docs, source, near, sims = [], {}, set(), {"dup": [], "near": []}
    for i in range(2 * pairs):
        toks = [rng.choice(vocab) for _ in range(rng.randrange(*length))]
        kind = "dup" if i % 2 == 0 else "near"
        n = len(toks)
        subs = (max(1, n // 75), max(2, n // 25)) if kind == "dup" else (max(2, n // 40), max(3, n // 12))
        text, j = _edited(toks, vocab, join, rng, *((0.8, 0.9) if kind == "dup" else (0.55, 0.75)), subs)
        docs += [{"id": f"{lang}{i}", "text": join(toks)}, {"id": f"{lang}{i}-{kind}", "text": text}]
        (source.__setitem__(f"{lang}{i}-dup", f"{lang}{i}") if kind == "dup" else near.add(f"{lang}{i}-near"))
        sims[kind].append(j)
    return docs, source, near, sims


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    rng = random.Random(77)
    out = {}
    for lang in ("en", "zh"):
        docs, source, near, sims = _planted(lang, 1000, rng)
        rng.shuffle(docs)  # pairs far apart in the input: kept = first in input order, either of the two
        out[lang] = (write_jsonl(tmp_path_factory.mktemp(lang) / "in.jsonl", docs), source, near, sims)
    return out


def _score(cli, out, path, source, *flags):
    code, _, err = cli("data", "dedup-minhash", path, "-o", out, "--id-key", "id", "-q", *flags)
    assert code == 0, err
    removed = [json.loads(line) for line in (out / "clusters.jsonl").read_text().splitlines()]
    pair_of = {**source, **{v: k for k, v in source.items()}}
    found = sum(pair_of.get(r["removed"]) == r["kept"] for r in removed)
    return found / len(source), found / max(len(removed), 1)


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_verification_keeps_recall_and_restores_precision(cli, tmp_path, planted, lang):
    path, source, near, sims = planted[lang]
    assert min(sims["dup"]) >= 0.8 and max(sims["near"]) <= 0.75 and sum(s > 0.7 for s in sims["near"]) > 200
    recall, precision = _score(cli, tmp_path / "v", path, source)
    assert recall >= 0.99 and precision >= 0.999, (recall, precision)
    # The same run in memory gives the same clusters.
    _score(cli, tmp_path / "m", path, source, "--in-memory")
    assert (tmp_path / "m" / "clusters.jsonl").read_bytes() == (tmp_path / "v" / "clusters.jsonl").read_bytes()
    # Unverified, the 16 x 6 layout links near misses with probability 0.22 (J=0.5) to 0.95 (J=0.75).
    raw_recall, raw_precision = _score(cli, tmp_path / "raw", path, source, "--no-verify")
    assert raw_recall >= recall - 0.002 and raw_precision < 0.9, (raw_recall, raw_precision)
    stats = json.loads((tmp_path / "v" / "stats.json").read_text())
    assert stats["config"]["verify_threshold"] == 0.8 and stats["config"]["sketch_size"] == 256


def test_sketch_jaccard_is_exact_for_small_sets_and_unbiased_for_large():
    rng = random.Random(5)
    vocab, join = _vocab("en", rng)
    hasher = MinHasher(MinHashConfig(sketch_size=64))
    exact_checked = 0
    for length, k in ((40, 64), (600, 64)):
        errors = []
        for _ in range(150):
            toks = [rng.choice(vocab) for _ in range(length)]
            a, b = join(toks), _edited(toks, vocab, join, rng, 0.3, 0.95, (1, max(2, length // 10)))[0]
            _, _, sk = hasher.keys_and_sketches([a, b])
            shared, union, exact = sketch_jaccard(sk[:1], sk[1:])
            truth = _jaccard(a, b)
            if length < k - 4:  # fewer than k shingles each: the whole sets, the exact Jaccard
                assert exact[0] and (shared[0], union[0]) == (
                    len(_shingles(a) & _shingles(b)),
                    len(_shingles(a) | _shingles(b)),
                )
                exact_checked += 1
            else:
                assert not exact[0] and union[0] == k
                errors.append((shared[0] / union[0] - truth) / np.sqrt(truth * (1 - truth) / k))
        if errors:
            assert abs(np.mean(errors)) < 0.3 and np.max(np.abs(errors)) < 4.5, (np.mean(errors), np.max(errors))
    assert exact_checked == 150


def test_margin_keeps_pairs_at_the_threshold():
    """Sampled sketches (k=64, sets of about 600 shingles) of pairs at J 0.80-0.82 pass the margin
    ``verify_margin(0.8, 64, 0.99)`` about 99% of the time; without the margin only about half would."""
    rng = random.Random(8)
    vocab, join = _vocab("en", rng)
    hasher = MinHasher(MinHashConfig(sketch_size=64))
    rows = []
    for _ in range(300):
        toks = [rng.choice(vocab) for _ in range(600)]
        rows.append(hasher.keys_and_sketches([join(toks), _edited(toks, vocab, join, rng, 0.8, 0.82, (9, 14))[0]])[2])
    a, b = np.concatenate([r[:1] for r in rows]), np.concatenate([r[1:] for r in rows])
    margin = verify_margin(0.8, 64, 0.99)
    assert margin == pytest.approx(2.3263 * (0.16 / 64) ** 0.5, rel=1e-4)
    assert accept_pairs(a, b, 0.8, margin).mean() >= 0.97
    assert accept_pairs(a, b, 0.8, 0.0).mean() < 0.8
    assert MinHashConfig().verify_margin == round(verify_margin(0.8, 256, 0.99), 5)


def test_verify_option_errors(cli, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"text": "a b c d e f"}])
    for flags, message in (
        (("--verify-threshold", "1.5"), "--verify-threshold must be in (0, 1]"),
        (("--verify-threshold", "0"), "--verify-threshold must be in (0, 1]"),
        (("--sketch-size", "0"), "--sketch-size must be between 1 and 16384"),
    ):
        code, _, err = cli("data", "dedup-minhash", inp, "-o", tmp_path / "o", *flags)
        assert code == 2 and message in err, err
        assert not (tmp_path / "o" / "stats.json").exists()
    # A verify threshold of its own is recorded and used: the near miss of test_dedup_minhash_stage's
    # kind (one word of a short text changed) is linked again at 0.4.
    text = "the quick brown fox jumps over the lazy dog and runs far away into the green forest"
    docs = [{"id": "a", "text": text}, {"id": "b", "text": text.replace("lazy", "sleepy")}]
    inp = write_jsonl(tmp_path / "two.jsonl", docs)
    for vt, removed in (("0.8", 0), ("0.4", 1)):  # J = 8/18 = 0.44
        code, _, err = cli("data", "dedup-minhash", inp, "-o", tmp_path / vt, "--verify-threshold", vt, "--bands", 32,
                           "--rows", 1, "-q")
        assert code == 0, err
        stats = json.loads((tmp_path / vt / "stats.json").read_text())
        assert stats["config"]["verify_threshold"] == float(vt)
        assert stats["removed"].get("minhash_duplicate", 0) == removed
