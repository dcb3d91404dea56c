"""Sharded training checkpoints: every rank writes its own safetensors file; atomic; reshardable.

Layout of one checkpoint, ``<out>/checkpoints/step_000200/``::

    manifest.json            format, step, world size, expert parallel size, the rank files, each
                             parameter's global shape and whether it is a routed-expert tensor
    state.json               trainer state: config, loss history, tokenizer
    rank_00000.safetensors   what rank 0 owns (one file per rank)

A rank file holds ``model/<name>``: whole weights, written once per distinct tensor (the dense
weights by rank 0, each expert slice by the first replica holding it, under the slice's global
expert offset), ``buffer/<name>`` (rank 0), and ``optim/<name>/<master|exp_avg|exp_avg_sq>@<start>``:
the 1-D pieces of the fp32 master weights and AdamW moments this rank's ZeRO shard covers,
addressed by their offset in the *global* flattened tensor (for an expert tensor, the tensor of
all experts). Loading therefore works at any world size and any expert-parallel size: every
rank reads the pieces that overlap its own shard, whoever wrote them.

Every rank writes into ``.step_000200.partial``; after a barrier rank 0 adds the manifest and
renames the folder into place, then replaces the ``latest`` pointer atomically: a crash at any
point leaves the previous checkpoint intact and the partial folder is removed by the next run.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import RunError, UserError
from ..fileio import atomic_write_text, fsync_path
from .zero import DistributedOptimizer

FORMAT = "openseek-hal/sharded-v1"
STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class ExpertSlice:
    """Where a rank's expert tensor sits in the tensor of all experts (dim 0)."""

    offset: int
    global_experts: int


ExpertOf = Callable[[nn.Parameter], ExpertSlice | None]


def _no_experts(p: nn.Parameter) -> ExpertSlice | None:
    return None


def global_shape(p: nn.Parameter, expert: ExpertSlice | None) -> list[int]:
    shape = list(p.shape)
    if expert is not None:
        shape[0] = expert.global_experts
    return shape


def _global_start(p: nn.Parameter, expert: ExpertSlice | None) -> int:
    return expert.offset * (p.numel() // p.shape[0]) if expert is not None else 0


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.safetensors"


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / "checkpoints" / f"step_{step:06d}"


def remove_partials(root: str | Path) -> None:
    """Remove what an interrupted save left (``.step_*`` folders); call on rank 0 before training."""
    ckpt_root = Path(root) / "checkpoints"
    if ckpt_root.is_dir():
        for p in ckpt_root.glob(".step_*"):
            shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(root: str | Path) -> list[int]:
    ckpt_root = Path(root) / "checkpoints"
    if not ckpt_root.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in ckpt_root.glob("step_*") if p.name[5:].isdigit())


def save_checkpoint(root: str | Path, step: int, model: nn.Module, optimizer: DistributedOptimizer,
                    state: dict[str, Any], *, rank: int, world_size: int, barrier: Callable[[], None],
                    expert_of: ExpertOf = _no_experts, expert_parallel: int = 1,
                    writes_dense: bool = True, writes_experts: bool = True) -> Path:
    """Write checkpoint ``step`` of a (possibly sharded) run; call on every rank.

    ``writes_dense``/``writes_experts`` say whether this rank is the one that writes the whole dense
    weights (rank 0) and its expert slices (the first replica of its expert shard).
    """
    ckpt_root = Path(root) / "checkpoints"
    final = step_dir(root, step)
    tmp = ckpt_root / f".step_{step:06d}.partial"
    if rank == 0:
        if final.exists():
            raise RunError(f"checkpoint {final} already exists; refusing to overwrite it")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    try:
        tensors: dict[str, torch.Tensor] = {}
        index: dict[str, Any] = {"model": {}, "segments": []}
        for name, p in model.named_parameters():
            expert = expert_of(p)
            if (writes_experts if expert is not None else writes_dense):
                tensors[f"model/{name}"] = p.detach().cpu().contiguous()
                index["model"][name] = expert.offset if expert is not None else 0
        if rank == 0:  # persistent buffers (the routing bias): the same on every rank
            param_names = {n for n, _ in model.named_parameters()}
            for name, value in model.state_dict().items():
                if name not in param_names:
                    tensors[f"buffer/{name}"] = value.detach().cpu().contiguous()
        for seg, values in optimizer.state_segments():
            start = _global_start(seg.param, expert_of(seg.param)) + seg.param_offset
            for key in STATE_KEYS:
                tensors[f"optim/{seg.name}/{key}@{start}"] = values[key].detach().cpu().clone()
            index["segments"].append([seg.name, start, seg.numel])
        save_file(tensors, str(tmp / rank_file(rank)), metadata={"index": json.dumps(index)})
        fsync_path(tmp / rank_file(rank))
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    if rank == 0:
        try:
            params = {name: {"shape": global_shape(p, expert_of(p)), "dtype": str(p.dtype).removeprefix("torch."),
                             "expert": expert_of(p) is not None} for name, p in model.named_parameters()}
            manifest = {"format": FORMAT, "step": step, "world_size": world_size, "expert_parallel": expert_parallel,
                        "optimizer_step": optimizer.step_count, "files": [rank_file(r) for r in range(world_size)],
                        "params": params}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2, allow_nan=False))
            for name in ("manifest.json", "state.json", "."):
                fsync_path(tmp / name)
            os.replace(tmp, final)
            fsync_path(ckpt_root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_text(ckpt_root / "latest", final.name + "\n")
    barrier()
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from itself, a run folder, or a run's ``checkpoints`` folder (via ``latest``)."""
    p = Path(path)
    for candidate in (p, p / "checkpoints"):
        if (candidate / "latest").is_file():
            return candidate / (candidate / "latest").read_text().strip()
    if (p / "manifest.json").is_file():
        return p
    raise UserError(f"no checkpoint found at {p}")


class CheckpointReader:
    """The files of one sharded checkpoint, read piece by piece."""

    def __init__(self, path: str | Path):
        self.path = resolve_checkpoint(path)
        try:
            self.manifest = json.loads((self.path / "manifest.json").read_text())
            self.state = json.loads((self.path / "state.json").read_text())
            if self.manifest.get("format") != FORMAT:
                raise UserError(f"checkpoint {self.path}: unknown format {self.manifest.get('format')!r}")
            self._files = {f: safe_open(str(self.path / f), "pt") for f in self.manifest["files"]}
            self._index = {f: json.loads(h.metadata()["index"]) for f, h in self._files.items()}
        except (OSError, KeyError, json.JSONDecodeError, SafetensorError) as e:
            raise UserError(f"checkpoint {self.path} is unreadable: {e}") from None
        self.params: dict[str, dict[str, Any]] = self.manifest["params"]
        self._model: dict[str, list[tuple[str, int]]] = {}
        self._segments: dict[str, list[tuple[str, int, int]]] = {}
        for f, index in self._index.items():
            for name, offset in index["model"].items():
                self._model.setdefault(name, []).append((f, offset))
            for name, start, numel in index["segments"]:
                self._segments.setdefault(name, []).append((f, start, numel))

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    def weight(self, name: str, expert_offset: int = 0, experts: int | None = None) -> torch.Tensor:
        """Parameter ``name`` (for an expert tensor: ``experts`` experts from global ``expert_offset``)."""
        if name not in self.params:
            raise UserError(f"checkpoint {self.path} has no parameter {name}")
        meta = self.params[name]
        shape = meta["shape"]
        if not meta["expert"]:  # written whole (by a run without expert parallelism)
            f, _ = self._model[name][0]
            if experts is None:
                return self._files[f].get_tensor(f"model/{name}")
            return self._files[f].get_slice(f"model/{name}")[expert_offset:expert_offset + experts]
        n = shape[0] if experts is None else experts
        out = None
        for f, offset in self._model[name]:
            sl = self._files[f].get_slice(f"model/{name}")
            count = sl.get_shape()[0]
            lo, hi = max(offset, expert_offset), min(offset + count, expert_offset + n)
            if lo < hi:
                piece = sl[lo - offset:hi - offset]
                if out is None:
                    out = torch.empty([n, *shape[1:]], dtype=piece.dtype)
                out[lo - expert_offset:hi - expert_offset] = piece
        if out is None:
            raise UserError(f"checkpoint {self.path}: no file holds experts {expert_offset}.. of {name}")
        return out

    def buffers(self) -> dict[str, torch.Tensor]:
        h = self._files[self.manifest["files"][0]]
        return {k.removeprefix("buffer/"): h.get_tensor(k) for k in h.keys() if k.startswith("buffer/")}

    def state_range(self, name: str, key: str, start: int, numel: int) -> torch.Tensor:
        """Elements ``[start, start + numel)`` of the flattened global ``key`` state of ``name``."""
        out = None
        covered = 0
        for f, seg_start, seg_numel in self._segments.get(name, []):
            lo, hi = max(start, seg_start), min(start + numel, seg_start + seg_numel)
            if lo < hi:
                piece = self._files[f].get_slice(f"optim/{name}/{key}@{seg_start}")[lo - seg_start:hi - seg_start]
                if out is None:
                    out = torch.empty(numel, dtype=piece.dtype)
                out[lo - start:hi - start] = piece
                covered += hi - lo
        if out is None or covered != numel:
            raise UserError(f"checkpoint {self.path} lacks optimizer state for {name}[{start}:{start + numel}]")
        return out

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight whole (expert tensors of all experts) and the saved buffers: what a model of one rank loads."""
        return {**{name: self.weight(name) for name in self.params}, **self.buffers()}


@torch.no_grad()
def load_weights(reader: CheckpointReader, model: nn.Module, expert_of: ExpertOf = _no_experts) -> None:
    """Fill ``model``'s parameters and persistent buffers from the checkpoint (any world size)."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(reader.params))
    extra = sorted(set(reader.params) - set(params))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise UserError(f"checkpoint {reader.path} does not match the model: {what}")
    for name, p in params.items():
        expert = expert_of(p)
        shape = global_shape(p, expert)
        if shape != reader.params[name]["shape"]:
            raise UserError(f"checkpoint {reader.path} does not match the model: {name} is "
                            f"{reader.params[name]['shape']} there, {shape} here")
        if expert is not None:
            value = reader.weight(name, expert.offset, p.shape[0])
        else:
            value = reader.weight(name)
        p.copy_(value.to(p.dtype))
    buffers = dict(model.named_buffers())
    for name, value in reader.buffers().items():
        if name in buffers:
            buffers[name].copy_(value.to(buffers[name].dtype))


@torch.no_grad()
def load_optimizer(reader: CheckpointReader, optimizer: DistributedOptimizer,
                   expert_of: ExpertOf = _no_experts) -> None:
    """Fill this rank's master weights and moments from the checkpoint's pieces, then gather the weights."""
    for seg in optimizer.segments():
        start = _global_start(seg.param, expert_of(seg.param)) + seg.param_offset
        for key in STATE_KEYS:
            optimizer.load_segment(seg, key, reader.state_range(seg.name, key, start, seg.numel))
    optimizer.step_count = int(reader.manifest["optimizer_step"])
    optimizer.gather_weights()


def load_checkpoint(path: str | Path, model: nn.Module) -> dict[str, Any]:
    """Load a checkpoint's weights into a single-process model (all experts); returns its ``state.json``."""
    reader = CheckpointReader(path)
    load_weights(reader, model)
    return reader.state


class RunSource:
    """A training checkpoint as a `convert` source: the full tensors by native name, expert shards gathered."""

    def __init__(self, path: str | Path):
        from .config import TrainConfig, from_dict, model_config

        self.reader = CheckpointReader(path)
        cfg = from_dict(TrainConfig, self.reader.state["config"], f"{self.reader.path}/state.json")
        vocab = self.reader.params["embed_tokens.weight"]["shape"][0]
        self.config = model_config(cfg, vocab_size=vocab)
        dtypes = {meta["dtype"] for meta in self.reader.params.values()}
        self.dtype = getattr(torch, dtypes.pop()) if len(dtypes) == 1 else None
        self._buffers = self.reader.buffers()

    def get(self, name: str) -> torch.Tensor:
        if name in self._buffers:
            return self._buffers[name]
        return self.reader.weight(name)

    def unused_keys(self, names: list[str]) -> list[str]:
        return sorted((set(self.reader.params) | set(self._buffers)) - set(names))
