"""Building blocks of the synthesis modes beyond QA and backward Long-CoT (OpenSeek's seed pipelines).

- knowledge-point tags: a taxonomy file (one tag per line, ``a/b/c`` paths allowed, ``#`` comments;
  or a YAML/JSON list or nested mapping) and the check of a model's reply against it;
- final answers: read off a chain of thought (``Final answer: ...`` or the last ``\\boxed{...}``) and
  compared after normalization (numbers by value);
- a local BM25 index over passages of a corpus, for retrieval-augmented Long-CoT;
- rules that score a synthetic sample without a model (length, repetition, language consistency).
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .text import NOSPACE_CHAR, normalize, tokens

# -- knowledge-point tags ---------------------------------------------------------------------------------



def json_array(reply: str) -> list[Any] | None:
    """The JSON array between the first ``[`` and the last ``]`` of a model's reply, or None."""
    start, end = reply.find("["), reply.rfind("]")
    try:
        items = json.loads(reply[start : end + 1]) if 0 <= start < end else None
    except json.JSONDecodeError:
        return None
    return items if isinstance(items, list) else None

def _flatten(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, str):
        return [prefix + node]
    if isinstance(node, list):
        return [t for item in node for t in _flatten(item, prefix)]
    if isinstance(node, dict):
        out = []
        for key, value in node.items():
            out.append(prefix + str(key))
            if value:
                out += _flatten(value, f"{prefix}{key}/")
        return out
    raise UserError(f"tag taxonomy: cannot read {node!r} as a tag")


def load_taxonomy(path: str | Path) -> list[str]:
    """The tags of a taxonomy file, in file order, without duplicates; ``UserError`` if unreadable or empty."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read tag taxonomy {p}: {e}") from e
    if p.suffix.lower() in (".yaml", ".yml", ".json"):
        import yaml

        try:
            tags = _flatten(yaml.safe_load(text) if p.suffix.lower() != ".json" else json.loads(text))
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            raise UserError(f"cannot parse tag taxonomy {p}: {e}") from e
    else:
        tags = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    tags = list(dict.fromkeys(t.strip() for t in tags if t and t.strip()))
    if not tags:
        raise UserError(f"tag taxonomy {p} holds no tags")
    return tags


def parse_tags(reply: str, taxonomy: list[str]) -> tuple[list[str], list[str]]:
    """(known tags, unknown tags) of a reply holding a JSON array of tag names or 1-based numbers.

    A name matches a taxonomy tag exactly or case-insensitively; ``ValueError`` if there is no array.
    """
    items = json_array(reply)
    if items is None:
        raise ValueError("tag reply holds no JSON array")
    by_lower = {t.lower(): t for t in taxonomy}
    known: list[str] = []
    unknown: list[str] = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool) and 1 <= item <= len(taxonomy):
            tag = taxonomy[item - 1]
        elif isinstance(item, str) and item.strip().lower() in by_lower:
            tag = by_lower[item.strip().lower()]
        else:
            unknown.append(str(item))
            continue
        if tag not in known:
            known.append(tag)
    return known, unknown


# -- final answers ----------------------------------------------------------------------------------------

_FINAL = re.compile(r"(?:final answer|最终答案|答案)\s*[:：]\s*(.+)", re.IGNORECASE)


def _boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}``, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a chain of thought: the last ``Final answer: X`` line (also ``答案：``), else
    the last ``\\boxed{X}``; None if there is neither."""
    lines = [m.group(1).strip() for m in _FINAL.finditer(text)]
    if lines and lines[-1]:
        boxed = _boxed(lines[-1])
        return boxed if boxed is not None else lines[-1]
    return _boxed(text)


def normalize_answer(answer: str) -> str:
    a = unicodedata.normalize("NFKC", answer).strip().strip("$").strip()
    a = re.sub(r"^\\boxed\{(.*)\}$", r"\1", a)
    a = a.rstrip("。.").strip()
    a = re.sub(r"\s+", " ", a).lower()
    try:
        value = float(a.replace(",", ""))
        return repr(value) if math.isfinite(value) else a
    except ValueError:
        return a


def same_answer(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and normalize_answer(a) == normalize_answer(b)


# -- BM25 over a local corpus -----------------------------------------------------------------------------


@dataclass
class BM25Index:
    """Okapi BM25 over passages (tokens: words, single Han characters; normalized text). In memory."""

    passages: list[dict[str, Any]]  # {"id", "text"}
    k1: float = 1.5
    b: float = 0.75
    postings: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    def __post_init__(self) -> None:
        docs: dict[str, list[tuple[int, int]]] = {}
        lengths = []
        for i, p in enumerate(self.passages):
            counts = Counter(tokens(normalize(p["text"])))
            lengths.append(sum(counts.values()))
            for tok, c in counts.items():
                docs.setdefault(tok, []).append((i, c))
        self.lengths = np.array(lengths, dtype=np.float64)
        self.postings = {
            t: (np.array([i for i, _ in v], dtype=np.int64), np.array([c for _, c in v], dtype=np.float64))
            for t, v in docs.items()
        }

    def scores(self, query: str) -> np.ndarray:
        n = len(self.passages)
        avg = float(self.lengths.mean()) if n else 0.0
        out = np.zeros(n, dtype=np.float64)
        for tok in set(tokens(normalize(query))):
            if tok not in self.postings:
                continue
            ids, tf = self.postings[tok]
            idf = math.log(1 + (n - len(ids) + 0.5) / (len(ids) + 0.5))
            norm = self.k1 * (1 - self.b + self.b * self.lengths[ids] / max(avg, 1e-9))
            out[ids] += idf * tf * (self.k1 + 1) / (tf + norm)
        return out

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """The ``k`` best passages with a positive score, best first (ties: earlier passage first)."""
        s = self.scores(query)
        order = np.lexsort((np.arange(len(s)), -s))[:k]
        return [(int(i), float(s[i])) for i in order if s[i] > 0]


def passages_of(docs: Iterable[tuple[str, str]], passage_chars: int) -> list[dict[str, Any]]:
    """Cut ``(id, text)`` documents at paragraph breaks into passages of about ``passage_chars``."""
    from .synth import segments

    out = []
    for doc_id, text in docs:
        for k, piece in enumerate(segments(text, passage_chars)):
            out.append({"id": f"{doc_id}#{k}", "text": piece})
    return out


# -- rules for scoring synthetic samples ------------------------------------------------------------------


def han_share(text: str) -> float:
    """Share of Han (and other no-space script) characters among the letters and such characters."""
    letters = [c for c in text if c.isalpha()]
    return sum(1 for c in letters if NOSPACE_CHAR.match(c)) / len(letters) if letters else 0.0


def repetition(text: str, n: int = 5) -> float:
    """Share of word n-grams (Han characters are words) that repeat an earlier one in the text."""
    toks = tokens(normalize(text))
    grams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


@dataclass(frozen=True)
class Rules:
    """Checks a synthetic sample must pass; each failure is named in the output."""

    min_chars: int = 20
    max_repetition: float = 0.3
    max_language_gap: float = 0.5  # |Han share of the sample - Han share of its source|

    def failures(self, text: str, source: str | None = None) -> list[str]:
        out = []
        if len(text.strip()) < self.min_chars:
            out.append("too_short")
        if repetition(text) > self.max_repetition:
            out.append("repetitive")
        if source is not None and abs(han_share(text) - han_share(source)) > self.max_language_gap:
            out.append("language_mismatch")
        return out


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_reward(reply: str, scale: float = 10.0) -> float:
    """The first number of a judge's reply on a 0..``scale`` scale, as 0..1; ``ValueError`` if none fits."""
    m = _NUMBER.search(reply)
    if m is None or not 0 <= float(m.group()) <= scale:
        raise ValueError(f"reward reply holds no number in [0, {scale:g}]: {reply[:80]!r}")
    return float(m.group()) / scale
