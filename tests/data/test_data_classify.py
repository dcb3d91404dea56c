"""Quality classifier: learns a separable labelling, saves/loads exactly, scores and filters."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from conftest import read_output, write_jsonl

from openseek_hal.data.classifier import ClassifierConfig, QualityClassifier, features

GOOD = (
    "the theorem states that every bounded sequence of real numbers has a convergent subsequence "
    "which follows from the completeness of the real line and the nested interval property"
).split()
SPAM = "buy cheap now click here free win casino pills discount best offer limited 点击 免费 优惠".split()


def _labelled(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = GOOD if i % 2 else SPAM
        rows.append({"id": i, "text": " ".join(rng.choice(words) for _ in range(30)), "label": i % 2})
    return rows


def test_features_are_hashed_unigrams_and_bigrams():
    cfg = ClassifierConfig(word_ngrams=2, buckets=1 << 10)
    import zlib

    want = sorted({zlib.crc32(g.encode()) % (1 << 10) for g in ["a", "b", "中", "a b", "b 中"]})
    assert features("A b 中", cfg).tolist() == want


def test_train_score_filter(cli, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", _labelled(400, 0), ('{"text": "no label"}',))
    code, out, err = cli("data", "classify-train", train, "-m", tmp_path / "m.npz", "--epochs", 3)
    assert code == 0
    metrics = json.loads(out)
    assert metrics["valid_accuracy"] == 1.0 and metrics["classes"] == [0, 1] and metrics["malformed"] == 1
    assert "missing or non-int/str label" in err
    test = write_jsonl(
        tmp_path / "test.jsonl", [{k: v for k, v in r.items() if k != "label"} for r in _labelled(20, 1)]
    )
    code, _, _ = cli("data", "classify", test, "-o", tmp_path / "scored", "-m", tmp_path / "m.npz", "-q")
    assert code == 0
    scored = read_output(tmp_path / "scored")
    assert [d["quality_score"] > 0.5 for d in scored] == [i % 2 == 1 for i in range(20)]
    assert all(set(d) == {"id", "text", "quality_score"} for d in scored)
    code, _, _ = cli(
        "data", "classify", test, "-o", tmp_path / "kept", "-m", tmp_path / "m.npz", "--min-score", 0.5, "-q"
    )
    assert [d["id"] for d in read_output(tmp_path / "kept")] == list(range(1, 20, 2))


def test_save_load_roundtrip_and_edu_scores(tmp_path):
    cfg = ClassifierConfig(buckets=1 << 12, epochs=2)
    model = QualityClassifier(cfg, [0, 1, 2, 3, 4, 5])
    rows = _labelled(60, 2)
    feats = [features(r["text"], cfg) for r in rows]
    model.fit(feats, np.array([r["label"] * 5 for r in rows]))
    model.save(tmp_path / "m.npz")
    loaded = QualityClassifier.load(tmp_path / "m.npz")
    p = model.predict_proba(feats)
    assert np.array_equal(loaded.predict_proba(feats), p) and loaded.classes == [0, 1, 2, 3, 4, 5]
    assert np.allclose(model.score(p), p @ np.arange(6))  # expected 0-5 score


def test_string_labels_write_the_label(cli, tmp_path):
    rows = [{"text": r["text"], "label": "high" if r["label"] else "low"} for r in _labelled(200, 3)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    assert cli("data", "classify-train", train, "-m", tmp_path / "m.npz")[0] == 0
    assert cli("data", "classify", train, "-o", tmp_path / "o", "-m", tmp_path / "m.npz", "-q")[0] == 0
    assert [d["quality_label"] for d in read_output(tmp_path / "o")] == [r["label"] for r in rows]


def test_bad_training_data_is_a_clear_error(cli, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 1}])
    code, _, err = cli("data", "classify-train", train, "-m", tmp_path / "m.npz")
    assert code == 2 and "at least two distinct 'label' values" in err
    (tmp_path / "bad.npz").write_bytes(b"not a model")
    with pytest.raises(Exception, match="cannot load classifier model"):
        QualityClassifier.load(tmp_path / "bad.npz")
