"""Training tokens and their tokenizer: the built-in corpus, user files, token shards, a cached BPE.

The built-in corpus is the documentation that ships with Python itself (``pydoc_data.topics``), so
``openseek-hal train`` works on a fresh machine with no download. Text is tokenized by a byte-level
BPE trained with the `tokenizers` library on first use and cached under the user's cache directory,
keyed by a hash of the text and the vocabulary size. A folder written by ``openseek-hal data
tokenize`` is used as it is: its memory-mapped shards and the tokenizer stored beside them, after checking
that the folder is whole and the tokenizer is the one recorded in ``index.json`` (``data.shards``).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from rich.console import Console
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..data.io import Malformed, discover, is_input, iter_raw, open_text, parse
from ..errors import UserError
from ..fileio import atomic_write_text

EOS = "<|endoftext|>"


def cache_dir() -> Path:
    """``$OPENSEEK_HAL_CACHE``, else ``$XDG_CACHE_HOME/openseek-hal``, else ``~/.cache/openseek-hal``."""
    if os.environ.get("OPENSEEK_HAL_CACHE"):
        return Path(os.environ["OPENSEEK_HAL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "openseek-hal"


@dataclass
class Documents:
    """Documents read from a source, and the records that could not be read (count, first locations)."""

    name: str
    texts: list[str]
    malformed: Malformed = field(default_factory=Malformed)

    @property
    def skipped(self) -> list[tuple[str, int, str]]:
        """The first unreadable records as (file, line number, why)."""
        return [(m["file"], m["line"], m["error"]) for m in self.malformed.first]


def builtin_documents() -> Documents:
    from pydoc_data.topics import topics

    return Documents("pydoc_data.topics", [topics[key] for key in sorted(topics)])


TEXT_SUFFIXES = tuple(s + c for s in (".txt", ".md") for c in ("", ".gz", ".zst"))


def _read_text_file(path: Path, docs: Documents) -> None:
    """A whole text file as one document; one that is not valid UTF-8 is counted as malformed, with the line."""
    try:
        with open_text(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    try:
        docs.texts.append(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        docs.malformed.add(
            str(path), data.count(b"\n", 0, e.start) + 1, f"invalid UTF-8 at byte {e.start - line_start} of the line"
        )


def read_documents(source: str | None, text_key: str = "text") -> Documents:
    """Documents from ``source``: None (built-in), a text file (.txt, .md), a JSONL (.jsonl, .json, plain,
    .gz or .zst) or Parquet file, or a folder of them.

    Files are found and read by the data tools' own reader (``openseek_hal.data.io``): a stage's output
    folder must be whole and only its data files are read (not ``stats.json`` or ``clusters.jsonl``), and a
    malformed record (invalid UTF-8, not JSON, no string text field) is counted and skipped with its line.
    """
    if source is None:
        return builtin_documents()
    path = Path(source)
    if not path.exists():
        raise UserError(f"data not found: {path}")
    if path.is_file() and not is_input(path, TEXT_SUFFIXES):
        raise UserError(
            f"unsupported data file {path} (expected .txt, .md, .jsonl or .json, plain, .gz or .zst, or .parquet)"
        )
    docs = Documents(str(path), [])
    for f in discover([path], also=TEXT_SUFFIXES):
        if f.name.lower().endswith(TEXT_SUFFIXES):
            _read_text_file(f, docs)
            continue
        for raw in iter_raw([f]):
            if (record := parse(raw, text_key, docs.malformed)) is not None:
                docs.texts.append(record[text_key])
    if not any(t.strip() for t in docs.texts):
        raise UserError(f"no text found in {path}")
    return docs


def _corpus_hash(texts: list[str], vocab_size: int) -> str:
    h = hashlib.sha256(f"bpe-v1:{vocab_size}".encode())
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    return h.hexdigest()[:16]


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_or_train_tokenizer(docs: Documents, vocab_size: int) -> tuple[Tokenizer, Path]:
    """The cached BPE for these documents, trained (and cached atomically) on first use."""
    path = cache_dir() / "tokenizers" / f"bpe-{_corpus_hash(docs.texts, vocab_size)}.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path)), path
        except Exception:  # a corrupt cache entry is rebuilt, not fatal
            path.unlink(missing_ok=True)
    tok = train_tokenizer(docs.texts, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, tok.to_str())
    return tok, path


def encode_documents(tok: Tokenizer, texts: list[str]) -> np.ndarray:
    """All documents as one token stream, each followed by the end-of-text token."""
    eos = tok.token_to_id(EOS)
    out: list[int] = []
    for enc in tok.encode_batch(texts):
        out.extend(enc.ids)
        out.append(eos)
    return np.asarray(out, dtype=np.int32)


def iter_windows(n_tokens: int, seq_len: int) -> Iterator[int]:
    """Start offsets of consecutive non-overlapping (input, label) windows."""
    yield from range(0, n_tokens - seq_len - 1, seq_len)


class TokenSequence(Protocol):
    """A 1-D run of token ids: a numpy array, a memory map, or several shards read as one."""

    def __len__(self) -> int: ...

    def __getitem__(self, key: slice) -> np.ndarray: ...


@dataclass
class TrainingTokens:
    tokens: TokenSequence
    tokenizer: Tokenizer
    tokenizer_path: Path
    eos_id: int  # the token that ends every document in ``tokens``


def load_training_tokens(source: str | None, vocab_size: int, console: Console) -> TrainingTokens:
    """The token stream of ``source`` (see `read_documents`, or a token-shard folder) and its tokenizer."""
    t0 = time.perf_counter()
    if source is not None and (Path(source) / "index.json").is_file():
        from ..data.shards import TokenShards

        shards = TokenShards(source)
        path = shards.tokenizer_path
        if not path.is_file():
            raise UserError(f"token shards {source} have no tokenizer file ({path.name})")
        tokens = shards.tokens()
        console.print(f"data: token shards {source}: {shards.num_documents:,} documents, {len(tokens):,} tokens "
                      f"(vocab {shards.vocab_size})")
        return TrainingTokens(tokens, Tokenizer.from_file(str(path)), path, shards.eos_id)
    docs = read_documents(source)
    for path, lineno, why in docs.skipped[:5]:
        console.print(f"[yellow]skipped[/] {path}:{lineno}: {why}")
    if docs.malformed.count:
        console.print(f"[yellow]{docs.malformed.count} malformed line(s) skipped[/] in {docs.name}")
    tok, tok_path = load_or_train_tokenizer(docs, vocab_size)
    tokens = encode_documents(tok, docs.texts)
    console.print(f"data: {docs.name}: {len(docs.texts)} documents, {len(tokens):,} tokens "
                  f"(vocab {tok.get_vocab_size()}, tokenizer {tok_path}, {time.perf_counter() - t0:.1f}s)")
    return TrainingTokens(tokens, tok, tok_path, tok.token_to_id(EOS))
