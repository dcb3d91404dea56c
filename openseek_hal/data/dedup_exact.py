"""The `dedup-exact` stage: remove repeated byte spans with a suffix array (Lee et al., 2022).

Documents are read into a shard buffer (UTF-8 text, one 0xFF byte after each document; 0xFF never occurs
in UTF-8). For the shard, pydivsufsort gives the suffix array and its LCP array. Suffixes whose first
``min_bytes`` bytes are equal sit next to each other in the suffix array, so each run of neighbours with
``LCP >= min_bytes`` is one repeated window; every occurrence but the earliest is marked. The union of the
marked windows is exactly the set of bytes inside a repeat of length >= ``min_bytes`` that also occurs
earlier, so the first occurrence of every repeated span stays and later ones are cut. A cut never splits
a UTF-8 character (a partly repeated character is kept). A document left with only whitespace is dropped. Corpora larger than ``shard_bytes`` are processed shard by shard: repeats are
found within a shard.
"""

from __future__ import annotations

import time

import numpy as np

from ..errors import UserError
from .io import ShardWriter, check_output_dir, discover, dumps, iter_raw, parse
from .runner import OutputOptions, Stats, progress, report

_SEP = 0xFF


def repeated_mask(buf: np.ndarray, doc_ends: np.ndarray, min_bytes: int) -> np.ndarray:
    """Bool mask of bytes of ``buf`` to remove: later occurrences of spans of >= ``min_bytes`` bytes.

    ``doc_ends`` are the separator positions (ascending); no marked window crosses one.
    """
    from pydivsufsort import divsufsort, kasai

    n = len(buf)
    removed = np.zeros(n, dtype=bool)
    if n <= min_bytes:
        return removed
    sa = divsufsort(buf)
    lcp = kasai(buf, sa)  # lcp[i] = common prefix of suffixes sa[i] and sa[i + 1]
    link = lcp[:-1] >= min_bytes
    del lcp
    members = np.flatnonzero(np.concatenate((link, [False])) | np.concatenate(([False], link)))
    if len(members) == 0:
        return removed
    starts_group = np.ones(len(members), dtype=bool)
    inner = members > 0
    starts_group[inner] = ~link[members[inner] - 1]
    pos = sa[members].astype(np.int64)
    del sa, link
    group_start = np.flatnonzero(starts_group)
    first = np.minimum.reduceat(pos, group_start)[np.cumsum(starts_group) - 1]
    later = pos[pos != first]
    end_of_doc = doc_ends[np.searchsorted(doc_ends, later)]
    marked = np.sort(later[later + min_bytes <= end_of_doc])
    if len(marked) == 0:
        return removed
    # Merge the windows [s, s + min_bytes) into disjoint intervals, then paint them.
    reach = np.maximum.accumulate(marked + min_bytes)
    new = np.concatenate(([True], marked[1:] > reach[:-1]))
    iv_start = marked[new]
    iv_end = reach[np.concatenate((np.flatnonzero(new)[1:] - 1, [len(marked) - 1]))]
    paint = np.zeros(n + 1, dtype=np.int8)
    paint[iv_start] += 1
    paint[iv_end] -= 1
    removed = np.cumsum(paint[:-1], dtype=np.int8) > 0
    return _whole_chars(buf, removed)


def _whole_chars(buf: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Un-remove every byte of a UTF-8 character that is only partly removed."""
    char_start = np.flatnonzero((buf & 0xC0) != 0x80)
    keep_char = np.maximum.reduceat(~removed, char_start)
    lengths = np.diff(np.concatenate((char_start, [len(buf)])))
    return ~np.repeat(keep_char, lengths)


def dedup_exact(inputs: list[str], out: OutputOptions, min_bytes: int = 100, text_key: str = "text",
                shard_bytes: int = 1 << 30) -> Stats:
    if min_bytes < 1:
        raise UserError("--min-bytes must be at least 1")
    files = discover(inputs)
    check_output_dir(out.out_dir, files)
    stats = Stats("dedup-exact", config={"min_bytes": min_bytes, "text_key": text_key,
                                         "shard_bytes": shard_bytes})
    start = time.perf_counter()
    writer = ShardWriter(out.out_dir, out.shard_docs, out.compression)
    pending: list[tuple[dict, bytes]] = []
    size = 0
    shards = 0
    try:
        with progress("exact dedup", out.quiet, unit="docs") as advance:
            for raw in iter_raw(files):
                doc = parse(raw, text_key, stats.malformed)
                if doc is None:
                    continue
                data = doc[text_key].encode("utf-8")
                pending.append((doc, data))
                size += len(data) + 1
                stats.docs_in += 1
                stats.bytes_in += len(data)
                if size >= shard_bytes:
                    advance(_flush(pending, min_bytes, text_key, writer, stats))
                    pending, size, shards = [], 0, shards + 1
            if pending:
                advance(_flush(pending, min_bytes, text_key, writer, stats))
                shards += 1
    except BaseException:
        writer.abort()
        raise
    writer.close()
    stats.docs_out = writer.docs
    stats.seconds = time.perf_counter() - start
    stats.extra.update(shards=shards, bytes_removed=stats.bytes_in - stats.bytes_out,
                       mb_per_second=round(stats.bytes_in / 1e6 / max(stats.seconds, 1e-9), 2))
    report(stats, out.out_dir, out.quiet)
    return stats


def _flush(pending: list[tuple[dict, bytes]], min_bytes: int, text_key: str, writer: ShardWriter,
           stats: Stats) -> int:
    buf = np.frombuffer(bytearray(b"\xff".join(d for _, d in pending) + b"\xff"), dtype=np.uint8)
    lengths = np.array([len(d) for _, d in pending], dtype=np.int64)
    doc_ends = np.cumsum(lengths + 1) - 1
    keep = ~repeated_mask(buf, doc_ends, min_bytes)
    for (doc, data), end, length in zip(pending, doc_ends.tolist(), lengths.tolist()):
        begin = end - length
        kept_mask = keep[begin:end]
        if kept_mask.all():
            text = doc[text_key]
        else:
            text = buf[begin:end][kept_mask].tobytes().decode("utf-8")
            stats.extra["docs_changed"] = stats.extra.get("docs_changed", 0) + 1
        if not text.strip():
            stats.removed["exact_duplicate_doc"] += 1
            continue
        stats.bytes_out += len(text.encode("utf-8"))
        writer.write(dumps({**doc, text_key: text}))
    return len(pending)

