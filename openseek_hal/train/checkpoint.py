"""Checkpoints: model and optimizer tensors in safetensors, trainer state in JSON; atomic, exact resume.

Layout of one checkpoint, ``<out>/checkpoints/step_000200/``::

    model.safetensors       parameters by their module names
    optimizer.safetensors   optimizer state tensors, "<param name>.<state key>"
    state.json              step, config, tokenizer, loss history

A checkpoint is written into a temporary sibling folder and renamed into place, then the
``latest`` pointer file is replaced atomically: a crash leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..fileio import atomic_write_text


def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> Path:
    """Write checkpoint ``step`` under ``root/checkpoints`` and point ``latest`` at it."""
    ckpt_root = Path(root) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_root, prefix=f".step_{step:06d}."))
    try:
        # tied weights appear once: safetensors refuses shared storage
        model_tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(model_tensors, str(tmp / "model.safetensors"))
        names = {id(p): n for n, p in model.named_parameters()}
        opt_tensors = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                for key, value in optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value):
                        opt_tensors[f"{names[id(p)]}.{key}"] = value.detach().cpu().contiguous().clone()
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(ckpt_root / "latest", final.name + "\n")
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from itself, a run folder, or a run's ``checkpoints`` folder (via ``latest``)."""
    p = Path(path)
    for candidate in (p, p / "checkpoints"):
        if (candidate / "latest").is_file():
            return candidate / (candidate / "latest").read_text().strip()
    if (p / "state.json").is_file():
        return p
    raise UserError(f"no checkpoint found at {p}")


def load_checkpoint(path: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load weights (and optimizer state) in place; returns the saved ``state.json``."""
    ckpt = resolve_checkpoint(path)
    try:
        state = json.loads((ckpt / "state.json").read_text())
        weights = load_file(str(ckpt / "model.safetensors"))
        opt_tensors = load_file(str(ckpt / "optimizer.safetensors")) if optimizer is not None else {}
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise UserError(f"checkpoint {ckpt} is unreadable: {e}") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"checkpoint {ckpt} does not match the model: {str(e).splitlines()[0]}") from None
    if optimizer is not None:
        params = dict(model.named_parameters())
        for key, value in opt_tensors.items():
            name, _, state_key = key.rpartition(".")
            p = params[name]
            optimizer.state[p][state_key] = value.to(p.device) if state_key != "step" else value
    return state
