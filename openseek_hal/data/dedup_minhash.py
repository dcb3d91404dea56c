"""The `dedup-minhash` stage: MinHash LSH fuzzy deduplication over the whole input.

Three passes with memory bounded by the document count, not the text size:
1. signatures -> band keys (workers), appended to a temp file of 14 uint64 per document (in the output's
   staging folder, so a crash leaves nothing the next run does not remove);
2. per band, documents with equal keys are linked to the first of them; the connected components of all
   links (``minhash.components``) are the duplicate clusters;
3. the input is streamed again and the first document of each cluster (in input order) is kept, its
   line passed through byte for byte; ``clusters.jsonl`` says which document was removed for which.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import closing
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..errors import UserError
from .executor import ordered_map
from .io import (
    Malformed,
    RawLine,
    ShardWriter,
    check_output_dir,
    check_shard_options,
    discover,
    dumps,
    iter_raw,
    parse,
)
from .minhash import MinHashConfig, MinHasher, components
from .outdir import StageOutput
from .runner import OutputOptions, Stats, batched, progress, report


class _KeysBatch:
    def __init__(self, config: MinHashConfig, text_key: str):
        self.config, self.text_key = config, text_key
        self.hasher: MinHasher | None = None

    def setup(self) -> None:
        self.hasher = MinHasher(self.config)

    def __call__(self, batch: list[RawLine]):
        assert self.hasher is not None
        malformed = Malformed()
        texts = [d[self.text_key] for raw in batch if (d := parse(raw, self.text_key, malformed)) is not None]
        keys, empty = (
            self.hasher.keys_for(texts)
            if texts
            else (np.zeros((0, self.config.num_bands), np.uint64), np.zeros(0, bool))
        )
        return keys, empty, malformed, sum(len(t.encode("utf-8")) for t in texts)


def cluster_labels(keys: np.ndarray, empty: np.ndarray) -> np.ndarray:
    """Each document's cluster label: the index of the first document of its cluster."""
    n = keys.shape[0]
    us, vs = [], []
    candidates = np.flatnonzero(~empty)
    for band in range(keys.shape[1]):
        col = np.ascontiguousarray(keys[candidates, band])
        order = np.argsort(col, kind="stable")
        sk = col[order]
        is_start = np.ones(len(sk), dtype=bool)  # no candidate at all: no links (and no IndexError)
        is_start[1:] = sk[1:] != sk[:-1]
        run_first = order[np.flatnonzero(is_start)][np.cumsum(is_start) - 1]
        dup = ~is_start
        us.append(candidates[run_first[dup]])
        vs.append(candidates[order[dup]])
    u = np.concatenate(us) if us else np.zeros(0, np.int64)
    v = np.concatenate(vs) if vs else np.zeros(0, np.int64)
    return components(n, u, v)


def _doc_id(doc: dict, raw: RawLine, id_key: str | None) -> object:
    if id_key is not None and id_key in doc:
        return doc[id_key]
    return f"{raw.file}:{raw.line}"


def dedup_minhash(
    inputs: list[str],
    out: OutputOptions,
    config: MinHashConfig | None = None,
    text_key: str = "text",
    id_key: str | None = None,
    workers: int = 1,
    executor: str = "local",
    batch_size: int = 512,
) -> Stats:
    config = config or MinHashConfig()
    check_shard_options(out.shard_docs, out.compression)
    files = discover(inputs)
    check_output_dir(out.out_dir, files)
    stats = Stats("dedup-minhash", config={**asdict(config), "text_key": text_key, "id_key": id_key})
    start = time.perf_counter()
    with StageOutput(out.out_dir, stats.stage) as output:
        keys_path = output.dir / ".minhash-keys.bin"  # 14 uint64 per document, removed with the staging folder
        empties = []
        with (
            open(keys_path, "wb") as fh,
            progress("minhash signatures", out.quiet) as advance,
            closing(
                ordered_map(_KeysBatch(config, text_key), batched(iter_raw(files), batch_size), workers, executor)
            ) as results,
        ):
            for keys, empty, malformed, nbytes in results:
                fh.write(keys.tobytes())
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
        labels = cluster_labels(keys, empty)
        del keys
        keys_path.unlink()
        stats.extra["clusters"] = int(len(np.unique(labels[labels != np.arange(len(labels))])))
        documents = _write_kept(files, labels, output.dir, out, text_key, id_key, stats)
        stats.seconds = time.perf_counter() - start
        stats.extra["docs_per_second"] = round(stats.docs_in / max(stats.seconds, 1e-9), 1)
        output.commit(stats.to_dict(), documents)
    report(stats, out.out_dir, out.quiet)
    return stats


def _write_kept(
    files: list[Path],
    labels: np.ndarray,
    out_dir: Path,
    out: OutputOptions,
    text_key: str,
    id_key: str | None,
    stats: Stats,
) -> dict[str, int]:
    """The third pass: write the first document of each cluster and ``clusters.jsonl``; documents per shard."""
    roots = set(np.unique(labels[labels != np.arange(len(labels))]).tolist())
    root_ids: dict[int, object] = {}
    writer = ShardWriter(out_dir, out.shard_docs, out.compression)
    report_path = out_dir / "clusters.jsonl"
    report_tmp = report_path.with_name(f".clusters.jsonl.tmp{os.getpid()}")
    i = 0
    try:
        with (
            open(report_tmp, "w", encoding="utf-8") as rep,
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
                    if i in roots:
                        root_ids[i] = _doc_id(doc, raw, id_key)
                    writer.write(raw.text.rstrip("\r\n") + "\n" if raw.text is not None else dumps(doc))
                    stats.bytes_out += len(doc[text_key].encode("utf-8"))
                else:
                    stats.removed["minhash_duplicate"] += 1
                    rep.write(
                        json.dumps(
                            {"removed": _doc_id(doc, raw, id_key), "kept": root_ids[root]},
                            ensure_ascii=False,
                            default=str,
                        )
                        + "\n"
                    )
                i += 1
                if i % 1024 == 0:
                    advance(1024)
            advance(i % 1024)
    except BaseException:
        writer.abort()
        report_tmp.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(report_tmp, report_path)
    stats.docs_out = writer.docs
    return writer.documents
