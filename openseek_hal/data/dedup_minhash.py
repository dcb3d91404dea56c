"""The `dedup-minhash` stage: MinHash LSH fuzzy deduplication over the whole input.

Staged and out of core (the default). Each stage reads what the one before it left in a work folder
(``--work-dir``), so the stages can also run apart (``--stage``), one after the other:

1. ``signatures``: one task per input file or piece of one (in parallel, ``--executor local|ray``) computes every
   document's band keys and writes ``keys-NNNNN.bin`` (``bands`` uint64 per document),
   ``empty-NNNNN.bin`` (documents that normalize to nothing, never candidates) and ``bad-NNNNN.bin``
   (the indices among the piece's records of the malformed ones);
2. ``buckets``: the keys are streamed into bucket files partitioned by band and by the key's top bits,
   so that one partition sorted in memory fits in ``--max-memory``; each partition (a task) is sorted
   by key and every document is linked to the first (lowest) document of its key: ``pairs-*.bin``;
3. ``clusters``: union-find over integer document ids on a memory-mapped label file (8 bytes per
   document), the pair files read in chunks; every label ends as the lowest document of its cluster;
4. ``filter``: the input is streamed again and the first document of each cluster (in input order) is
   kept, its line passed through byte for byte (not parsed again: ``bad-*.bin`` says which records to
   skip); ``clusters.jsonl`` says which document was removed for which.

Candidate verification (on unless ``config.verify_threshold`` is None): the signatures stage also writes
each document's bottom-k sketch (``sketch-NNNNN.bin`` values, ``sketchoff-NNNNN.bin`` offsets), the
buckets stage pairs each document with up to ``WINDOW`` earlier ones of its key instead of only the
first, and the clusters stage joins a pair only if its sketch Jaccard passes (``minhash.accept_pairs``),
verifying the pairs of each chunk that are not already in one cluster, sorted by document id.

Documents with equal keys in a band always land in the same partition, so the links, the clusters and
the output are exactly those of the one-process path (``--in-memory``: all keys in one memory-mapped
file, one sort per band, ``minhash.components``), which is kept as the reference.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import click
import numpy as np

from ..errors import UserError
from ..fileio import FolderLock
from .executor import ordered_map
from .io import (
    PARQUET_SUFFIXES,
    Malformed,
    RawLine,
    ShardWriter,
    check_output_dir,
    check_shard_options,
    decode_line,
    discover,
    dumps,
    iter_raw,
    line_text,
    open_text,
    parse,
)
from .minhash import SKETCH_PAD, LSHParams, MinHashConfig, MinHasher, accept_pairs, components
from .outdir import StageOutput
from .runner import OutputOptions, Stats, batched, progress, report

STAGES = ("all", "signatures", "buckets", "clusters", "filter")
DEFAULT_MAX_MEMORY = 1 << 30
_BUCKET_BYTES = 48  # per (key, id) entry while a partition is sorted: the entry, argsort's index, sorted copies
_PAIR_BYTES = 96  # per pair while a chunk is merged: the pair, two root arrays and temporaries
_VERIFY_BYTES = 24  # per sketch value of a pair being verified: both rows, the merged row, masks, ranks
_PAGE = 4096  # a sketch row read from a mapped file maps at least a page while the chunk is gathered
WINDOW = 32  # with verification, each document of a bucket is paired with up to this many before it
_RECORD = np.dtype([("key", "<u8"), ("id", "<i8")])
_MAX_OPEN = 256  # bucket files open at once while partitioning
PLAIN_SUFFIXES = (".jsonl", ".json", ".ndjson")
SignatureTask = tuple[int, str, str, int, int | None, int]
MIN_PIECE_BYTES = 16 << 20  # smallest piece a plain JSONL file is cut into for the signature tasks


def parse_size(text: str | int) -> int:
    """``512M``, ``2G``, ``1.5GB``, ``1000000`` (bytes) -> bytes; ``UserError`` otherwise."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", text.lower())
        if m is None:
            raise UserError(f"--max-memory: cannot read '{text}' as a size (like 512M, 2G)")
        value = int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))
    if value < 1 << 20:
        raise UserError(f"--max-memory must be at least 1M, got {text}")
    return value


class _KeysBatch:
    def __init__(self, config: MinHashConfig, text_key: str):
        self.config, self.text_key = config, text_key
        self.hasher: MinHasher | None = None

    def setup(self) -> None:
        self.hasher = MinHasher(self.config)

    def __call__(self, batch: list[RawLine]):
        """(keys, empty, sketches, malformed, text bytes, indices in the batch of the malformed records)."""
        assert self.hasher is not None
        malformed = Malformed()
        docs = [parse(raw, self.text_key, malformed) for raw in batch]
        texts = [d[self.text_key] for d in docs if d is not None]
        bad = [j for j, d in enumerate(docs) if d is None]
        if not texts:
            k = self.config.sketch_size if self.config.verify_threshold else 0
            return (np.zeros((0, self.config.num_bands), np.uint64), np.zeros(0, bool), np.zeros((0, k), np.uint32),
                    malformed, 0, bad)
        keys, empty, sketches = self.hasher.keys_and_sketches(texts)
        return keys, empty, sketches, malformed, sum(len(t.encode("utf-8")) for t in texts), bad


def cluster_labels(
    keys: np.ndarray, empty: np.ndarray, config: MinHashConfig | None = None, sketches: np.ndarray | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
) -> tuple[np.ndarray, dict[str, int]]:
    """Each document's cluster label (the index of the first document of its cluster), and the
    verification counts; candidates are verified against ``sketches`` when ``config`` asks for it."""
    n = keys.shape[0]
    verify = config is not None and config.verify_threshold is not None
    us, vs = [], []
    candidates = np.flatnonzero(~empty)
    for band in range(keys.shape[1]):
        u, v = _run_links(np.ascontiguousarray(keys[candidates, band]), candidates, WINDOW if verify else 0)
        us.append(u)
        vs.append(v)
    u = np.concatenate(us) if us else np.zeros(0, np.int64)
    v = np.concatenate(vs) if vs else np.zeros(0, np.int64)
    if not verify:
        return components(n, u, v), {}
    assert config is not None and sketches is not None
    labels = np.arange(n, dtype=np.int64)
    counts = link_verified(labels, u, v, lambda ids: np.asarray(sketches[ids]), config, max_memory)
    flatten_labels(labels, max(n, 1))
    return labels, counts


def _run_links(keys: np.ndarray, ids: np.ndarray, window: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs of documents with equal keys (``ids`` ascending in, (earlier, later) pairs out).

    ``window`` 0 links every document to the first of its key (enough for clusters of unverified links);
    otherwise every document is paired with each of the (up to) ``window`` documents before it with the
    same key, so that verification sees the pairs inside a bucket, not only those with its first member.
    """
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    is_start = np.ones(len(sk), dtype=bool)  # no key at all: no links (and no IndexError)
    is_start[1:] = sk[1:] != sk[:-1]
    if window == 0:
        run_first = order[np.flatnonzero(is_start)][np.cumsum(is_start) - 1]
        dup = ~is_start
        return ids[run_first[dup]], ids[order[dup]]
    run_start = np.flatnonzero(is_start)[np.cumsum(is_start) - 1]
    sid = ids[order]
    pos = np.flatnonzero(~is_start)
    us, vs = [], []
    for d in range(1, window + 1):
        pos = pos[pos - d >= run_start[pos]]
        if not len(pos):
            break
        us.append(sid[pos - d])
        vs.append(sid[pos])
    if not us:
        return ids[:0], ids[:0]
    return np.concatenate(us), np.concatenate(vs)


def link_verified(
    labels: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    sketches_of: Callable[[np.ndarray], np.ndarray],
    config: MinHashConfig,
    max_memory: int,
) -> dict[str, int]:
    """Union the candidate pairs ``u[k] -- v[k]`` that pass verification into ``labels`` (union-find).

    Pairs whose documents are already in one cluster are skipped (their verdict cannot change the
    clusters); the others are deduplicated, sorted by document id, and verified in chunks that fit
    ``max_memory``, ``sketches_of(ids)`` reading the sketch rows. The clusters are therefore those of
    all candidate pairs that pass, whatever the order or chunking of the pairs.
    """
    assert config.verify_threshold is not None
    k = config.sketch_size
    chunk = max(64, max_memory // (2 * (_VERIFY_BYTES * k + _PAGE)))
    checked = accepted = 0
    for lo in range(0, len(u), chunk):
        cu, cv = u[lo : lo + chunk], v[lo : lo + chunk]
        differ = _find(labels, cu) != _find(labels, cv)
        if not differ.any():
            continue
        pairs = np.unique(np.stack([cu[differ], cv[differ]], axis=1), axis=0)
        ok = accept_pairs(sketches_of(pairs[:, 0]), sketches_of(pairs[:, 1]), config.verify_threshold,
                          config.verify_margin)
        checked += len(pairs)
        accepted += int(ok.sum())
        union_pairs(labels, pairs[ok, 0], pairs[ok, 1])
    return {"pairs_verified": checked, "pairs_accepted": accepted}


class _SketchFiles:
    """Sketch rows by global document id, read from the per-piece files of the signatures stage:
    ``sketch-NNNNN.bin`` (each document's values, uint32, no padding) and ``sketchoff-NNNNN.bin`` (uint64
    offsets into it, one per document plus the end).

    Every call maps the files afresh and unmaps them before it returns, so the pages it read do not stay
    in the process's resident memory: a call costs about its rows, not the files.
    """

    def __init__(self, work: Path, shards: list[dict[str, Any]], k: int):
        self.work, self.k = work, k
        self.counts = [s["docs"] for s in shards]
        self.offsets = np.concatenate(([0], np.cumsum(self.counts))).astype(np.int64)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        out = np.full((len(ids), self.k), SKETCH_PAD, dtype=np.uint32)
        shard = np.searchsorted(self.offsets, ids, side="right") - 1
        for s in np.unique(shard):
            rows = np.flatnonzero(shard == s)
            local = ids[rows] - self.offsets[s]
            off = np.memmap(self.work / f"sketchoff-{s:05d}.bin", dtype=np.uint64, mode="r")
            begin, end = off[local].astype(np.int64), off[local + 1].astype(np.int64)
            del off
            lengths = end - begin
            total = int(lengths.sum())
            if not total:
                continue
            vals = np.memmap(self.work / f"sketch-{s:05d}.bin", dtype=np.uint32, mode="r")
            first = np.cumsum(lengths) - lengths  # where each row's values start in the gathered run
            col = np.arange(total) - np.repeat(first, lengths)
            out[np.repeat(rows, lengths), col] = vals[np.repeat(begin, lengths) + col]
            del vals
        return out


class _ShardSignatures:
    """Task: one input file -> its band keys and empty mask in the work folder; returns the file's counts."""

    def __init__(self, config: MinHashConfig, text_key: str, work: str, batch_size: int = 512):
        self.config, self.text_key, self.work, self.batch_size = config, text_key, work, batch_size
        self.hasher: MinHasher | None = None

    def setup(self) -> None:
        self.hasher = MinHasher(self.config)

    def __call__(self, task: SignatureTask) -> dict[str, Any]:
        assert self.hasher is not None
        index, path, where, begin, end, first_line = task
        work = Path(self.work)
        kinds = ("keys", "empty", "bad") + (("sketch", "sketchoff") if self.config.verify_threshold is not None else ())
        final = {kind: work / f"{kind}-{index:05d}.bin" for kind in kinds}
        tmp = {kind: f.with_name(f".{f.name}.tmp{os.getpid()}") for kind, f in final.items()}
        malformed, docs, nbytes, records = Malformed(), 0, 0, 0
        try:
            with (
                open(tmp["keys"], "wb") as kf,
                open(tmp["empty"], "wb") as ef,
                open(tmp["bad"], "wb") as bf,
                open(tmp.get("sketch", os.devnull), "wb") as sf,
                open(tmp.get("sketchoff", os.devnull), "wb") as of,
            ):
                written = 0
                of.write(np.zeros(1, np.uint64).tobytes())
                src = Path(where)
                if src.name.lower().endswith(PLAIN_SUFFIXES):  # as iter_raw would read it, without RawLines
                    items = (
                        line_text(path, lineno, line, self.text_key, malformed)
                        for lineno, line in _plain_lines(src, begin, end, first_line)
                    )
                else:
                    items = (
                        None if (d := parse(raw, self.text_key, malformed)) is None else d[self.text_key]
                        for raw in _named(src, path)
                    )
                for batch in batched(items, self.batch_size):
                    texts = [t for t in batch if t is not None]
                    if len(texts) < len(batch):  # the malformed records, by their index among the piece's
                        bad = [records + j for j, t in enumerate(batch) if t is None]
                        bf.write(np.array(bad, dtype=np.int64).tobytes())
                    records += len(batch)
                    if not texts:
                        continue
                    keys, empty, sketches = self.hasher.keys_and_sketches(texts)
                    kf.write(np.ascontiguousarray(keys).tobytes())
                    ef.write(empty.astype(np.uint8).tobytes())
                    if sketches is not None:  # the values without the padding, and where each row ends
                        real = sketches != SKETCH_PAD
                        sf.write(sketches[real].tobytes())
                        ends = written + np.cumsum(real.sum(axis=1), dtype=np.uint64)
                        of.write(ends.astype(np.uint64).tobytes())
                        written = int(ends[-1])
                    docs += len(texts)
                    nbytes += sum(len(t.encode("utf-8")) for t in texts)
            for kind in final:
                os.replace(tmp[kind], final[kind])
        finally:
            for f in tmp.values():
                f.unlink(missing_ok=True)
        return {"index": index, "docs": docs, "bytes": nbytes, "records": records, "malformed": asdict(malformed)}


def _named(path: Path, name: str) -> Iterator[RawLine]:
    """``iter_raw`` of one file read at ``path`` (absolute, for workers elsewhere), records named ``name``."""
    for raw in iter_raw([path]):
        yield raw if raw.file == name else replace(raw, file=name)


def _plain_lines(
    path: Path, begin: int = 0, end: int | None = None, first_line: int = 1
) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of the non-blank lines of a plain file that start in ``[begin, end)`` (to the
    end of the file if ``end`` is None): the records ``iter_raw`` would yield, undecoded."""
    try:
        with open(path, "rb") as fh:
            fh.seek(begin)
            pos, lineno = begin, first_line
            for line in fh:
                if end is not None and pos >= end:
                    break
                if line.strip():
                    yield lineno, line
                pos += len(line)
                lineno += 1
    except OSError as e:
        raise UserError(f"cannot read {path}: {e}") from e


def _iter_range(path: Path, begin: int, end: int, first_line: int, name: str | None = None) -> Iterator[RawLine]:
    """The records of a plain JSONL file whose lines start in ``[begin, end)``, as ``iter_raw`` yields them
    (named ``name``, the path as the user gave it, if given)."""
    name = str(path) if name is None else name
    for lineno, line in _plain_lines(path, begin, end, first_line):
        yield decode_line(name, lineno, line)


def signature_tasks(files: list[Path], workers: int) -> list[SignatureTask]:
    """One task per input file; plain JSONL files are also cut at line starts into pieces of about
    ``total / (8 * workers)`` bytes (16 MiB to 256 MiB), so a few large files still use every worker.

    A task is ``(index, path as given, absolute path, begin, end, first line number)``; ``end`` None means
    the whole file. Workers open the absolute path (a Ray worker's folder is not ours).
    """
    plain = [f for f in files if f.name.lower().endswith(PLAIN_SUFFIXES)]
    total = sum(f.stat().st_size for f in plain)
    piece = min(256 << 20, max(MIN_PIECE_BYTES, -(-total // (8 * max(workers, 1)))))
    tasks: list[SignatureTask] = []
    for f in files:
        size = f.stat().st_size if f in plain else 0
        if size <= piece:
            tasks.append((len(tasks), str(f), str(f.resolve()), 0, None, 1))
            continue
        bounds = [0]
        with open(f, "rb") as fh:
            for k in range(1, -(-size // piece)):
                fh.seek(k * piece - 1)
                fh.readline()  # to the start of the next line (or stay, if k * piece starts one)
                if bounds[-1] < fh.tell() < size:
                    bounds.append(fh.tell())
            bounds.append(size)
            # Line numbers at the cuts: newlines before each.
            fh.seek(0)
            lines, pos, firsts = 1, 0, []
            for b in bounds[:-1]:
                while pos < b:
                    chunk = fh.read(min(16 << 20, b - pos))
                    if not chunk:
                        break
                    lines += chunk.count(b"\n")
                    pos += len(chunk)
                firsts.append(lines)
        for b0, b1, first in zip(bounds[:-1], bounds[1:], firsts):
            tasks.append((len(tasks), str(f), str(f.resolve()), b0, b1, first))
    return tasks


class _BucketPairs:
    """Task: sort one bucket partition by key and write its links as ``pairs-*.bin`` (int64 pairs)."""

    def __init__(self, work: str, window: int = 0):
        self.work, self.window = work, window

    def setup(self) -> None:
        pass

    def __call__(self, name: str) -> int:
        work = Path(self.work)
        records = np.fromfile(work / name, dtype=_RECORD)
        u, v = _run_links(records["key"], records["id"], self.window)
        del records
        out = work / name.replace("bucket-", "pairs-")
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        np.stack([u, v], axis=1).astype(np.int64).tofile(tmp)
        os.replace(tmp, out)
        (work / name).unlink()
        return len(u)


def _find(labels: np.ndarray, x: np.ndarray) -> np.ndarray:
    r = labels[x]
    while True:
        nxt = labels[r]
        if np.array_equal(nxt, r):
            return r
        r = nxt


def union_pairs(labels: np.ndarray, u: np.ndarray, v: np.ndarray) -> None:
    """Union-find on ``labels`` (parent pointers, ``labels[i] <= i``) for the links ``u[k] -- v[k]``.

    The larger of two roots is hooked under the smaller (``np.minimum.at`` settles several hooks of one
    root in a round), so a root is always the lowest node of its tree; rounds repeat until every link
    has one root. Paths of the nodes seen are compressed.
    """
    while len(u):
        ru, rv = _find(labels, u), _find(labels, v)
        labels[u], labels[v] = ru, rv
        differ = ru != rv
        u, v, ru, rv = u[differ], v[differ], ru[differ], rv[differ]
        if len(u):
            np.minimum.at(labels, np.maximum(ru, rv), np.minimum(ru, rv))


def flatten_labels(labels: np.ndarray, chunk: int) -> None:
    """Point every node at its root, in ascending chunks (a root is below its nodes, so chunks converge)."""
    for lo in range(0, len(labels), chunk):
        labels[lo : lo + chunk] = _find(labels, np.arange(lo, min(lo + chunk, len(labels))))


class WorkDir:
    """The intermediate files of the staged path and what each finished stage recorded.

    ``plan.json`` names the inputs (path, size, mtime) and the options; a later stage with other inputs
    or options is refused. ``<stage>.json`` is written when a stage finishes; rerunning a stage drops
    the records of the stages after it.
    """

    def __init__(self, path: Path, plan: dict[str, Any]):
        self.path, self.plan = path, plan

    def record(self, stage: str) -> dict[str, Any]:
        f = self.path / f"{stage}.json"
        if not f.is_file():
            raise UserError(
                f"work folder {self.path} has no finished '{stage}' stage; run dedup-minhash --stage {stage} first"
            )
        return json.loads(f.read_text(encoding="utf-8"))

    def check_plan(self) -> None:
        f = self.path / "plan.json"
        if not f.is_file():
            raise UserError(
                f"work folder {self.path} holds no signatures; run dedup-minhash --stage signatures first"
            )
        if json.loads(f.read_text(encoding="utf-8")) != self.plan:
            raise UserError(
                f"work folder {self.path} was made for other inputs or options (or the inputs changed); "
                "rerun from --stage signatures or use another --work-dir"
            )

    def start(self, stage: str) -> None:
        for later in STAGES[STAGES.index(stage) :]:
            (self.path / f"{later}.json").unlink(missing_ok=True)

    def finish(self, stage: str, record: dict[str, Any]) -> None:
        tmp = self.path / f".{stage}.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
        os.replace(tmp, self.path / f"{stage}.json")


def _plan(files: list[Path], config: MinHashConfig, text_key: str) -> dict[str, Any]:
    inputs = []
    for f in files:
        st = f.stat()
        inputs.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return {"inputs": inputs, "config": asdict(config), "text_key": text_key}


def _note(quiet: bool, message: str) -> None:
    if not quiet:
        click.echo(f"dedup-minhash: {message}", err=True)


# Exactly what the stages write into a work folder: anything else there is the user's and stops the run.
_WORK_FILES = (
    "plan.json", "signatures.json", "buckets.json", "clusters.json", "keys-[0-9]*.bin", "empty-[0-9]*.bin",
    "sketch-[0-9]*.bin", "sketchoff-[0-9]*.bin", "bucket-b[0-9]*-p[0-9]*.bin", "pairs-b[0-9]*-p[0-9]*.bin",
    "bad-[0-9]*.bin", "labels.bin", ".keys-*.tmp*", ".empty-*.tmp*", ".sketch-*.tmp*", ".sketchoff-*.tmp*",
    ".pairs-*.tmp*", ".bad-*.tmp*",
    ".*.json.tmp*", ".lock",
)


def stage_signatures(
    work: WorkDir, files: list[Path], config: MinHashConfig, text_key: str, workers: int, executor: str,
    quiet: bool,
) -> dict[str, Any]:
    """Stage 1: band keys of every input file, one task per file or piece; clears the work folder first."""
    from fnmatch import fnmatch

    found = [p for p in work.path.iterdir()]
    foreign = [p.name for p in found if not any(fnmatch(p.name, pat) for pat in _WORK_FILES) or p.is_dir()]
    if foreign:
        raise UserError(
            f"work folder {work.path} holds {', '.join(sorted(foreign)[:3])}, which dedup-minhash did not write; "
            "choose an empty or new --work-dir"
        )
    for p in found:
        if p.name != ".lock":
            p.unlink()
    (work.path / "plan.json").write_text(json.dumps(work.plan) + "\n", encoding="utf-8")
    tasks = signature_tasks(files, workers)
    shards = []
    with (
        progress("minhash signatures", quiet, total=len(tasks), unit="pieces") as advance,
        closing(
            ordered_map(_ShardSignatures(config, text_key, str(work.path)), iter(tasks), workers, executor)
        ) as results,
    ):
        for res in results:
            shards.append(res)
            advance(1)
    record = {"shards": [{k: r[k] for k in ("docs", "bytes", "records", "malformed")} for r in shards]}
    work.finish("signatures", record)
    return record


def stage_buckets(
    work: WorkDir, bands: int, max_memory: int, workers: int, executor: str, quiet: bool, window: int = 0
) -> dict[str, Any]:
    """Stage 2: band keys into bucket partitions on disk, then each partition sorted into links."""
    work.check_plan()
    shards = work.record("signatures")["shards"]
    work.start("buckets")
    for p in work.path.glob("*-b*-p*.bin"):
        p.unlink()
    docs = sum(s["docs"] for s in shards)
    budget = max(max_memory // max(workers, 1), 4096)
    parts = max(1, math.ceil(docs * _BUCKET_BYTES / budget))
    chunk_rows = max(64, max_memory // (bands * 8 * 4))
    group = max(1, _MAX_OPEN // parts)
    names = [f"bucket-b{b:03d}-p{p:05d}.bin" for b in range(bands) for p in range(parts)]
    with progress("minhash buckets", quiet, total=docs * bands, unit="keys") as advance:
        for g0 in range(0, bands, group):
            band_group = range(g0, min(g0 + group, bands))
            handles = {(b, p): open(work.path / f"bucket-b{b:03d}-p{p:05d}.bin", "wb") for b in band_group
                       for p in range(parts)}
            try:
                offset = 0
                for i, shard in enumerate(shards):
                    n = shard["docs"]
                    if n == 0:
                        continue
                    keys = np.memmap(work.path / f"keys-{i:05d}.bin", dtype=np.uint64, mode="r", shape=(n, bands))
                    empty = np.fromfile(work.path / f"empty-{i:05d}.bin", dtype=np.uint8).astype(bool)
                    for lo in range(0, n, chunk_rows):
                        hi = min(lo + chunk_rows, n)
                        keep = np.flatnonzero(~empty[lo:hi])
                        block = np.asarray(keys[lo:hi])[keep]
                        ids = keep.astype(np.int64) + offset + lo
                        for b in band_group:
                            rec = np.empty(len(keep), dtype=_RECORD)
                            rec["key"], rec["id"] = block[:, b], ids
                            part = ((rec["key"] >> np.uint64(32)) * np.uint64(parts)) >> np.uint64(32)
                            order = np.argsort(part, kind="stable")
                            bounds = np.searchsorted(part[order], np.arange(parts + 1))
                            for p in range(parts):
                                if bounds[p + 1] > bounds[p]:
                                    handles[(b, p)].write(rec[order[bounds[p] : bounds[p + 1]]].tobytes())
                            advance(hi - lo)
                    del keys
                    offset += n
            finally:
                for h in handles.values():
                    h.close()
    pairs = 0
    with (
        progress("minhash links", quiet, total=len(names), unit="partitions") as advance,
        closing(ordered_map(_BucketPairs(str(work.path), window), iter(names), workers, executor)) as results,
    ):
        for count in results:
            pairs += count
            advance(1)
    record = {"partitions_per_band": parts, "pairs": pairs, "files": [n.replace("bucket-", "pairs-") for n in names]}
    work.finish("buckets", record)
    return record


def stage_clusters(work: WorkDir, max_memory: int, quiet: bool, config: MinHashConfig | None = None) -> dict[str, Any]:
    """Stage 3: union-find over the pair files, read in chunks, on a memory-mapped label file; with
    verification (``config.verify_threshold``) only the pairs whose sketches pass are joined."""
    work.check_plan()
    shards = work.record("signatures")["shards"]
    docs = sum(s["docs"] for s in shards)
    verify = config is not None and config.verify_threshold is not None
    sketches = _SketchFiles(work.path, shards, config.sketch_size) if verify else None  # type: ignore[union-attr]
    counts = {"pairs_verified": 0, "pairs_accepted": 0}
    files = work.record("buckets")["files"]
    work.start("clusters")
    path = work.path / "labels.bin"
    chunk = max(64, max_memory // _PAIR_BYTES)
    labels = np.memmap(path, dtype=np.int64, mode="w+", shape=(max(docs, 1),))
    for lo in range(0, docs, chunk):
        labels[lo : lo + chunk] = np.arange(lo, min(lo + chunk, docs))
    with progress("minhash clusters", quiet, total=len(files), unit="pair files") as advance:
        for name in files:
            with open(work.path / name, "rb") as fh:
                while len(block := np.fromfile(fh, dtype=np.int64, count=2 * chunk)):
                    if sketches is None:
                        union_pairs(labels, block[0::2], block[1::2])
                        continue
                    got = link_verified(labels, block[0::2], block[1::2], sketches, config, max_memory)  # type: ignore[arg-type]
                    for key in counts:
                        counts[key] += got[key]
            advance(1)
        flatten_labels(labels, chunk)
    labels.flush()
    roots = _roots(labels[:docs], chunk)
    del labels
    record = {"docs": docs, "clusters": int(roots.sum()), **(counts if verify else {})}
    del sketches
    work.finish("clusters", record)
    return record


def _roots(labels: np.ndarray, chunk: int) -> np.ndarray:
    """Which documents are the kept first document of a cluster with at least one other member."""
    roots = np.zeros(len(labels), dtype=bool)
    for lo in range(0, len(labels), chunk):
        block = np.asarray(labels[lo : lo + chunk])
        linked = block != np.arange(lo, lo + len(block))
        roots[block[linked]] = True
    return roots


def _window(config: MinHashConfig) -> int:
    return WINDOW if config.verify_threshold is not None else 0


def _malformed(shards: list[dict[str, Any]]) -> Malformed:
    total = Malformed()
    for s in shards:
        total.merge(Malformed(**s["malformed"]))
    return total


def dedup_minhash(
    inputs: list[str],
    out: OutputOptions,
    config: MinHashConfig | None = None,
    text_key: str = "text",
    id_key: str | None = None,
    workers: int = 1,
    executor: str = "local",
    batch_size: int = 512,
    lsh: LSHParams | None = None,
    stage: str = "all",
    work_dir: Path | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    in_memory: bool = False,
) -> Stats | None:
    """Deduplicate ``inputs`` into ``out``; ``stage`` runs one stage of the staged path (None returned
    unless the output was written)."""
    config = config or MinHashConfig()
    if stage not in STAGES:
        raise UserError(f"unknown --stage '{stage}' (choose from: {', '.join(STAGES)})")
    if in_memory and (stage != "all" or work_dir is not None):
        raise UserError("--in-memory runs in one process: it takes no --stage or --work-dir")
    if stage != "all" and work_dir is None:
        raise UserError(f"--stage {stage} needs --work-dir (where the stages leave their files for each other)")
    check_shard_options(out.shard_docs, out.compression)
    files = discover(inputs)
    check_output_dir(out.out_dir, files)
    if lsh is not None:
        _note(out.quiet, lsh.describe())
    extra_config = {"lsh": asdict(lsh)} if lsh is not None else {}
    stats = Stats(
        "dedup-minhash",
        config={**asdict(config), "text_key": text_key, "id_key": id_key, **extra_config,
                "path": "in-memory" if in_memory else "staged", "max_memory": max_memory},
    )
    start = time.perf_counter()
    if in_memory:
        return _dedup_in_memory(
            files, out, config, text_key, id_key, workers, executor, batch_size, stats, start, max_memory
        )
    plan = _plan(files, config, text_key)
    if stage in ("signatures", "buckets", "clusters"):
        work = WorkDir(Path(work_dir).resolve(), plan)  # type: ignore[arg-type]
        with FolderLock(work.path, what="work folder", holder=f"dedup-minhash --stage {stage}"):
            if stage == "signatures":
                stage_signatures(work, files, config, text_key, workers, executor, out.quiet)
            elif stage == "buckets":
                stage_buckets(work, config.num_bands, max_memory, workers, executor, out.quiet, _window(config))
            else:
                stage_clusters(work, max_memory, out.quiet, config)
        _note(out.quiet, f"stage {stage} done in {time.perf_counter() - start:.1f}s -> {work.path}")
        return None
    with StageOutput(out.out_dir, stats.stage) as output:
        own = work_dir is None
        work = WorkDir((output.root / ".minhash-work" if own else Path(work_dir)).resolve(), plan)  # type: ignore[arg-type]
        with FolderLock(work.path, what="work folder", holder="dedup-minhash"):
            if stage == "all":
                stage_signatures(work, files, config, text_key, workers, executor, out.quiet)
                stage_buckets(work, config.num_bands, max_memory, workers, executor, out.quiet, _window(config))
                stage_clusters(work, max_memory, out.quiet, config)
            work.check_plan()
            shards = work.record("signatures")["shards"]
            clusters = work.record("clusters")
            stats.docs_in = sum(s["docs"] for s in shards)
            stats.bytes_in = sum(s["bytes"] for s in shards)
            stats.malformed.merge(_malformed(shards))
            labels = (
                np.memmap(work.path / "labels.bin", dtype=np.int64, mode="r", shape=(max(stats.docs_in, 1),))
                if stats.docs_in
                else np.zeros(0, np.int64)
            )
            stats.extra["clusters"] = clusters["clusters"]
            stats.extra.update({k: clusters[k] for k in ("pairs_verified", "pairs_accepted") if k in clusters})
            chunk = max(64, max_memory // _PAIR_BYTES)
            documents = _write_kept(
                files, labels[: stats.docs_in], _roots(labels[: stats.docs_in], chunk), output.dir, out, text_key,
                id_key, stats, _bad_records(work.path, shards),
            )
            del labels
        if own:
            shutil.rmtree(work.path, ignore_errors=True)
        stats.seconds = time.perf_counter() - start
        stats.extra["docs_per_second"] = round(stats.docs_in / max(stats.seconds, 1e-9), 1)
        output.commit(stats.to_dict(), documents)
    report(stats, out.out_dir, out.quiet)
    return stats


def _dedup_in_memory(
    files: list[Path],
    out: OutputOptions,
    config: MinHashConfig,
    text_key: str,
    id_key: str | None,
    workers: int,
    executor: str,
    batch_size: int,
    stats: Stats,
    start: float,
    max_memory: int = DEFAULT_MAX_MEMORY,
) -> Stats:
    with StageOutput(out.out_dir, stats.stage) as output:
        keys_path = output.dir / ".minhash-keys.bin"  # bands uint64 per document, removed with the staging folder
        sketch_path = output.dir / ".minhash-sketch.bin"  # sketch_size uint32 per document, when verifying
        empties = []
        bad: list[int] = []  # ordinals of the malformed records
        records = 0
        with (
            open(keys_path, "wb") as fh,
            open(sketch_path, "wb") as sf,
            progress("minhash signatures", out.quiet) as advance,
            closing(
                ordered_map(_KeysBatch(config, text_key), batched(iter_raw(files), batch_size), workers, executor)
            ) as results,
        ):
            for keys, empty, sketches, malformed, nbytes, bad_in_batch in results:
                bad.extend(records + j for j in bad_in_batch)
                records += len(empty) + len(bad_in_batch)
                fh.write(keys.tobytes())
                if sketches is not None:
                    sf.write(sketches.tobytes())
                empties.append(empty)
                stats.malformed.merge(malformed)
                stats.docs_in += len(empty)
                stats.bytes_in += nbytes
                advance(len(empty) + malformed.count)
        empty = np.concatenate(empties) if empties else np.zeros(0, bool)
        keys = (
            np.memmap(keys_path, dtype=np.uint64, mode="r").reshape(-1, config.num_bands)
            if stats.docs_in
            else np.zeros((0, config.num_bands), np.uint64)
        )
        verify = config.verify_threshold is not None and stats.docs_in > 0  # no memmap of an empty file
        sketches = (
            np.memmap(sketch_path, dtype=np.uint32, mode="r", shape=(stats.docs_in, config.sketch_size))
            if verify
            else np.zeros((0, config.sketch_size), np.uint32)
        )
        labels, counts = cluster_labels(keys, empty, config, sketches, max_memory)
        stats.extra.update(counts)
        del keys, sketches
        keys_path.unlink()
        sketch_path.unlink()
        roots = _roots(labels, len(labels) + 1)
        stats.extra["clusters"] = int(roots.sum())
        documents = _write_kept(files, labels, roots, output.dir, out, text_key, id_key, stats, iter(bad))
        stats.seconds = time.perf_counter() - start
        stats.extra["docs_per_second"] = round(stats.docs_in / max(stats.seconds, 1e-9), 1)
        output.commit(stats.to_dict(), documents)
    report(stats, out.out_dir, out.quiet)
    return stats


def _doc_id(doc: dict, raw: RawLine, id_key: str | None) -> object:
    if id_key is not None and id_key in doc:
        return doc[id_key]
    return f"{raw.file}:{raw.line}"


@contextmanager
def _kept_output(out_dir: Path, out: OutputOptions) -> Iterator[tuple[ShardWriter, Any]]:
    """The last pass's outputs: the kept documents' shards and ``clusters.jsonl`` (written to a temporary
    name). Both are published only if the block finishes; on any error both are discarded."""
    writer = ShardWriter(out_dir, out.shard_docs, out.compression)
    report_path = out_dir / "clusters.jsonl"
    report_tmp = report_path.with_name(f".clusters.jsonl.tmp{os.getpid()}")
    try:
        with open(report_tmp, "w", encoding="utf-8") as rep:
            yield writer, rep
    except BaseException:
        writer.abort()
        report_tmp.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(report_tmp, report_path)


def _cluster_line(removed: object, kept: object) -> str:
    """One line of ``clusters.jsonl``: a removed document's id and the id of the member its cluster kept."""
    return json.dumps({"removed": removed, "kept": kept}, ensure_ascii=False, default=str) + "\n"


def _write_kept(
    files: list[Path],
    labels: np.ndarray,
    roots: np.ndarray,
    out_dir: Path,
    out: OutputOptions,
    text_key: str,
    id_key: str | None,
    stats: Stats,
    bad: Iterator[int] | None = None,
) -> dict[str, int]:
    """The last pass: write the first document of each cluster and ``clusters.jsonl``; documents per shard.

    ``bad`` (ascending) are the ordinals, among all records of ``files``, of the malformed ones, as the
    signatures pass found them: then a kept line is copied without being parsed again (only removed
    documents and, with ``id_key``, kept first members of clusters are), and ``stats.bytes_out`` is
    ``stats.bytes_in`` less the removed texts. Without it every record is parsed again.
    """
    if bad is None:
        return _write_kept_parsed(files, labels, roots, out_dir, out, text_key, id_key, stats)
    root_ids: dict[int, object] = {}
    n, i, record, next_bad, removed_bytes = len(labels), 0, 0, next(bad, -1), 0
    chunk = 1 << 16
    lab: list[int] = []
    is_root: list[bool] = []
    lo = 0
    with _kept_output(out_dir, out) as (writer, rep), progress("writing kept", out.quiet, total=n) as advance:
        for path in files:
            name = str(path)
            for lineno, line, row in _records(path):
                if record == next_bad:
                    record, next_bad = record + 1, next(bad, -1)
                    continue
                record += 1
                if i >= n:
                    raise UserError("the input changed while it was being deduplicated; rerun")
                if i - lo >= len(lab):
                    lo = i
                    lab, is_root = labels[lo : lo + chunk].tolist(), roots[lo : lo + chunk].tolist()
                    advance(len(lab))
                root = lab[i - lo]
                if root == i:
                    if is_root[i - lo]:
                        root_ids[i] = _record_id(name, lineno, line, row, id_key)
                    if row is None:
                        writer.write_bytes(line.rstrip(b"\r\n") + b"\n")
                    else:
                        writer.write(dumps(row))
                else:
                    doc = row if row is not None else json.loads(line)
                    removed_bytes += len(doc[text_key].encode("utf-8"))
                    stats.removed["minhash_duplicate"] += 1
                    rep.write(_cluster_line(_doc_id(doc, RawLine(name, lineno), id_key), root_ids[root]))
                i += 1
    stats.docs_out = writer.docs
    stats.bytes_out = stats.bytes_in - removed_bytes
    return writer.documents


def _records(path: Path) -> Iterator[tuple[int, bytes, dict[str, Any] | None]]:
    """(line number, line, None) for each record of a JSONL file, as ``iter_raw`` numbers them, or
    (row number, b"", row) for each row of a Parquet file."""
    if path.name.lower().endswith(PARQUET_SUFFIXES):
        for raw in iter_raw([path]):
            yield raw.line, b"", raw.row
        return
    try:
        with open_text(path, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    yield lineno, line, None
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read {path}: {e}") from e


def _record_id(name: str, lineno: int, line: bytes, row: dict[str, Any] | None, id_key: str | None) -> object:
    if id_key is None:
        return f"{name}:{lineno}"
    return _doc_id(row if row is not None else json.loads(line), RawLine(name, lineno), id_key)


def _bad_records(work: Path, shards: list[dict[str, Any]]) -> Iterator[int] | None:
    """The ordinals of the malformed records over all pieces (``bad-NNNNN.bin``), read a block at a time;
    None for a work folder from a version that did not record them."""
    if any("records" not in s for s in shards):
        return None

    def read() -> Iterator[int]:
        offset = 0
        for k, s in enumerate(shards):
            if s["malformed"]["count"]:
                with open(work / f"bad-{k:05d}.bin", "rb") as fh:
                    while len(block := np.fromfile(fh, dtype=np.int64, count=1 << 16)):
                        yield from (block + offset).tolist()
            offset += s["records"]

    return read()


def _write_kept_parsed(
    files: list[Path],
    labels: np.ndarray,
    roots: np.ndarray,
    out_dir: Path,
    out: OutputOptions,
    text_key: str,
    id_key: str | None,
    stats: Stats,
) -> dict[str, int]:
    """``_write_kept`` parsing every record again (a work folder without ``bad-*.bin``)."""
    root_ids: dict[int, object] = {}
    i = 0
    with (
        _kept_output(out_dir, out) as (writer, rep),
        progress("writing kept", out.quiet, total=len(labels)) as advance,
    ):
        for raw in iter_raw(files):
            doc = parse(raw, text_key, Malformed())
            if doc is None:
                continue
            if i >= len(labels):
                raise UserError("the input changed while it was being deduplicated; rerun")
            root = int(labels[i])
            if root == i:
                if roots[i]:
                    root_ids[i] = _doc_id(doc, raw, id_key)
                writer.write(raw.text.rstrip("\r\n") + "\n" if raw.text is not None else dumps(doc))
                stats.bytes_out += len(doc[text_key].encode("utf-8"))
            else:
                stats.removed["minhash_duplicate"] += 1
                rep.write(_cluster_line(_doc_id(doc, raw, id_key), root_ids[root]))
            i += 1
            if i % 1024 == 0:
                advance(1024)
        advance(i % 1024)
    stats.docs_out = writer.docs
    return writer.documents
