"""Sharded safetensors directories: a lazy reader and an atomic, size-bounded writer.

The reader maps every tensor name to its shard (from ``model.safetensors.index.json`` when there
is one, else from the headers of every ``*.safetensors`` file) and reads tensors one at a time
through memory-mapped files, so no caller ever holds a whole checkpoint. Every header is checked
when the reader opens, so a corrupt or truncated shard is one clear error before any work starts.

The writer buffers tensors up to a shard size, writes each shard, and builds the directory under
a temporary sibling that is renamed into place only when complete: a failed or interrupted write
leaves no half-checkpoint behind and never touches existing data.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import UserError

INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 4 * 2**30
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class CheckpointError(UserError):
    """A checkpoint directory that cannot be read or written as asked."""


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


class ShardedReader:
    """Tensors of a safetensors checkpoint directory, by name, read lazily."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {self.directory}")
        index = self.directory / INDEX_NAME
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: no 'weight_map'")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.directory}: no *.safetensors files and no {INDEX_NAME}")
            weight_map = None
        self._handles = {name: self._open(name) for name in files}
        if weight_map is None:
            weight_map = {key: name for name, handle in self._handles.items() for key in handle.keys()}
        else:
            for name, handle in self._handles.items():
                listed = {k for k, f in weight_map.items() if f == name}
                missing = listed - set(handle.keys())
                if missing:
                    raise CheckpointError(f"{self.directory / name}: lacks {len(missing)} tensor(s) its index "
                                          f"lists, e.g. {sorted(missing)[0]}")
        self._where: dict[str, str] = weight_map

    def _open(self, name: str):
        path = self.directory / name
        if not path.exists():
            raise CheckpointError(f"{path}: listed in the index but missing")
        try:
            return safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error types for bad headers and short files
            raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def dtype(self, key: str) -> torch.dtype | None:
        """The stored dtype of ``key`` read from its header (None for a dtype torch lacks)."""
        name = self._handles[self._where[key]].get_slice(key).get_dtype()
        return _SAFETENSORS_DTYPES.get(name)

    def get(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise CheckpointError(f"{self.directory}: no tensor named '{key}'")
        try:
            return self._handles[self._where[key]].get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{self.directory / self._where[key]}: cannot read '{key}' ({e})") from None


def _check_destination(directory: Path, overwrite: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise CheckpointError(f"{directory} exists and is not empty (refusing to overwrite it)")


class ShardedWriter:
    """Write ``model-0000i-of-0000N.safetensors`` shards, their index and JSON side files, atomically.

    Use as a context manager; the directory appears only when the ``with`` block ends without error.
    """

    def __init__(self, directory: str | Path, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 overwrite: bool = False, metadata: dict[str, str] | None = None):
        self.directory = Path(directory)
        _check_destination(self.directory, overwrite)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._tmp = self.directory.with_name(f".{self.directory.name}.partial-{os.getpid()}")
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._total = 0
        self._json: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> ShardedWriter:
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir(parents=True)
        return self

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self._pending or any(key in shard for shard in self._shards):
            raise ValueError(f"tensor '{key}' written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[key] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += nbytes
        self._total += nbytes

    def add_json(self, name: str, value: dict[str, Any]) -> None:
        self._json[name] = value

    def _flush(self) -> None:
        if not self._pending:
            return
        save_file(self._pending, str(self._tmp / f"shard-{len(self._shards)}.tmp"), metadata=self.metadata)
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            return
        try:
            self._finish()
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise

    def _finish(self) -> None:
        self._flush()
        count = len(self._shards)
        weight_map = {}
        for i, keys in enumerate(self._shards):
            name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            (self._tmp / f"shard-{i}.tmp").rename(self._tmp / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(weight_map.items()))}
        for name, value in {INDEX_NAME: index, **self._json}.items():
            (self._tmp / name).write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
        old = None
        if self.directory.exists():  # empty, or overwrite was asked for: keep it until the new one is in place
            old = self.directory.with_name(f".{self.directory.name}.old-{os.getpid()}")
            self.directory.rename(old)
        self._tmp.rename(self.directory)
        if old is not None:
            shutil.rmtree(old)
