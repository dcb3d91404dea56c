"""The `tokenize` stage: documents -> token shards (format in ``shards.py``) for the trainer.

The tokenizer is a Hugging Face ``tokenizers`` JSON file the user gives, or a byte-level BPE trained
here on the input itself (``--vocab-size``; EOS token ``<|endoftext|>``). Nothing is downloaded.
Workers encode batches; the main process appends them in input order, so shards do not depend on the
number of workers. Everything is written in the output's staging folder (``outdir.StageOutput``) and
moved in as a whole, so ``index.json`` and ``tokenizer.json`` always belong to the shards beside them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import IO

import numpy as np

from ..errors import UserError
from ..fileio import atomic_write_text
from .executor import ordered_map
from .io import Malformed, RawLine, check_output_dir, discover, iter_raw, parse
from .outdir import StageOutput
from .runner import OutputOptions, Stats, batched, progress, report
from .shards import FORMAT, VERSION, dtype_for

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "<|EOS|>")
TRAINED_EOS = "<|endoftext|>"


def train_bpe(texts: Iterator[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style pre-tokenization) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[TRAINED_EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise UserError(f"cannot load tokenizer {path}: {e}") from e


def find_eos(tok, eos_token: str | None) -> int:
    vocab = tok.get_vocab(with_added_tokens=True)
    if eos_token is not None:
        if eos_token not in vocab:
            raise UserError(f"EOS token {eos_token!r} is not in the tokenizer's vocabulary")
        return vocab[eos_token]
    for cand in EOS_CANDIDATES:
        if cand in vocab:
            return vocab[cand]
    raise UserError(
        f"the tokenizer has none of {', '.join(EOS_CANDIDATES)}; name its EOS token with --eos-token"
    )


class _EncodeBatch:
    def __init__(self, tokenizer_json: str, eos_id: int, dtype: np.dtype, text_key: str):
        self.tokenizer_json, self.eos_id, self.dtype, self.text_key = tokenizer_json, eos_id, dtype, text_key
        self.tok = None

    def setup(self) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_str(self.tokenizer_json)

    def __call__(self, batch: list[RawLine]):
        malformed = Malformed()
        texts = [d[self.text_key] for raw in batch if (d := parse(raw, self.text_key, malformed)) is not None]
        encs = self.tok.encode_batch(texts, add_special_tokens=False) if texts else []
        lengths = np.array([len(e.ids) + 1 for e in encs], dtype=np.int64)
        ids = np.fromiter(
            (i for e in encs for i in (*e.ids, self.eos_id)), dtype=self.dtype, count=int(lengths.sum())
        )
        return ids, lengths, malformed, sum(len(t.encode("utf-8")) for t in texts)


class _ShardSink:
    """Appends documents' tokens to ``tokens-NNNNN.bin`` shards of about ``shard_tokens`` tokens."""

    def __init__(self, out_dir: Path, shard_tokens: int):
        self.out_dir, self.shard_tokens = out_dir, shard_tokens
        self.shards: list[dict] = []
        self._fh: IO[bytes] | None = None
        self._offsets: list[int] = []
        self._tokens = 0

    def _name(self, ext: str) -> str:
        return f"tokens-{len(self.shards):05d}.{ext}"

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        start = 0
        while start < len(lengths):
            if self._fh is None:
                self._fh = open(self.out_dir / f".{self._name('bin')}.tmp{os.getpid()}", "wb")
            room = self.shard_tokens - self._tokens
            # Documents never straddle shards; a document longer than a shard gets a shard of its own.
            ends = np.cumsum(lengths[start:])
            take = int(np.searchsorted(ends, room, side="right"))
            if take == 0 and self._tokens > 0:
                self._finish()
                continue
            take = max(take, 1)
            chunk_len = int(ends[take - 1])
            tok_start = int(lengths[:start].sum())
            self._fh.write(ids[tok_start : tok_start + chunk_len].tobytes())
            self._offsets.extend((self._tokens + np.concatenate(([0], ends[: take - 1]))).tolist())
            self._tokens += chunk_len
            start += take
            if self._tokens >= self.shard_tokens:
                self._finish()

    def _finish(self) -> None:
        assert self._fh is not None
        self._fh.close()
        bin_name, idx_name = self._name("bin"), self._name("idx")
        os.replace(self.out_dir / f".{bin_name}.tmp{os.getpid()}", self.out_dir / bin_name)
        np.array(self._offsets + [self._tokens], dtype="<u8").tofile(self.out_dir / f".{idx_name}.tmp")
        os.replace(self.out_dir / f".{idx_name}.tmp", self.out_dir / idx_name)
        self.shards.append(
            {"file": bin_name, "index": idx_name, "tokens": self._tokens, "documents": len(self._offsets)}
        )
        self._fh, self._offsets, self._tokens = None, [], 0

    def close(self) -> None:
        if self._fh is not None:
            self._finish()
        keep = {s["file"] for s in self.shards} | {s["index"] for s in self.shards}
        for old in list(self.out_dir.glob("tokens-*.bin")) + list(self.out_dir.glob("tokens-*.idx")):
            if old.name not in keep:
                old.unlink()

    def abort(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()
            except OSError:  # a full disk fails the flush too; the temp file goes all the same
                pass
            finally:
                (self.out_dir / f".{self._name('bin')}.tmp{os.getpid()}").unlink(missing_ok=True)


def tokenize(
    inputs: list[str],
    out: OutputOptions,
    tokenizer_path: str | None = None,
    vocab_size: int | None = None,
    eos_token: str | None = None,
    text_key: str = "text",
    shard_tokens: int = 100_000_000,
    workers: int = 1,
    executor: str = "local",
    batch_size: int = 256,
) -> Stats:
    if (tokenizer_path is None) == (vocab_size is None):
        raise UserError(
            "give exactly one of --tokenizer FILE (use it) or --vocab-size N (train a BPE on the input)"
        )
    if shard_tokens < 1:
        raise UserError("--shard-tokens must be at least 1")
    files = discover(inputs)
    check_output_dir(out.out_dir, files)
    stats = Stats("tokenize")
    start = time.perf_counter()
    if tokenizer_path is not None:
        tok, source = load_tokenizer(tokenizer_path), str(tokenizer_path)
    else:
        if vocab_size < 257:
            raise UserError("--vocab-size must be at least 257 (256 bytes + EOS)")
        texts = (
            d[text_key] for raw in iter_raw(files) if (d := parse(raw, text_key, Malformed())) is not None
        )
        tok, source = train_bpe(texts, vocab_size), f"trained on the input (vocab {vocab_size})"
    eos_id = find_eos(tok, eos_token)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = dtype_for(vocab)
    tokenizer_json = tok.to_str()
    with StageOutput(out.out_dir, stats.stage) as output:
        atomic_write_text(output.dir / "tokenizer.json", tokenizer_json)
        sink = _ShardSink(output.dir, shard_tokens)
        try:
            with (
                progress("tokenize", out.quiet) as advance,
                closing(
                    ordered_map(
                        _EncodeBatch(tokenizer_json, eos_id, dtype, text_key),
                        batched(iter_raw(files), batch_size),
                        workers,
                        executor,
                    )
                ) as results,
            ):
                for ids, lengths, malformed, nbytes in results:
                    sink.add(ids, lengths)
                    stats.docs_in += len(lengths)
                    stats.bytes_in += nbytes
                    stats.malformed.merge(malformed)
                    advance(len(lengths) + malformed.count)
        except BaseException:
            sink.abort()
            raise
        sink.close()
        index = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": dtype.name,
            "vocab_size": vocab,
            "eos_id": eos_id,
            "tokenizer": {
                "file": "tokenizer.json",
                "source": source,
                "sha256": hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest(),
            },
            "text_key": text_key,
            "shards": sink.shards,
        }
        atomic_write_text(output.dir / "index.json", json.dumps(index, indent=2, ensure_ascii=False) + "\n")
        stats.docs_out = stats.docs_in
        stats.seconds = time.perf_counter() - start
        total = sum(s["tokens"] for s in sink.shards)
        stats.extra.update(
            tokens=total,
            shards=len(sink.shards),
            vocab_size=vocab,
            dtype=dtype.name,
            tokens_per_second=round(total / max(stats.seconds, 1e-9), 1),
        )
        stats.config = {
            "tokenizer": source, "eos_id": eos_id, "shard_tokens": shard_tokens, "text_key": text_key
        }
        output.commit(stats.to_dict())
    report(stats, out.out_dir, out.quiet)
    return stats
