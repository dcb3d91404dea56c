"""MinHash signatures and LSH band keys for a batch of documents, vectorized with numpy.

Shingles follow datatrove's MinHash config: word 5-grams (one token per character for Han/kana/Hangul,
see ``text.TOKEN``), 64-bit hashes, seed 1; the LSH layout is chosen for a Jaccard threshold
(``optimal_lsh_params``; 16 bands x 6 rows for 0.8, where datatrove fixes 14 x 8). The hashes
themselves are ours, so the signatures are not bit-identical to datatrove's.

The hot path is the whole batch at once: the texts are joined, normalized as one UTF-32 array, token
boundaries come from comparisons on that array, the tokens are laid out again each followed by one space (so a
shingle is its tokens joined by spaces, as datatrove joins them, whatever separated them in the text), and
each shingle's hash is a polynomial hash of its character span read off a prefix-sum (``(H[e] - H[s-1]) *
P^-s`` mod 2^64), finished with the splitmix64 mixer. The signature is ``min over shingles of (a_j * h + b_j)
mod 2^64`` for bands x rows odd ``a_j``, taken per document with ``np.minimum.reduceat``. No Python loop runs
per token or shingle. A C++ loop would do the same arithmetic; with the layout below numpy runs it at about
750M hash-permutations per second on one core, so no native extension is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from ..errors import UserError
from .text import _NOSPACE, normalize_codes

_P = 0x9E3779B97F4A7C15  # odd, so invertible mod 2^64
_P_INV = pow(_P, -1, 1 << 64)
_SEP = 1  # code point joining documents in a batch; normalize() never emits it (it is a control char)
_CHUNK = 8192  # shingles per signature block: 112 x 8192 x 8 bytes = 7 MiB
SKETCH_PAD = np.uint32(0xFFFFFFFF)  # fills a bottom-k sketch row past the document's last shingle


def _nospace_table() -> np.ndarray:
    table = np.zeros(0x30000, dtype=bool)
    ranges = _NOSPACE.encode("utf-32-le", "surrogatepass")
    cps = np.frombuffer(ranges, dtype=np.uint32)
    i = 0
    while i < len(cps):  # the class string is "x-y" ranges and single characters
        if i + 2 < len(cps) and cps[i + 1] == ord("-"):
            table[cps[i] : cps[i + 2] + 1] = True
            i += 3
        else:
            table[cps[i]] = True
            i += 1
    return table


_NOSPACE_TABLE = _nospace_table()
_IS_SPACE, _IS_NOSPACE = np.uint8(1), np.uint8(2)


def _class_table() -> np.ndarray:
    """uint8 per code point: ``_IS_SPACE`` for a space or the batch separator, ``_IS_NOSPACE`` for a
    character of a script written without spaces (a token of its own), 0 for the rest."""
    import sys

    table = np.zeros(sys.maxunicode + 1, dtype=np.uint8)
    table[: len(_NOSPACE_TABLE)][_NOSPACE_TABLE] = _IS_NOSPACE
    table[[0x20, _SEP]] = _IS_SPACE
    return table


_CLASS = _class_table()


def splitmix64(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def splitmix64_(x: np.ndarray) -> np.ndarray:
    """``splitmix64`` in place (``x`` is overwritten and returned)."""
    tmp = np.empty_like(x)
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        np.right_shift(x, np.uint64(shift), out=tmp)
        x ^= tmp
        x *= np.uint64(mult)
    np.right_shift(x, np.uint64(31), out=tmp)
    x ^= tmp
    return x


def _powers(base: int, n: int) -> np.ndarray:
    """base^0 .. base^(n-1) mod 2^64."""
    out = np.full(n, base, dtype=np.uint64)
    out[0] = 1
    return np.cumprod(out)


@dataclass(frozen=True)
class MinHashConfig:
    """Shingles, LSH layout and candidate verification. The default layout is what ``optimal_lsh_params()``
    chooses for Jaccard 0.8 within 112 permutations with recall at least 0.99 there (datatrove's is 14 x 8).

    ``verify_threshold`` None links every LSH candidate pair as is; a number keeps a candidate pair only
    if its Jaccard, computed from the two documents' bottom-``sketch_size`` sketches (``sketch_jaccard``),
    is at least the threshold (exact sketches) or the threshold minus ``verify_margin`` (sampled ones).
    The default margin is ``verify_margin(0.8, 256, 0.99)``.
    """

    n_grams: int = 5
    num_bands: int = 16
    rows_per_band: int = 6
    seed: int = 1
    verify_threshold: float | None = 0.8
    sketch_size: int = 256
    verify_margin: float = 0.05816

    @property
    def num_perm(self) -> int:
        return self.num_bands * self.rows_per_band


class MinHasher:
    """Computes signatures and band keys; the same config gives the same values on any machine."""

    def __init__(self, config: MinHashConfig = MinHashConfig()):
        self.config = config
        rng = np.random.default_rng(config.seed)
        self.a = rng.integers(0, 1 << 63, size=config.num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 1 << 63, size=config.num_perm, dtype=np.uint64) * np.uint64(2)
        self._pow = self._inv_pow = np.zeros(0, dtype=np.uint64)

    def shingle_hashes(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Hashes of every shingle of every raw text, the index of its text, and each text's token count.

        A text with fewer tokens than ``n_grams`` has one shingle, all of it; an empty one has none.
        """
        n = self.config.n_grams
        joined = "\x01".join(texts) + "\x01"
        if joined.count("\x01") != len(texts):  # the separator inside a text would shift documents
            joined = "\x01".join(t.replace("\x01", " ") for t in texts) + "\x01"
        c = normalize_codes(joined, collapse=False)  # tokens do not see how many spaces separate them
        cls = _CLASS[c]
        space = (cls & _IS_SPACE).view(bool)
        nospace = (cls & _IS_NOSPACE).astype(bool)
        word = ~space
        # A token starts at a word character after a space or beside a no-space character (which is a
        # token of its own), and ends likewise before one; the batch ends with a separator (a space).
        edge = cls != 0
        start_mask = word.copy()
        start_mask[1:] &= nospace[1:] | edge[:-1]
        end_mask = word.copy()
        end_mask[:-1] &= nospace[:-1] | edge[1:]
        starts, ends = np.flatnonzero(start_mask), np.flatnonzero(end_mask)
        tok_doc = np.searchsorted(np.flatnonzero(c == _SEP), starts)
        tok_count = np.bincount(tok_doc, minlength=len(texts))
        # Shingle k spans tokens k..k+n-1 of one document; short documents get one whole-text shingle.
        t = len(starts)
        first = np.zeros(t, dtype=bool)
        if t >= n:
            first[: t - n + 1] = tok_doc[n - 1 :] == tok_doc[: t - n + 1]
        short_docs = np.flatnonzero((tok_count > 0) & (tok_count < n))
        tok_first = np.cumsum(tok_count) - tok_count
        first[tok_first[short_docs]] = True
        s_tok = np.flatnonzero(first)
        e_tok = s_tok + (n - 1)
        if len(short_docs):
            e_tok[np.searchsorted(s_tok, tok_first[short_docs])] = tok_first[short_docs] + tok_count[short_docs] - 1
        # The hash is that of the tokens joined by one space, whatever separated them (nothing between
        # Han characters, a space left by punctuation): the text laid out again as its tokens, each
        # followed by a space. A word character's position there is the word characters and token ends
        # before it; the prefix sum over the characters adds each character times P^position, and each
        # token end also its following space (taken off again at a shingle's last token).
        step = word.astype(np.int64)
        step[ends] += 1
        pos = np.cumsum(step)
        pos -= step
        powers, inv_powers = self._powers(int(pos[-1]) + 2)
        term = np.multiply(c, word, dtype=np.uint64)  # spaces count 0
        term *= powers[pos]
        end_space = powers[pos[ends] + 1] * np.uint64(0x20)
        term[ends] += end_space
        prefix = np.zeros(len(c) + 1, dtype=np.uint64)
        np.cumsum(term, out=prefix[1:])
        s_char, e_char = starts[s_tok], ends[e_tok]
        h = prefix[e_char + 1]
        h -= prefix[s_char]
        h -= end_space[e_tok]
        h *= inv_powers[pos[s_char]]
        return splitmix64_(h), tok_doc[s_tok], tok_count

    def _powers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """P^0..P^(n-1) and their inverses mod 2^64, from a cache that grows by doubling."""
        if len(self._pow) < n:
            size = max(n, 2 * len(self._pow), 1 << 16)
            self._pow, self._inv_pow = _powers(_P, size), _powers(_P_INV, size)
        return self._pow, self._inv_pow

    def signatures(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(len(texts), num_perm) uint64 signatures (all ones for empty texts), and the empty mask."""
        h, doc, tok_count = self.shingle_hashes(texts)
        # Permutations along rows and shingles along columns: reduceat then runs over contiguous memory,
        # about 9x faster than the transposed layout; blocks of _CHUNK columns stay in cache.
        return self._signatures_of(h, doc, len(texts)), tok_count == 0

    def band_keys(self, sig: np.ndarray) -> np.ndarray:
        """(docs, num_bands) uint64: one hash of each band's rows; equal keys make LSH candidates."""
        r = self.config.rows_per_band
        keys = np.zeros((sig.shape[0], self.config.num_bands), dtype=np.uint64)
        for j in range(r):
            keys = splitmix64(keys ^ (sig[:, j::r] + np.uint64(j)))
        return keys

    def keys_for(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Band keys of raw texts, and which texts are empty after normalization (never candidates)."""
        sig, empty = self.signatures(texts)
        return self.band_keys(sig), empty

    def keys_and_sketches(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``keys_for`` plus each text's bottom-k sketch (``sketch_size`` columns; None when verification
        is off), from one pass over the shingles."""
        h, doc, tok_count = self.shingle_hashes(texts)
        sig = self._signatures_of(h, doc, len(texts))
        sketches = sketch_rows(h, doc, len(texts), self.config.sketch_size) if self.config.verify_threshold else None
        return self.band_keys(sig), tok_count == 0, sketches

    def _signatures_of(self, h: np.ndarray, doc: np.ndarray, n: int) -> np.ndarray:
        sig = np.full((self.config.num_perm, n), np.iinfo(np.uint64).max, dtype=np.uint64)
        block = np.empty((self.config.num_perm, min(_CHUNK, len(h))), dtype=np.uint64)
        a, b = self.a[:, None], self.b[:, None]
        for lo in range(0, len(h), _CHUNK):
            hc, dc = h[lo : lo + _CHUNK], doc[lo : lo + _CHUNK]
            m = block[:, : len(hc)]
            np.multiply(a, hc[None, :], out=m)
            np.add(m, b, out=m)
            seg = np.flatnonzero(np.concatenate(([True], dc[1:] != dc[:-1])))
            rows = dc[seg]
            sig[:, rows] = np.minimum(sig[:, rows], np.minimum.reduceat(m, seg, axis=1))
        return np.ascontiguousarray(sig.T)


# -- candidate verification ---------------------------------------------------------------------------------


def sketch_rows(h: np.ndarray, doc: np.ndarray, n: int, k: int) -> np.ndarray:
    """(n, k) uint32 bottom-k sketches: per document the ``k`` smallest distinct values of the top 32 bits
    of its shingle hashes, ascending, padded with ``SKETCH_PAD`` (a document with fewer than ``k``
    distinct shingles has its whole set there). A real value 0xFFFFFFFF is stored as 0xFFFFFFFE."""
    v = np.minimum(h >> np.uint64(32), np.uint64(0xFFFFFFFE))
    key = np.sort((doc.astype(np.uint64) << np.uint64(32)) | v)  # np.unique hashes first: 4x slower here
    key = key[np.concatenate(([True], key[1:] != key[:-1]))] if len(key) else key
    d = (key >> np.uint64(32)).astype(np.int64)
    rank = np.arange(len(key)) - np.searchsorted(d, np.arange(n))[d]
    keep = rank < k
    out = np.full((n, k), SKETCH_PAD, dtype=np.uint32)
    out[d[keep], rank[keep]] = (key[keep] & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    return out


def sketch_jaccard(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row-wise Jaccard of two stacks of bottom-k sketches: (shared, union, exact) per row.

    Both rows complete (fewer than k values: the whole shingle sets): shared / union is the exact
    Jaccard of the sets. Otherwise the k smallest distinct values of the two rows are the bottom-k of
    the union of the sets, a uniform sample of k of its elements; ``shared`` counts those in both
    sketches: hypergeometric, mean ``k * J``, standard deviation at most ``sqrt(k * J * (1 - J))``.
    """
    k = a.shape[1]
    cat = np.sort(np.concatenate((a, b), axis=1), axis=1)
    valid = cat != SKETCH_PAD
    new = np.ones(cat.shape, dtype=bool)
    new[:, 1:] = cat[:, 1:] != cat[:, :-1]
    exact = (a[:, -1] == SKETCH_PAD) & (b[:, -1] == SKETCH_PAD)
    rank = np.cumsum(new & valid, axis=1, dtype=np.int32)
    within = valid & ((rank <= k) | exact[:, None])
    return (within & ~new).sum(axis=1), (within & new).sum(axis=1), exact


def verify_margin(threshold: float, sketch_size: int, recall: float = 0.99) -> float:
    """How far below ``threshold`` a sampled sketch estimate may fall and still be kept:
    ``z * sqrt(t * (1 - t) / k)`` with ``z`` the standard normal quantile of ``recall``, so a pair at
    Jaccard ``t`` (or above: the deviation shrinks there) passes with probability at least ``recall``."""
    if recall <= 0.5:
        return 0.0
    return NormalDist().inv_cdf(recall) * math.sqrt(threshold * (1.0 - threshold) / sketch_size)


def accept_pairs(a: np.ndarray, b: np.ndarray, threshold: float, margin: float) -> np.ndarray:
    """Which rows' sketches pass verification (see ``MinHashConfig``)."""
    shared, union, exact = sketch_jaccard(a, b)
    need = np.where(exact, threshold, threshold - margin) * union
    return (union > 0) & (shared >= need - 1e-9)


def candidate_probability(s: float | np.ndarray, bands: int, rows: int) -> np.ndarray:
    """P(two documents of Jaccard ``s`` share at least one band key): ``1 - (1 - s^rows)^bands``."""
    return 1.0 - (1.0 - np.asarray(s, dtype=np.float64) ** rows) ** bands


def _integrate(f, lo: float, hi: float, degree: int) -> float:
    """Gauss-Legendre quadrature, exact (to rounding) for polynomials up to ``degree``."""
    x, w = np.polynomial.legendre.leggauss(max(8, degree // 2 + 1))
    half = (hi - lo) / 2
    return float(half * np.sum(w * f(half * x + (hi + lo) / 2)))


def false_positive_area(threshold: float, bands: int, rows: int) -> float:
    """Integral of the candidate probability over Jaccard 0..threshold (pairs that should not match)."""
    return _integrate(lambda s: candidate_probability(s, bands, rows), 0.0, threshold, bands * rows)


def false_negative_area(threshold: float, bands: int, rows: int) -> float:
    """Integral of the miss probability over Jaccard threshold..1 (pairs that should match)."""
    return _integrate(lambda s: 1.0 - candidate_probability(s, bands, rows), threshold, 1.0, bands * rows)


@dataclass(frozen=True)
class LSHParams:
    """A bands x rows layout and what it does at a Jaccard threshold (written to ``stats.json``)."""

    bands: int
    rows: int
    threshold: float
    false_positive_area: float
    false_negative_area: float
    recall_at_threshold: float
    chosen: bool

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows

    def describe(self) -> str:
        how = "chosen" if self.chosen else "given"
        grey = ", ".join(f"J={j}: {float(candidate_probability(j, self.bands, self.rows)):.3f}" for j in (0.5, 0.7))
        return (
            f"LSH {self.bands} bands x {self.rows} rows ({how}, {self.num_perm} permutations) for Jaccard >= "
            f"{self.threshold:g}: P(candidate | J={self.threshold:g}) = {self.recall_at_threshold:.4f}; "
            f"false-positive area {self.false_positive_area:.4f}, false-negative area "
            f"{self.false_negative_area:.5f}; P(candidate) at {grey}"
        )


def lsh_params(threshold: float, bands: int, rows: int, chosen: bool = False) -> LSHParams:
    """The probabilities of a given layout at ``threshold``."""
    return LSHParams(
        bands,
        rows,
        threshold,
        false_positive_area(threshold, bands, rows),
        false_negative_area(threshold, bands, rows),
        float(candidate_probability(threshold, bands, rows)),
        chosen,
    )


def optimal_lsh_params(
    threshold: float = 0.8,
    num_perm: int = 112,
    fp_weight: float = 0.5,
    fn_weight: float = 0.5,
    min_recall: float = 0.99,
) -> LSHParams:
    """The bands x rows (``bands * rows <= num_perm``) minimizing the weighted error, as datasketch does.

    Error = ``fp_weight * FP + fn_weight * FN`` with FP the integral of the S-curve
    ``1 - (1 - s^r)^b`` over Jaccard ``[0, threshold]`` and FN the integral of its complement over
    ``[threshold, 1]``. Only layouts whose candidate probability at the threshold (the lowest over
    ``[threshold, 1]``, so the recall floor of every pair at or above it) is at least ``min_recall``
    compete. Ties go to fewer permutations, then fewer bands.
    """
    if not 0.0 < threshold < 1.0:
        raise UserError(f"--threshold must be between 0 and 1 (exclusive), got {threshold}")
    if num_perm < 1:
        raise UserError("--num-perm must be at least 1")
    if fp_weight < 0 or fn_weight < 0 or fp_weight + fn_weight <= 0:
        raise UserError("--fp-weight and --fn-weight must be non-negative and not both 0")
    if not 0.0 <= min_recall < 1.0:
        raise UserError(f"--min-recall must be in [0, 1), got {min_recall}")
    best: tuple[float, int, int] | None = None
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            if float(candidate_probability(threshold, b, r)) < min_recall:
                continue
            err = fp_weight * false_positive_area(threshold, b, r) + fn_weight * false_negative_area(threshold, b, r)
            key = (err, b * r, b)
            if best is None or key < best:
                best = key
    if best is None:
        # b = num_perm, r = 1 has the highest candidate probability of all layouts.
        top = float(candidate_probability(threshold, num_perm, 1))
        raise UserError(
            f"no bands x rows within {num_perm} permutations finds pairs at Jaccard {threshold:g} with probability "
            f"{min_recall:g} (at most {top:.4f}); raise --num-perm or lower --min-recall"
        )
    _, perms, b = best
    return lsh_params(threshold, b, perms // b, chosen=True)


def components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Connected components of an edge list: each node's label is the smallest node index in its component.

    Min-label hooking plus pointer jumping, all vectorized; converges in a few rounds on real graphs.
    """
    label = np.arange(n, dtype=np.int64)
    while True:
        lu, lv = label[u], label[v]
        if np.array_equal(lu, lv):
            return label
        m = np.minimum(lu, lv)
        np.minimum.at(label, lu, m)
        np.minimum.at(label, lv, m)
        while True:
            nxt = label[label]
            if np.array_equal(nxt, label):
                break
            label = nxt
