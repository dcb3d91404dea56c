"""MinHash: hashes against a pure-Python reference, clustering against union-find, the stage end to end."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from conftest import read_output, write_jsonl

from openseek_hal.data.minhash import _P, MinHashConfig, MinHasher, components, splitmix64
from openseek_hal.data.text import TOKEN, normalize

MASK = (1 << 64) - 1


def _ref_mix(x: int) -> int:
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & MASK
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def _ref_shingles(text: str, n: int) -> list[int]:
    """Spec of the shingle hash, in Python integers: polynomial hash of the shingle's normalized tokens
    joined by one space (whatever separated them in the text), mixed."""
    norm = normalize(text)
    toks = [m.group() for m in TOKEN.finditer(norm)]
    pieces = (
        [" ".join(toks[k : k + n]) for k in range(len(toks) - n + 1)]
        if len(toks) >= n
        else [" ".join(toks)]
        if toks
        else []
    )
    return [_ref_mix(sum(ord(ch) * pow(_P, i, 1 << 64) for i, ch in enumerate(p)) & MASK) for p in pieces]


TEXTS = [
    "Hello, World!  This is   a test of 42 shingles; really.",
    "中文文本的测试，看看字符五元组。",
    "mixed 中文 and English words together here",
    "",
    "short one",
    "ÉCOLE Ｆｕｌｌｗｉｄｔｈ ① text \x01 ctl",
]


def test_normalize():
    assert normalize("Hello, World!  It's 2024.\n\tOK") == "hello world it s 0000 ok"
    assert normalize("Ｆｕｌｌ，全角！１２") == "full 全角 00"


def _reference_codes(text: str) -> list[int]:
    """``normalize_codes`` as it was written before the per-character table: unicodedata on the whole text."""
    import unicodedata

    from openseek_hal.data.text import _norm_table

    codes = _norm_table()[[ord(c) for c in unicodedata.normalize("NFKC", text).lower()]].tolist()
    return [c for i, c in enumerate(codes) if not (c == 0x20 and i and codes[i - 1] == 0x20)]


def test_fast_normalization_matches_unicodedata():
    """The per-character table (``text._norm_tables``) gives what ``unicodedata.normalize`` + ``lower``
    give: for every character alone, for random texts mixing the characters whose normalization
    depends on their neighbours (combining marks, Hangul jamo, compatibility forms, capital sigma), and
    for batches joined by U+0001 where only some documents need the slow path."""
    import sys
    import unicodedata

    from openseek_hal.data.text import _SLOW, _TABLE_TOP, _norm_tables, normalize_codes

    fast, _ = _norm_tables()
    # Above the table the fast path is the identity: nothing there decomposes, changes case or combines.
    for cp in range(_TABLE_TOP, sys.maxunicode + 1, 97):
        ch = chr(cp)
        assert unicodedata.decomposition(ch) == "" and ch.lower() == ch and not unicodedata.combining(ch)
    singles = [chr(c) for c in range(_TABLE_TOP) if not 0xD800 <= c <= 0xDFFF]
    for ch in singles[::7] + [chr(c) for c in np.flatnonzero(fast[:_TABLE_TOP] == _SLOW)[:2000]]:
        assert normalize_codes(ch).tolist() == _reference_codes(ch), hex(ord(ch))
    tricky = [chr(c) for c in (*range(0x300, 0x370), *range(0x1100, 0x1200), *range(0xAC00, 0xAC40),
                               *range(0xFF00, 0xFF70), *range(0x3300, 0x3320), *range(0xFB00, 0xFB50))]
    tricky += list("\u03a3\u03c3\u03c2\u0130I\u0131K\u212a\u2460\u1e9e\u00dfe\u0301")
    tricky += list("\u0f73\u0b47\u0b3e\u0cd5\u00c5\u212b\x00 \t")
    rng = random.Random(0)

    def text() -> str:
        n = rng.randint(0, 30)
        return "".join(rng.choice(tricky) if rng.random() < 0.5 else rng.choice("ab Σ中文 ") for _ in range(n))

    for _ in range(3000):
        t = text()
        assert normalize_codes(t).tolist() == _reference_codes(t), repr(t)
    for _ in range(300):
        batch = "\x01".join(text() if rng.random() < 0.3 else "plain text 中文，全角！" for _ in range(8)) + "\x01"
        assert normalize_codes(batch).tolist() == _reference_codes(batch), repr(batch)


def test_batch_of_only_empty_documents():
    """A batch whose documents all normalize to nothing has no shingles (it raised IndexError before)."""
    h, doc, count = MinHasher().shingle_hashes(["!!!", "", " ,. "])
    assert len(h) == len(doc) == 0 and count.tolist() == [0, 0, 0]
    keys, empty, sketches = MinHasher().keys_and_sketches(["!!!", ""])
    assert empty.tolist() == [True, True] and keys.shape == (2, 16) and sketches.shape == (2, 256)


def test_shingle_hashes_match_reference():
    h, doc, count = MinHasher().shingle_hashes(TEXTS)
    expected = [(i, v) for i, t in enumerate(TEXTS) for v in _ref_shingles(t, 5)]
    assert list(zip(doc.tolist(), h.tolist())) == expected
    assert count.tolist() == [len(TOKEN.findall(normalize(t))) for t in TEXTS]


def test_signatures_match_reference():
    hasher = MinHasher(MinHashConfig(num_bands=3, rows_per_band=2))
    sig, empty = hasher.signatures(TEXTS)
    for i, t in enumerate(TEXTS):
        shingles = _ref_shingles(t, 5)
        for j in range(6):
            a, b = int(hasher.a[j]), int(hasher.b[j])
            want = min(((a * s + b) & MASK for s in shingles), default=MASK)
            assert int(sig[i, j]) == want
    assert empty.tolist() == [False, False, False, True, False, False]


def test_components_match_union_find():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randrange(1, 60)
        edges = [(rng.randrange(n), rng.randrange(n)) for _ in range(rng.randrange(0, 80))]
        parent = list(range(n))

        def find(x, parent=parent):
            while parent[x] != x:
                x = parent[x]
            return x

        for u, v in edges:
            ru, rv = find(u), find(v)
            parent[max(ru, rv)] = min(ru, rv)
        want = [min(j for j in range(n) if find(j) == find(i)) for i in range(n)]
        u = np.array([e[0] for e in edges], dtype=np.int64)
        v = np.array([e[1] for e in edges], dtype=np.int64)
        assert components(n, u, v).tolist() == want


def test_splitmix64_is_the_reference_mixer():
    xs = [0, 1, 12345, MASK]
    assert splitmix64(np.array(xs, dtype=np.uint64)).tolist() == [_ref_mix(x) for x in xs]


EN = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden fence "
    "and the sun sets slowly behind the hills of the quiet green valley far away from the city"
)
ZH = (
    "春天来了，山上的花都开了，孩子们在田野里奔跑，老人坐在门口晒太阳，"
    "河水缓缓流过村庄，远处传来鸟儿的歌声，人们开始新一年的耕种"
)


def _corpus() -> list[dict]:
    docs = [
        {"id": "en", "text": EN, "lang": "en"},
        {"id": "zh", "text": ZH, "lang": "zh"},
        {
            "id": "other",
            "text": "Completely different content about databases, indexes and query planners "
            "that shares nothing with the other documents at all in any way.",
            "lang": "en",
        },
        {"id": "en-copy", "text": EN.upper() + "!!!", "lang": "en"},  # identical after normalization
        {"id": "zh-copy", "text": ZH.replace("，", "。"), "lang": "zh"},
        {"id": "en-edit", "text": EN.replace("lazy", "sleepy"), "lang": "en"},
        {"id": "empty", "text": "...", "lang": "en"},
        {"id": "empty2", "text": "", "lang": "en"},
    ]
    return docs


def test_dedup_minhash_stage(cli, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", _corpus(), ("{broken",))
    # Unverified: the one-word edit (Jaccard 27/37 = 0.73) collides in at least one band with probability
    # 0.86 at 16 x 6, and does with these hashes, so it is removed although it is below the threshold.
    code, _, _ = cli("data", "dedup-minhash", inp, "-o", tmp_path / "raw", "--id-key", "id", "-q", "--no-verify")
    assert code == 0
    assert [d["id"] for d in read_output(tmp_path / "raw")] == ["en", "zh", "other", "empty", "empty2"]
    # Verified (the default): its exact sketch Jaccard 0.73 < 0.8, so the candidate pair is dropped.
    code, _, _ = cli("data", "dedup-minhash", inp, "-o", tmp_path / "out", "--id-key", "id", "-q")
    assert code == 0
    kept = read_output(tmp_path / "out")
    assert [d["id"] for d in kept] == ["en", "zh", "other", "en-edit", "empty", "empty2"]
    assert kept[0] == _corpus()[0]
    # Copies equal after normalization always collide and pass. Empty texts are never candidates.
    clusters = [json.loads(line) for line in (tmp_path / "out" / "clusters.jsonl").read_text().splitlines()]
    assert clusters == [
        {"removed": "en-copy", "kept": "en"},
        {"removed": "zh-copy", "kept": "zh"},
    ]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert (stats["docs_in"], stats["docs_out"], stats["removed"], stats["clusters"]) == (
        8,
        6,
        {"minhash_duplicate": 2},
        2,
    )
    assert stats["pairs_accepted"] == 2 and stats["pairs_verified"] >= 3  # a rejected pair is checked per band
    assert stats["malformed"]["count"] == 1


@pytest.mark.parametrize("workers", [2])
def test_dedup_minhash_same_output_any_workers(cli, tmp_path, workers):
    rng = random.Random(1)
    words = EN.split()
    docs = []
    for i in range(300):
        base = list(docs[-1]["w"]) if i % 3 == 2 else [rng.choice(words) for _ in range(40)]
        docs.append({"id": i, "w": base, "text": " ".join(base)})
    inp = write_jsonl(tmp_path / "in.jsonl", docs)
    for w in (1, workers):
        assert cli("data", "dedup-minhash", inp, "-o", tmp_path / f"o{w}", "--workers", w, "-q")[0] == 0
    assert (tmp_path / "o1" / "part-00000.jsonl").read_bytes() == (
        tmp_path / f"o{workers}" / "part-00000.jsonl"
    ).read_bytes()
    assert (tmp_path / "o1" / "clusters.jsonl").read_bytes() == (
        tmp_path / f"o{workers}" / "clusters.jsonl"
    ).read_bytes()
    # Every third document repeats the previous one; random 40-word texts are far apart.
    removed = [json.loads(line) for line in (tmp_path / "o1" / "clusters.jsonl").read_text().splitlines()]
    assert len(removed) == 100


def test_shingles_ignore_what_separates_tokens():
    """Punctuation between Han characters (a space after normalization) does not change a shingle, as in
    datatrove's word n-grams and in the Jaccard the tests and benchmarks score against."""
    h = MinHasher(MinHashConfig())
    a, da, _ = h.shingle_hashes(["春天来了，山上的花都开了。孩子们在田野里奔跑", "river, mountain;  valley water"])
    b, db, _ = h.shingle_hashes(["春天来了山上的花都开了孩子们在田野里奔跑", "river mountain valley water"])
    assert a.tolist() == b.tolist() and da.tolist() == db.tolist()
    c, _, _ = h.shingle_hashes(["春天来了山上的花都开了孩子们在田野里跑奔"])
    assert set(c.tolist()) != set(b[db == 0].tolist())
