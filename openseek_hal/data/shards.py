"""Token shards: the on-disk format `openseek-hal data tokenize` writes and the trainer reads.

A folder holding

- ``tokens-NNNNN.bin``: token ids, little-endian ``uint16`` when every id fits (vocab size <= 65536)
  else ``uint32``; each document's tokens are followed by the EOS/document-separator id;
- ``tokens-NNNNN.idx``: little-endian ``uint64`` start offset (in tokens) of every document in that
  shard, plus the shard length as a last entry (Megatron's document index, as a flat array);
- ``index.json``: ``format`` ("openseek-hal-tokens"), ``version`` (1), ``dtype``, ``vocab_size``,
  ``eos_id``, ``tokenizer`` (``file`` copied beside the shards, ``sha256``, ``source``), and ``shards``:
  a list of ``{"file", "index", "tokens", "documents"}``;
- ``tokenizer.json``: the tokenizer that produced the ids.

``TokenShards(path)`` refuses a folder that is not whole (see ``outdir.py``) or whose ``tokenizer.json``
does not have the recorded sha256; ``.tokens()`` maps the shards into memory without reading them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .outdir import is_stage_output, verify

FORMAT = "openseek-hal-tokens"
VERSION = 1


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class ConcatenatedTokens:
    """Several memory-mapped shards read as one 1-D sequence: ``len``, integer and slice indexing."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.offsets = np.concatenate(([0], np.cumsum([len(p) for p in parts]))).astype(np.int64)
        self.dtype = parts[0].dtype
        self.shape = (int(self.offsets[-1]),)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: int | slice) -> Any:
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                return self[start:stop][::step]
            if stop <= start:
                return np.zeros(0, dtype=self.dtype)
            first = int(np.searchsorted(self.offsets, start, side="right")) - 1
            last = int(np.searchsorted(self.offsets, stop - 1, side="right")) - 1
            pieces = [
                self.parts[i][max(start - self.offsets[i], 0) : stop - self.offsets[i]]
                for i in range(first, last + 1)
            ]
            return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        index = int(key) + (n if key < 0 else 0)
        if not 0 <= index < n:
            raise IndexError(f"token index {key} out of range for {n} tokens")
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.parts[part][index - self.offsets[part]]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.concatenate(self.parts)
        return out if dtype is None else out.astype(dtype)


class TokenShards:
    """Reader of a `tokenize` output folder."""

    def __init__(self, path: str | Path):
        """Open and check a folder: whole (``outdir.verify``), its shards the sizes ``index.json`` records,
        and ``tokenizer.json`` the one the ids were made with (its sha256); ``UserError`` otherwise."""
        self.path = Path(path)
        index_path = self.path / "index.json"
        if not index_path.is_file() and not is_stage_output(self.path):
            raise UserError(
                f"{self.path} is not a token-shard folder (no index.json; make one with "
                "`openseek-hal data tokenize`)"
            )
        verify(self.path)  # not marked incomplete, every file as stats.json records it
        try:
            self.index: dict[str, Any] = json.loads(index_path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise UserError(f"{self.path} is a stage output but not a token-shard folder (no index.json)") from e
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read {index_path}: {e}") from e
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise UserError(f"{index_path} is not {FORMAT} version {VERSION}")
        self.dtype = np.dtype(self.index["dtype"])
        self.vocab_size: int = int(self.index["vocab_size"])
        self.eos_id: int = int(self.index["eos_id"])
        self.shards: list[dict[str, Any]] = self.index["shards"]
        for s in self.shards:
            f, idx = self.path / s["file"], self.path / s["index"]
            if not f.is_file() or f.stat().st_size != s["tokens"] * self.dtype.itemsize:
                raise UserError(
                    f"token shard {f} is missing or has the wrong size (expected {s['tokens']} tokens)"
                )
            if not idx.is_file() or idx.stat().st_size != (s["documents"] + 1) * 8:
                raise UserError(
                    f"token index {idx} is missing or has the wrong size (expected {s['documents']} documents)"
                )
        tok = self.tokenizer_path
        want = self.index["tokenizer"].get("sha256")
        try:
            have = hashlib.sha256(tok.read_bytes()).hexdigest()
        except OSError as e:
            raise UserError(f"token shards {self.path} have no readable tokenizer file ({tok.name}): {e}") from None
        if have != want:
            raise UserError(
                f"{tok} is not the tokenizer these shards were made with (sha256 {have[:12]}..., index.json "
                f"records {str(want)[:12]}...); rerun `openseek-hal data tokenize`"
            )
    @property
    def num_tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)

    @property
    def num_documents(self) -> int:
        return sum(s["documents"] for s in self.shards)

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.index["tokenizer"]["file"]

    def shard(self, i: int) -> np.ndarray:
        s = self.shards[i]
        if s["tokens"] == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.path / s["file"], dtype=self.dtype, mode="r", shape=(s["tokens"],))

    def document_offsets(self, i: int) -> np.ndarray:
        """Start offset of every document in shard ``i`` (plus the shard length at the end)."""
        return np.fromfile(self.path / self.shards[i]["index"], dtype="<u8")

    def tokens(self) -> np.ndarray | ConcatenatedTokens:
        """All tokens in shard order: a ``np.memmap`` (one shard) or a ``ConcatenatedTokens`` view."""
        parts = [self.shard(i) for i in range(len(self.shards)) if self.shards[i]["tokens"]]
        if not parts:
            return np.zeros(0, dtype=self.dtype)
        return parts[0] if len(parts) == 1 else ConcatenatedTokens(parts)
