"""`build_model`: a DeepSeek-V3 from a preset name, a config (object, dict or YAML path) and a backend."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ...backend import Backend, get_backend
from .config import DeepseekV3Config
from .model import DeepseekV3
from .presets import PRESETS, preset


def resolve_config(spec: str | Path | Mapping[str, Any] | DeepseekV3Config, **overrides: Any) -> DeepseekV3Config:
    """A preset name, a YAML file, a dict of fields or a config, with ``overrides`` applied."""
    if isinstance(spec, DeepseekV3Config):
        return spec.replace(**overrides) if overrides else spec
    if isinstance(spec, Mapping):
        return DeepseekV3Config.from_dict(spec, **overrides)
    if isinstance(spec, str) and spec in PRESETS:
        return preset(spec, **overrides)
    return DeepseekV3Config.from_yaml(spec, **overrides)


def resolve_backend(backend: Backend | str | None) -> Backend:
    return backend if isinstance(backend, Backend) else get_backend(backend)


def build_model(spec: str | Path | Mapping[str, Any] | DeepseekV3Config, backend: Backend | str | None = None, *,
                dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                init: bool = True, seed: int | None = None, **overrides: Any) -> DeepseekV3:
    """Build (and by default initialize) a model on ``device`` (default: the backend's device).

    ``device="meta"`` builds the structure without memory (parameter counting, sharding plans);
    ``init=False`` leaves parameters uninitialized for a checkpoint to fill.
    """
    config = resolve_config(spec, **overrides)
    backend = resolve_backend(backend)
    device = torch.device(device) if device is not None else backend.device.torch_device
    with torch.device("meta"):
        model = DeepseekV3(config, backend)
    if dtype is not None:
        model = model.to(dtype)  # on meta, so memory is allocated once, in the final dtype
    if device.type == "meta":
        return model
    model = model.to_empty(device=device)
    for m in model.moe_layers():
        m.expert_load.zero_()
    if init:
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        model.init_weights(generator)
    return model
