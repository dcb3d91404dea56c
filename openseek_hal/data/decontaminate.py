"""The `decontaminate` stage: drop documents that share an n-gram with a benchmark.

Benchmark files are JSONL (every string value of every record, nested ones included, is one item) or
plain text (every non-empty line is one item). Items and documents are normalized and tokenized as for
MinHash (``text.normalize``; words, or single Han/kana/Hangul characters), and every n-gram (default 13
tokens, as in GPT-3's decontamination) is hashed to 64 bits. Items shorter than n tokens are skipped and
counted. A document is dropped if any of its n-grams is a benchmark n-gram; the removal reason names
the benchmark file that matched first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .minhash import MinHashConfig, MinHasher
from .runner import DocStage


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def benchmark_items(path: Path) -> list[str]:
    """The texts of one benchmark file (see the module docstring for the two formats)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read benchmark file {path}: {e}") from e
    lines = [line for line in text.splitlines() if line.strip()]
    if path.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        return lines
    items: list[str] = []
    for lineno, line in enumerate(lines, 1):
        try:
            items.extend(_strings(json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(f"benchmark file {path}:{lineno} is not JSONL: {e.msg}") from e
    return items


class DecontaminateStage(DocStage):
    name = "decontaminate"

    def __init__(self, benchmarks: list[str], n: int = 13, text_key: str = "text"):
        if not benchmarks:
            raise UserError("give at least one benchmark file with --benchmark")
        if n < 1:
            raise UserError("--ngram must be at least 1")
        self.text_key, self.n = text_key, n
        self.hasher = MinHasher(MinHashConfig(n_grams=n))
        self.names: list[str] = []
        hashes, owners = [], []
        self.short_items = 0
        for i, b in enumerate(benchmarks):
            path = Path(b)
            if not path.is_file():
                raise UserError(f"benchmark file not found: {path}")
            self.names.append(path.name)
            items = benchmark_items(path)
            if not items:
                continue
            h, doc, tok_count = self.hasher.shingle_hashes(items)
            long_enough = tok_count >= n
            self.short_items += int((~long_enough).sum())
            h = h[long_enough[doc]]
            hashes.append(h)
            owners.append(np.full(len(h), i, dtype=np.int32))
        all_h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        all_o = np.concatenate(owners) if owners else np.zeros(0, np.int32)
        order = np.lexsort((all_o, all_h))  # by hash, then by benchmark order
        self.bench_hashes, self.bench_owner = all_h[order], all_o[order]
        if len(self.bench_hashes) == 0:
            raise UserError(f"no benchmark item has {n} or more tokens; nothing to decontaminate against")

    def process(self, doc: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        h, _, _ = self.hasher.shingle_hashes([doc[self.text_key]])
        pos = np.searchsorted(self.bench_hashes, h)
        pos = np.minimum(pos, len(self.bench_hashes) - 1)
        hit = self.bench_hashes[pos] == h
        if not hit.any():
            return doc, None
        return None, f"contaminated:{self.names[int(self.bench_owner[pos[hit]].min())]}"
