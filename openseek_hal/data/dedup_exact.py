"""The `dedup-exact` stage: remove repeated byte spans with a suffix array (Lee et al., 2022).

Documents are read into a shard buffer (UTF-8 text, one 0xFF byte after each document; 0xFF never occurs
in UTF-8). For the shard, pydivsufsort gives the suffix array and its LCP array. Suffixes whose first
``min_bytes`` bytes are equal sit next to each other in the suffix array, so each run of neighbours with
``LCP >= min_bytes`` is one repeated window; every occurrence but the earliest is marked. The union of the
marked windows is exactly the set of bytes inside a repeat of length >= ``min_bytes`` that also occurs
earlier, so the first occurrence of every repeated span stays and later ones are cut. A cut never splits
a UTF-8 character (a partly repeated character is kept). A document left with only whitespace by
its cuts is dropped. Corpora larger than ``shard_bytes`` are processed shard by shard: repeats are
found within a shard. Memory: the shard's text bytes, its suffix array and LCP array, and the cut
intervals; documents are not held, the input is read a second time to write them.
"""

from __future__ import annotations

import time

import numpy as np

from ..errors import UserError
from .io import Malformed, ShardWriter, check_output_dir, check_shard_options, discover, dumps, iter_raw, parse
from .outdir import StageOutput
from .runner import OutputOptions, Stats, progress, report

_SEP = 0xFF


def _links_kasai(buf: np.ndarray, sa: np.ndarray, min_bytes: int) -> np.ndarray:
    """``link[i]``: suffixes ``sa[i]`` and ``sa[i + 1]`` share ``min_bytes`` bytes, from the LCP array."""
    from pydivsufsort import kasai

    return kasai(buf, sa)[:-1] >= min_bytes  # kasai holds a rank and an LCP array: 8 bytes per byte


def _links_by_words(buf: np.ndarray, sa: np.ndarray, min_bytes: int, chunk: int = 1 << 16) -> np.ndarray:
    """The same links without an LCP array: neighbours are compared 8 bytes at a time, in chunks.

    Pairs drop out at their first differing word, so most need one or two compares. Padding is zeros
    past the final 0xFF separator; a window reaching it is rejected later as crossing a document end.
    """
    n = len(buf)
    padded = np.zeros(n + min_bytes + 8, dtype=np.uint8)
    padded[:n] = buf
    words = np.ndarray((n + min_bytes + 1,), dtype="<u8", buffer=padded, strides=(1,))  # unaligned view
    link = np.zeros(n - 1, dtype=bool)
    for lo in range(0, n - 1, chunk):
        a = sa[lo : min(lo + chunk, n - 1)].astype(np.int64)
        b = sa[lo + 1 : lo + 1 + len(a)].astype(np.int64)
        alive = np.arange(len(a))
        for k in range(0, min_bytes, 8):
            diff = words[a[alive] + k] ^ words[b[alive] + k]
            if min_bytes - k < 8:  # little-endian: the first bytes are the low bits
                diff &= np.uint64((1 << (8 * (min_bytes - k))) - 1)
            alive = alive[diff == 0]
            if not alive.size:
                break
        link[lo + alive] = True
    return link


_CHUNK = 1 << 22  # suffix-array entries / bytes per vectorized step: bounds the temporaries


def _mark_later_copies(sa: np.ndarray, link: np.ndarray, doc_ends: np.ndarray, min_bytes: int) -> np.ndarray:
    """Bool per byte: a window of ``min_bytes`` starts here that occurred earlier in the same shard.

    Each run of linked suffix-array neighbours shares one window; all but its smallest position are
    later copies. Windows crossing a document end are ignored. Runs never straddle a chunk: a chunk
    ends where the link is off.
    """
    n = len(sa)
    later = np.zeros(n, dtype=bool)
    lo = 0
    while lo < n - 1:
        hi = min(lo + _CHUNK, n - 1)
        while hi < n - 1 and link[hi - 1]:  # extend to the end of the current run
            window = link[hi : hi + (1 << 16)]
            hi += len(window) if window.all() else int(np.argmin(window)) + 1
        chunk = link[lo:hi]
        members = np.flatnonzero(np.concatenate((chunk, [False])) | np.concatenate(([False], chunk)))
        if len(members):
            starts_group = np.ones(len(members), dtype=bool)
            starts_group[1:] = ~chunk[members[1:] - 1]
            pos = sa[lo + members].astype(np.int64)
            first = np.minimum.reduceat(pos, np.flatnonzero(starts_group))[np.cumsum(starts_group) - 1]
            copies = pos[pos != first]
            valid = copies + min_bytes <= doc_ends[np.searchsorted(doc_ends, copies)]
            later[copies[valid]] = True
        lo = hi
    return later


def repeated_spans(
    buf: np.ndarray, doc_ends: np.ndarray, min_bytes: int, low_memory: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Byte ranges ``[starts[i], ends[i])`` of ``buf`` to cut: later copies of spans >= ``min_bytes``.

    ``doc_ends`` are the separator positions (ascending); no range crosses one. Ranges are disjoint,
    ascending, and shrunk to whole UTF-8 characters. ``low_memory`` finds neighbouring suffixes that
    share ``min_bytes`` bytes without an LCP array (peak about 6 instead of 13 bytes per text byte,
    about 2-4x slower at that step).
    """
    from pydivsufsort import divsufsort

    empty = np.zeros(0, dtype=np.int64)
    if len(buf) <= min_bytes:
        return empty, empty
    sa = divsufsort(buf)
    link = (_links_by_words if low_memory else _links_kasai)(buf, sa, min_bytes)
    later = _mark_later_copies(sa, link, doc_ends, min_bytes)
    del sa, link
    # Byte p is removed when a marked window starts in (p - min_bytes, p]: a windowed count, in chunks.
    count = np.cumsum(later, dtype=np.int32)
    del later
    removed = np.zeros(len(buf) + 1, dtype=np.int8)  # one spare zero so runs always end
    for lo in range(0, len(buf), _CHUNK):
        hi = min(lo + _CHUNK, len(buf))
        behind = np.zeros(hi - lo, dtype=np.int32)
        src = np.arange(lo, hi) - min_bytes
        behind[src >= 0] = count[src[src >= 0]]
        removed[lo:hi] = count[lo:hi] > behind
    del count
    edges = np.diff(removed, prepend=np.int8(0))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    del removed, edges
    if buf.dtype != np.uint8:  # token ids: every unit is whole
        return starts, ends
    # A range edge inside a character moves inwards to a character boundary (<= 3 continuation bytes).
    for _ in range(3):
        starts = starts + ((buf[starts] & 0xC0) == 0x80)
        ends = ends - ((ends < len(buf)) & ((buf[np.minimum(ends, len(buf) - 1)] & 0xC0) == 0x80))
    keep = starts < ends
    return starts[keep], ends[keep]


def _cut_intervals(
    starts: np.ndarray, ends: np.ndarray, doc_ends: np.ndarray, first_doc: int
) -> dict[int, list[tuple[int, int]]]:
    """Ranges as ``{doc index: [(start, end) in the document's bytes]}``."""
    docs = np.searchsorted(doc_ends, starts)
    doc_begin = np.concatenate(([0], doc_ends[:-1] + 1))
    cuts: dict[int, list[tuple[int, int]]] = {}
    for d, a, b in zip(docs.tolist(), starts.tolist(), ends.tolist()):
        cuts.setdefault(first_doc + d, []).append((a - int(doc_begin[d]), b - int(doc_begin[d])))
    return cuts


def _apply_cuts(data, cuts: list[tuple[int, int]]):
    pieces, at = [], 0
    for a, b in cuts:
        pieces.append(data[at:a])
        at = b
    pieces.append(data[at:])
    return data[:0].join(pieces)


class _Bytes:
    """Units are UTF-8 bytes; 0xFF (never in UTF-8) separates documents."""

    dtype, sep = np.uint8, _SEP

    def encode(self, text: str) -> bytes:
        return text.encode("utf-8")

    def cut(self, text: str, cuts: list[tuple[int, int]]) -> str:
        return _apply_cuts(text.encode("utf-8"), cuts).decode("utf-8")


class _Tokens:
    """Units are token ids of a ``tokenizers`` JSON file; the id ``vocab_size`` separates documents.

    Cuts in tokens become cuts in characters through the tokenizer's offsets.
    """

    dtype = np.int32

    def __init__(self, tokenizer_path: str):
        from .tokenize import load_tokenizer

        self.tok = load_tokenizer(tokenizer_path)
        self.sep = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def cut(self, text: str, cuts: list[tuple[int, int]]) -> str:
        offsets = self.tok.encode(text, add_special_tokens=False).offsets
        return _apply_cuts(text, [(offsets[a][0], offsets[b - 1][1]) for a, b in cuts])


def dedup_exact(
    inputs: list[str],
    out: OutputOptions,
    min_bytes: int = 100,
    text_key: str = "text",
    shard_bytes: int = 1 << 30,
    low_memory: bool = False,
    tokenizer: str | None = None,
    min_tokens: int = 50,
) -> Stats:
    """Two passes: find the cuts shard by shard holding only the units, then stream and apply them.

    Units are UTF-8 bytes (repeats of ``min_bytes``), or token ids of ``tokenizer`` (``min_tokens``).
    """
    min_units = min_tokens if tokenizer else min_bytes
    if min_units < 1:
        raise UserError("--min-bytes and --min-tokens must be at least 1")
    if tokenizer and low_memory:
        raise UserError("--low-memory works on bytes only; drop it or --tokenizer")
    check_shard_options(out.shard_docs, out.compression)
    files = discover(inputs)
    check_output_dir(out.out_dir, files)
    units = _Tokens(tokenizer) if tokenizer else _Bytes()
    stats = Stats(
        "dedup-exact",
        config={
            "unit": "tokens" if tokenizer else "bytes",
            "min_units": min_units,
            "tokenizer": tokenizer,
            "text_key": text_key,
            "shard_bytes": shard_bytes,
            "low_memory": low_memory,
        },
    )
    start = time.perf_counter()
    cuts: dict[int, list[tuple[int, int]]] = {}
    # Bytes grow one bytearray in place (no second copy at the end); token ids are concatenated.
    pieces: bytearray | list = bytearray() if units.dtype == np.uint8 else []
    lengths: list[int] = []
    size = first_doc = shards = 0

    def flush() -> None:
        nonlocal pieces, lengths, size, first_doc, shards
        arr = np.frombuffer(pieces, dtype=np.uint8) if units.dtype == np.uint8 else np.concatenate(pieces)
        pieces = bytearray() if units.dtype == np.uint8 else []
        doc_ends = np.cumsum(np.array(lengths, dtype=np.int64) + 1) - 1
        spans = repeated_spans(arr, doc_ends, min_units, low_memory)
        del arr
        cuts.update(_cut_intervals(*spans, doc_ends, first_doc))
        first_doc += len(lengths)
        lengths, size, shards = [], 0, shards + 1

    sep = np.array([units.sep], dtype=np.int32)
    itemsize = np.dtype(units.dtype).itemsize
    with progress("exact dedup: suffix arrays", out.quiet) as advance:
        for raw in iter_raw(files):
            doc = parse(raw, text_key, stats.malformed)
            if doc is None:
                continue
            data = units.encode(doc[text_key])
            if isinstance(pieces, bytearray):
                pieces += data
                pieces.append(_SEP)
            else:
                pieces += [data, sep]
            lengths.append(len(data))
            size += (len(data) + 1) * itemsize
            stats.docs_in += 1
            stats.bytes_in += len(doc[text_key].encode("utf-8"))
            if size >= shard_bytes:
                advance(len(lengths))
                flush()
        if lengths:
            advance(len(lengths))
            flush()
    with StageOutput(out.out_dir, stats.stage) as output:
        documents = _write(files, cuts, units, output.dir, out, text_key, stats)
        stats.seconds = time.perf_counter() - start
        stats.extra.update(
            shards=shards,
            bytes_removed=stats.bytes_in - stats.bytes_out,
            docs_changed=len(cuts),
            mb_per_second=round(stats.bytes_in / 1e6 / max(stats.seconds, 1e-9), 2),
        )
        output.commit(stats.to_dict(), documents)
    report(stats, out.out_dir, out.quiet)
    return stats


def _write(
    files,
    cuts: dict[int, list[tuple[int, int]]],
    units,
    out_dir,
    out: OutputOptions,
    text_key: str,
    stats: Stats,
) -> dict[str, int]:
    writer = ShardWriter(out_dir, out.shard_docs, out.compression)
    i = 0
    try:
        with progress("exact dedup: writing", out.quiet, total=stats.docs_in) as advance:
            for raw in iter_raw(files):
                doc = parse(raw, text_key, Malformed())
                if doc is None:
                    continue
                cut = cuts.get(i)
                i += 1
                advance()
                if cut is not None:
                    doc = {**doc, text_key: units.cut(doc[text_key], cut)}
                    if not doc[text_key].strip():  # nothing but repeats: drop it rather than keep a husk
                        stats.removed["exact_duplicate_doc"] += 1
                        continue
                stats.bytes_out += len(doc[text_key].encode("utf-8"))
                writer.write(dumps(doc))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    stats.docs_out = writer.docs
    return writer.documents
