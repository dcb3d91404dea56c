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


_NORM_TABLE = None


def _norm_table():
    # code point -> normalized code point: punctuation, symbols, controls and whitespace to space, digits
    # to "0". U+0001 is kept: it separates documents in minhash's batches (``normalize`` maps it too).
    # Above U+2FFFF Unicode has no punctuation, symbol, digit or space, so those map to themselves.
    global _NORM_TABLE
    if _NORM_TABLE is None:
        import sys

        import numpy as np

        table = np.arange(sys.maxunicode + 1, dtype=np.uint32)
        for cp in range(0x30000):
            ch = chr(cp)
            cat = unicodedata.category(ch)
            if cat[0] in "PS" or ch.isspace() or (cat == "Cc" and cp != 1):
                table[cp] = 0x20
            elif cat == "Nd":
                table[cp] = 0x30
        _NORM_TABLE = table
    return _NORM_TABLE


def normalize_codes(text: str):
    """``normalize`` as a uint32 array of code points, without the final strip (the fast path)."""
    import numpy as np

    text = unicodedata.normalize("NFKC", text).lower()
    codes = _norm_table()[np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)]
    space = codes == 0x20
    return codes[~(space & np.concatenate(([False], space[:-1])))]


def normalize(text: str) -> str:
    """NFKC, lowercase, punctuation, symbols and controls to spaces, digits to 0, space runs to one space.

    The same normalization as datatrove's ``simplify_text`` in spirit: formatting and numbers do not
    make two otherwise identical documents different.
    """
    text = normalize_codes(text.replace("\x01", " ")).tobytes().decode("utf-32-le", "surrogatepass")
    return text.strip(" ")
