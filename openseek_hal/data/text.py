"""Text primitives shared by the stages: sentence splitting, CJK-aware tokens, normalization.

A *token* is a run of letters/digits in scripts written with spaces, or a single character of a script
written without them (Han, kana, Hangul syllables, Thai...), so word n-grams in English and character
n-grams in Chinese come from one rule, and mixed text gets both.
"""

from __future__ import annotations

import re
import unicodedata

# Scripts written without spaces between words: each character is its own token.
_NOSPACE = (
    "\u2e80-\u2fdf\u3040-\u30ff\u3100-\u312f\u3190-\u31ff\u3400-\u4dbf\u4e00-\u9fff"
    "\uac00-\ud7af\uf900-\ufaff\u0e00-\u0e7f\U00020000-\U0002fa1f"
)
NOSPACE_CHAR = re.compile(f"[{_NOSPACE}]")
TOKEN = re.compile(f"[{_NOSPACE}]|[^\\W{_NOSPACE}]+")

# Sentence ends: Chinese full-width marks end a sentence wherever they are; ASCII ones need a space or
# the end of text after them (so "3.14" and "e.g.x" do not split). Newlines end sentences too.
_SENTENCE_END = re.compile(r"(?<=[。！？；!?;])|(?<=[.!?;])(?=\s)|\n+")


def split_sentences(text: str) -> list[str]:
    """Split into non-empty stripped sentences on 。！？； (and their ASCII forms) and line breaks."""
    return [s for s in (p.strip() for p in _SENTENCE_END.split(text)) if s]


def tokens(text: str) -> list[str]:
    return TOKEN.findall(text)


_PUNCT_TABLE: dict[int, str] | None = None


def _punct_table() -> dict[int, str]:
    # Every Unicode punctuation and symbol character maps to a space: one table, built once.
    global _PUNCT_TABLE
    if _PUNCT_TABLE is None:
        import sys

        _PUNCT_TABLE = {
            cp: " " for cp in range(sys.maxunicode + 1)
            if unicodedata.category(chr(cp))[0] in "PS"
        }
    return _PUNCT_TABLE


_DIGITS = re.compile(r"\d")
_SPACES = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lowercase, punctuation and symbols to spaces, every digit to 0, whitespace runs to one space.

    The same normalization as datatrove's ``simplify_text`` in spirit: formatting and numbers do not
    make two otherwise identical documents different.
    """
    text = unicodedata.normalize("NFKC", text).lower().translate(_punct_table())
    return _SPACES.sub(" ", _DIGITS.sub("0", text)).strip()
