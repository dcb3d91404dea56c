"""Quality classifier (`classify-train`, `classify`): a fastText-style linear model on hashed n-grams.

Features are the lowercase tokens of a document (``text.TOKEN``: words, single Han characters) and their
n-grams up to ``word_ngrams``, each hashed with CRC32 into ``buckets`` rows; a document is the mean of its
rows of ``W`` (buckets x classes) plus a bias, and softmax gives class probabilities. This is fastText's
supervised model without the low-rank bottleneck, trained with mini-batch SGD and a linearly decaying
learning rate; a few epochs over tens of thousands of documents take seconds on one CPU core.

Labels are integers (FineWeb-Edu / CCI3-HQ 0-5 scores, or 0/1) or strings. For integer labels the score
written by `classify` is the expected label under the predicted distribution (for 0/1 labels, P(1));
for string labels it is the probability of the most likely label, which is written beside it.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .runner import DocStage
from .text import TOKEN


@dataclass(frozen=True)
class ClassifierConfig:
    word_ngrams: int = 2
    buckets: int = 1 << 18
    epochs: int = 5
    lr: float = 0.5
    batch_size: int = 32
    seed: int = 0


def features(text: str, config: ClassifierConfig) -> np.ndarray:
    """Hashed n-gram ids of one document (unique, sorted; empty text gives an empty array)."""
    toks = TOKEN.findall(text.lower())
    grams = list(toks)
    for n in range(2, config.word_ngrams + 1):
        grams += [" ".join(toks[i : i + n]) for i in range(len(toks) - n + 1)]
    ids = [zlib.crc32(g.encode("utf-8")) % config.buckets for g in grams]
    return np.unique(np.array(ids, dtype=np.int64))


class QualityClassifier:
    def __init__(self, config: ClassifierConfig, classes: list[Any]):
        self.config, self.classes = config, classes
        self.W = np.zeros((config.buckets, len(classes)), dtype=np.float32)
        self.b = np.zeros(len(classes), dtype=np.float32)

    @property
    def numeric(self) -> bool:
        return all(isinstance(c, int | float) and not isinstance(c, bool) for c in self.classes)

    def _logits(self, feats: list[np.ndarray]) -> np.ndarray:
        out = np.tile(self.b, (len(feats), 1))
        for i, f in enumerate(feats):
            if len(f):
                out[i] += self.W[f].mean(axis=0)
        return out

    def predict_proba(self, feats: list[np.ndarray]) -> np.ndarray:
        z = self._logits(feats)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def fit(self, feats: list[np.ndarray], labels: np.ndarray) -> None:
        """Mini-batch SGD on cross-entropy; the shuffle is seeded, so training is reproducible.

        Each document's rows move by the full learning rate (as in fastText's per-example updates, rows
        of different documents rarely collide); the shared bias moves by the batch mean.
        """
        c = self.config
        rng = np.random.default_rng(c.seed)
        steps = c.epochs * ((len(feats) + c.batch_size - 1) // c.batch_size)
        step = 0
        for _ in range(c.epochs):
            order = rng.permutation(len(feats))
            for lo in range(0, len(order), c.batch_size):
                idx = order[lo : lo + c.batch_size]
                batch = [feats[i] for i in idx]
                grad = self.predict_proba(batch)
                grad[np.arange(len(idx)), labels[idx]] -= 1.0
                lr = c.lr * (1.0 - step / steps)
                step += 1
                self.b -= lr * grad.mean(axis=0)
                for f, g in zip(batch, grad):
                    if len(f):
                        self.W[f] -= (lr / len(f)) * g

    def score(self, probs: np.ndarray) -> np.ndarray:
        if self.numeric:
            return probs @ np.array(self.classes, dtype=np.float64)
        return probs.max(axis=1)

    def save(self, path: Path) -> None:
        meta = json.dumps({"config": asdict(self.config), "classes": self.classes})
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
        np.savez_compressed(tmp, W=self.W, b=self.b, meta=np.array(meta))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> QualityClassifier:
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                model = cls(ClassifierConfig(**meta["config"]), meta["classes"])
                model.W, model.b = z["W"], z["b"]
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"cannot load classifier model {path}: {e}") from e
        return model


class ClassifyStage(DocStage):
    """Adds ``score_key`` (and ``label_key`` for string labels); drops documents below ``min_score``."""

    name = "classify"

    def __init__(
        self,
        model_path: str,
        text_key: str = "text",
        score_key: str = "quality_score",
        label_key: str = "quality_label",
        min_score: float | None = None,
    ):
        self.model_path, self.text_key, self.score_key, self.label_key = (
            model_path,
            text_key,
            score_key,
            label_key,
        )
        self.min_score = min_score
        self.model = QualityClassifier.load(model_path)  # fail early, in the main process

    def process(self, doc: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        probs = self.model.predict_proba([features(doc[self.text_key], self.model.config)])
        score = float(self.model.score(probs)[0])
        if self.min_score is not None and score < self.min_score:
            return None, "below_min_score"
        out = {**doc, self.score_key: round(score, 6)}
        if not self.model.numeric:
            out[self.label_key] = self.model.classes[int(probs[0].argmax())]
        return out, None


def train_from_files(
    inputs: list[str],
    model_path: Path,
    config: ClassifierConfig,
    text_key: str = "text",
    label_key: str = "label",
    valid_fraction: float = 0.1,
) -> dict[str, Any]:
    """Train on labelled JSONL/Parquet, hold out ``valid_fraction`` (seeded), save, return metrics."""
    from .io import Malformed, discover, iter_raw, parse

    malformed = Malformed()
    texts, raw_labels = [], []
    for raw in iter_raw(discover(inputs)):
        doc = parse(raw, text_key, malformed)
        if doc is None:
            continue
        label = doc.get(label_key)
        if isinstance(label, float) and label.is_integer():
            label = int(label)
        if not isinstance(label, int | str) or isinstance(label, bool):
            malformed.add(raw.file, raw.line, f"missing or non-int/str label field '{label_key}'")
            continue
        texts.append(doc[text_key])
        raw_labels.append(label)
    classes = sorted(set(raw_labels), key=lambda c: (isinstance(c, str), c))
    if len(classes) < 2:
        raise UserError(f"training data needs at least two distinct '{label_key}' values, found {classes}")
    if len({type(c) for c in classes}) > 1:
        raise UserError(f"labels mix numbers and strings: {classes}")
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[c] for c in raw_labels], dtype=np.int64)
    feats = [features(t, config) for t in texts]
    order = np.random.default_rng(config.seed).permutation(len(feats))
    n_valid = int(len(feats) * valid_fraction)
    valid, train = order[:n_valid], order[n_valid:]
    model = QualityClassifier(config, classes)
    model.fit([feats[i] for i in train], labels[train])
    metrics: dict[str, Any] = {
        "documents": len(feats),
        "train": len(train),
        "valid": n_valid,
        "classes": classes,
        "malformed": malformed.count,
        "malformed_first": malformed.first,
    }
    for name, idx in (("train", train), ("valid", valid)):
        if len(idx):
            pred = model.predict_proba([feats[i] for i in idx]).argmax(axis=1)
            metrics[f"{name}_accuracy"] = round(float((pred == labels[idx]).mean()), 4)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model.save(model_path)
    return metrics
