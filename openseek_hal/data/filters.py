"""The `filter` stage: data-juicer-style document rules for English and Chinese.

Rules, applied in this order (the first failing rule names the removal in stats.json):
``t2s`` (OpenCC traditional -> simplified; changes the text field), ``min_chars`` / ``max_chars``,
``min_avg_sentence_chars`` / ``max_avg_sentence_chars`` (mean characters per sentence, see
``text.split_sentences``), ``max_flagged_ratio`` (flagged tokens / all tokens, with the shipped English
and Chinese lists in ``wordlists/`` plus user lists). A threshold left as ``None`` is not checked.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..fileio import read_yaml_mapping
from .runner import DocStage
from .text import NOSPACE_CHAR, TOKEN, split_sentences


@dataclass
class FilterConfig:
    """Thresholds of the `filter` stage; every field can come from YAML and be overridden by a flag."""

    min_chars: int | None = None
    max_chars: int | None = None
    min_avg_sentence_chars: float | None = None
    max_avg_sentence_chars: float | None = None
    max_flagged_ratio: float | None = None
    t2s: bool = False
    default_flagged_words: bool = True
    flagged_words_files: list[str] = field(default_factory=list)

    @classmethod
    def from_yaml(cls, path: str | Path) -> FilterConfig:
        data = read_yaml_mapping(path, "filter config")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown filter rule(s) in {path}: {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        return cls(**data)

    def override(self, **values: Any) -> FilterConfig:
        """A copy with every non-None value replaced (CLI flags win over the YAML file)."""
        return FilterConfig(**{**asdict(self), **{k: v for k, v in values.items() if v is not None}})


def load_word_list(path: str | Path | None, package_name: str | None = None) -> list[str]:
    """Words of a list file (one per line, ``#`` comments); from the package when ``package_name``."""
    if package_name is not None:
        text = resources.files("openseek_hal.data").joinpath("wordlists", package_name).read_text("utf-8")
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")  # type: ignore[arg-type]
        except OSError as e:
            raise ConfigError(f"cannot read flagged-word list {path}: {e}") from e
    return [w.strip().lower() for w in text.splitlines() if w.strip() and not w.lstrip().startswith("#")]


class FlaggedWords:
    """Counts flagged tokens: whole-word matches for spaced scripts, substring matches for Chinese."""

    def __init__(self, words: list[str]):
        self.words = {w for w in words if not NOSPACE_CHAR.search(w)}
        cjk = sorted({w for w in words if NOSPACE_CHAR.search(w)}, key=lambda w: (-len(w), w))
        self.cjk = re.compile("|".join(map(re.escape, cjk))) if cjk else None

    def ratio(self, text: str) -> float:
        toks = TOKEN.findall(text.lower())
        if not toks:
            return 0.0
        flagged = sum(1 for t in toks if t in self.words)
        if self.cjk is not None:
            flagged += sum(len(m) for m in self.cjk.findall(text))
        return flagged / len(toks)


def avg_sentence_chars(text: str) -> float:
    sentences = split_sentences(text)
    return sum(len(s) for s in sentences) / len(sentences) if sentences else 0.0


class FilterStage(DocStage):
    name = "filter"

    def __init__(self, config: FilterConfig, text_key: str = "text"):
        self.config, self.text_key = config, text_key
        words: list[str] = []
        if config.default_flagged_words:
            words += load_word_list(None, "flagged_en.txt") + load_word_list(None, "flagged_zh.txt")
        for f in config.flagged_words_files:
            words += load_word_list(f)
        self.flagged = FlaggedWords(words)
        self._converter = None

    def setup(self) -> None:
        if self.config.t2s and self._converter is None:
            try:
                import opencc
            except ImportError as e:
                raise ConfigError("t2s conversion needs OpenCC: pip install 'openseek-hal[data]'") from e
            self._converter = opencc.OpenCC("t2s")

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_converter": None}  # the OpenCC handle is rebuilt in each worker

    def process(self, doc: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        c, text = self.config, doc[self.text_key]
        if self._converter is not None:
            text = self._converter.convert(text)
            doc = {**doc, self.text_key: text}
        n = len(text)
        if c.min_chars is not None and n < c.min_chars:
            return None, "min_chars"
        if c.max_chars is not None and n > c.max_chars:
            return None, "max_chars"
        if c.min_avg_sentence_chars is not None or c.max_avg_sentence_chars is not None:
            avg = avg_sentence_chars(text)
            if c.min_avg_sentence_chars is not None and avg < c.min_avg_sentence_chars:
                return None, "min_avg_sentence_chars"
            if c.max_avg_sentence_chars is not None and avg > c.max_avg_sentence_chars:
                return None, "max_avg_sentence_chars"
        if c.max_flagged_ratio is not None and self.flagged.ratio(text) > c.max_flagged_ratio:
            return None, "max_flagged_ratio"
        return doc, None
