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


_TABLES = None
_SLOW = 0xFFFFFFFF  # in the fast table: a code point whose NFKC or lowercase depends on its neighbours
_TABLE_TOP = 0x30000  # above U+2FFFF no character decomposes, changes case, combines or is P/S/N/space


def _norm_tables():
    """(fast, norm), two uint32 tables indexed by code point.

    ``norm``: punctuation, symbols, controls and whitespace to space, digits to "0", everything else to
    itself; U+0001 is kept: it separates documents in minhash's batches (``normalize`` maps it too).

    ``fast``: ``norm[lower(NFKC(c))]`` for every character ``c`` whose NFKC and lowercase do not depend on
    the characters around it, so that a text made only of such characters is normalized one character
    at a time: NFKC(c) is one character (not a capital sigma, whose lowercase depends on what follows)
    with a one-character lowercase, and c's compatibility decomposition starts with a starter (canonical
    combining class 0) that no canonical composition takes as its second character. Such a decomposition
    cannot be reordered or composed with what comes before it, and what comes after starts the same way,
    so NFKC of the text is the concatenation of NFKC of its characters. Every other character (combining
    marks, Hangul vowel and final jamo, the few starters that compose with the one before, surrogates) is
    ``_SLOW``: a text that holds one is normalized whole by ``unicodedata``. Built once per process from
    ``unicodedata`` itself (about 0.1 s); ``test_fast_normalization_matches_unicodedata`` checks it.
    """
    global _TABLES
    if _TABLES is None:
        import sys

        import numpy as np

        def utf32(text: str) -> np.ndarray:
            return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)

        top = _TABLE_TOP
        cps = np.arange(top, dtype=np.uint32)
        cps = cps[(cps < 0xD800) | (cps > 0xDFFF)]
        chars = cps.astype("<u4").tobytes().decode("utf-32-le")
        cats = np.array(list(map(unicodedata.category, chars))).view("<U1").reshape(-1, 2)
        space = np.array(list(map(str.isspace, chars)))
        control = (cats[:, 0] == "C") & (cats[:, 1] == "c") & (cps != 1)
        norm = np.arange(sys.maxunicode + 1, dtype=np.uint32)
        norm[cps[(cats[:, 0] == "P") | (cats[:, 0] == "S") | control | space]] = 0x20
        norm[cps[(cats[:, 0] == "N") & (cats[:, 1] == "d")]] = 0x30

        # Every character's NFKD, NFKC and lower(NFKC) at once: the characters after NUL joined by NUL
        # (a starter that neither decomposes nor composes and is not cased), normalized, then cut at the
        # NULs again: entry i spans the codes between NUL i - 1 and NUL i. NUL itself is simple.
        def entries(text: str) -> tuple[np.ndarray, np.ndarray]:
            """(first code, length) of each entry."""
            codes = utf32(f"\x00{text}\x00")
            cuts = np.flatnonzero(codes == 0)
            assert len(cuts) == len(chars)
            return np.append(0, codes[cuts[:-1] + 1]), np.append(1, np.diff(cuts) - 1)

        rest = "\x00".join(chars[1:])
        nfkd_first, _ = entries(unicodedata.normalize("NFKD", rest))
        nfkc_joined = unicodedata.normalize("NFKC", rest)
        nfkc_first, nfkc_len = entries(nfkc_joined)
        low_first, low_len = entries(nfkc_joined.lower())
        # Starters that a canonical composition takes second: Hangul vowel and final jamo, and the second
        # character of every two-character canonical decomposition (mostly combining marks anyway).
        second = np.zeros(sys.maxunicode + 1, dtype=bool)
        second[0x1161:0x1176] = second[0x11A8:0x11C3] = True
        decomposed = (nfkd_first != cps) | (nfkc_len != 1)
        for i in np.flatnonzero(decomposed).tolist():
            d = unicodedata.decomposition(chars[i])
            if d and not d.startswith("<") and len(parts := d.split()) == 2:
                second[int(parts[1], 16)] = True
        combining = np.zeros(sys.maxunicode + 1, dtype=bool)
        marks = np.flatnonzero(cats[:, 0] == "M")  # every character with a combining class is a mark
        combining[cps[marks]] = np.array([unicodedata.combining(chars[int(i)]) != 0 for i in marks], dtype=bool)
        simple = (
            (nfkc_len == 1) & (low_len == 1) & (nfkc_first != 0x3A3) & ~combining[nfkd_first] & ~second[nfkd_first]
        )
        fast = np.full(sys.maxunicode + 1, _SLOW, dtype=np.uint32)
        fast[top:] = norm[top:]
        fast[cps[simple]] = norm[low_first[simple]]
        _TABLES = fast, norm
    return _TABLES


def _norm_table():
    return _norm_tables()[1]


def normalize_codes(text: str, collapse: bool = True):
    """``normalize`` as a uint32 array of code points, without the final strip (the fast path).

    U+0001 separates documents: each part between two is normalized on its own. A part with a character
    the per-character table cannot take (``_norm_tables``) goes through ``unicodedata.normalize``; the
    result is the same either way. ``collapse=False`` leaves runs of spaces as they are (for callers
    that only look at the tokens: minhash's shingles).
    """
    import numpy as np

    fast, norm = _norm_tables()
    raw = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    codes = fast[raw]
    if codes.max(initial=0) == _SLOW:
        codes = _with_slow_parts(text, raw, codes, norm)
    if not collapse:
        return codes
    space = codes == 0x20
    return codes[~(space & np.concatenate(([False], space[:-1])))]


def _with_slow_parts(text: str, raw, codes, norm):
    """``codes`` with each U+0001-separated part that holds a ``_SLOW`` code normalized by unicodedata."""
    import numpy as np

    seps = np.flatnonzero(raw == 1)
    parts = np.unique(np.searchsorted(seps, np.flatnonzero(codes == _SLOW)))
    pieces, done = [], 0
    for k in parts.tolist():
        begin = int(seps[k - 1]) + 1 if k > 0 else 0
        end = int(seps[k]) if k < len(seps) else len(raw)
        part = unicodedata.normalize("NFKC", text[begin:end]).lower()
        pieces.append(codes[done:begin])
        pieces.append(norm[np.frombuffer(part.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)])
        done = end
    pieces.append(codes[done:])
    return np.concatenate(pieces)


def normalize(text: str) -> str:
    """NFKC, lowercase, punctuation, symbols and controls to spaces, digits to 0, space runs to one space.

    The same normalization as datatrove's ``simplify_text`` in spirit: formatting and numbers do not
    make two otherwise identical documents different.
    """
    text = normalize_codes(text.replace("\x01", " ")).tobytes().decode("utf-32-le", "surrogatepass")
    return text.strip(" ")
