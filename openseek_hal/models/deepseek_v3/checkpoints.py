"""DeepSeek-V3 checkpoints in two formats, read and written one native tensor at a time.

- ``hf``: a Hugging Face ``DeepseekV3ForCausalLM`` directory (``config.json`` + safetensors shards
  + index), as DeepSeek publishes and transformers loads; the MTP layers when present; FP8 e4m3
  weights with ``weight_scale_inv`` block scales are dequantized on read.
- ``native``: ours (documented in ``docs/model.md``): ``config.json`` =
  ``{"format": "openseek-hal-native", "format_version": 1, "architecture": "deepseek_v3", "config": {...}}``
  with every `DeepseekV3Config` field; ``model.safetensors.index.json``; shards
  ``model-0000i-of-0000N.safetensors`` whose tensor names are exactly ``model.state_dict()``'s.

A *source* yields native tensors by native name; a *sink* takes them. `load`, `save` and the
``convert`` command are all "for each native name: sink.put(name, source.get(name))", so memory
never holds more than one native tensor (one MoE layer's stacked experts at most) beyond the model.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from ...backend import Backend
from ...errors import ConfigError
from ..checkpoint_io import DEFAULT_SHARD_BYTES, CheckpointError, ShardedReader, ShardedWriter, read_json
from ..fp8 import dequantize_blockwise, is_fp8
from . import state_dict_adapter as adapter
from .build import build_model
from .config import DeepseekV3Config
from .model import DeepseekV3

NATIVE_FORMAT = "openseek-hal-native"
NATIVE_VERSION = 1
FORMATS = ("hf", "native")


def native_layout(config: DeepseekV3Config) -> dict[str, torch.Tensor]:
    """Native tensor names in order, with meta tensors giving their shapes and dtypes."""
    from ...backends.cpu import CPUBackend  # the structure does not depend on the backend

    with torch.device("meta"):
        return DeepseekV3(config, CPUBackend()).state_dict()


def _config_from(path: Path, parse) -> DeepseekV3Config:
    try:
        return parse(read_json(path / "config.json"))
    except ConfigError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None


# -- sources ---------------------------------------------------------------------------------------

class HFSource:
    """Native tensors assembled from a HF checkpoint directory (FP8 dequantized to ``fp8_dtype``)."""

    def __init__(self, path: str | Path, fp8_dtype: torch.dtype = torch.bfloat16):
        self.path = Path(path)
        self.reader = ShardedReader(self.path)
        hf = read_json(self.path / "config.json")
        if hf.get("format") == NATIVE_FORMAT:
            raise CheckpointError(f"{self.path} is an {NATIVE_FORMAT} checkpoint, not a Hugging Face one")
        if hf.get("model_type", "deepseek_v3") not in ("deepseek_v3", "deepseek_v2"):
            raise CheckpointError(f"{self.path}: model_type {hf['model_type']!r} is not a DeepSeek-V3 model")
        config = _config_from(self.path, DeepseekV3Config.from_hf)
        depth = adapter.hf_mtp_depth(self.reader.keys(), config.num_hidden_layers)
        if depth < config.num_nextn_predict_layers:  # transformers drops the MTP layers when it saves
            config = config.replace(num_nextn_predict_layers=depth)
        self.config = config
        quant = hf.get("quantization_config") or {}
        self.block = tuple(quant.get("weight_block_size", (128, 128)))
        self.fp8_dtype = fp8_dtype
        self.dtype = _dtype_named(hf.get("torch_dtype") or hf.get("dtype"))

    def _tensor(self, key: str) -> torch.Tensor:
        tensor = self.reader.get(key)
        if not is_fp8(tensor):
            return tensor
        scale_key = key + "_scale_inv"
        if scale_key not in self.reader:
            raise CheckpointError(f"{self.path}: FP8 tensor '{key}' has no '{scale_key}'")
        try:
            return dequantize_blockwise(tensor, self.reader.get(scale_key), self.block, self.fp8_dtype)
        except ValueError as e:
            raise CheckpointError(f"{self.path}: '{key}': {e}") from None

    def get(self, name: str) -> torch.Tensor:
        plan = adapter.plan(name, self.config)
        missing = [k for k in plan.hf_keys if k not in self.reader]
        if missing:
            raise CheckpointError(f"{self.path}: missing tensor '{missing[0]}' (needed for '{name}')")
        return plan.to_native([self._tensor(k) for k in plan.hf_keys])

    def unused_keys(self, names: list[str]) -> list[str]:
        """HF tensors that no native tensor reads (scales and the MTP copies excepted)."""
        used = {k for n in names for k in adapter.plan(n, self.config).hf_keys}
        used |= {k for n in names for k in adapter.hf_copies(n, self.config)}
        return sorted(k for k in self.reader.keys() if k not in used and not k.endswith("_scale_inv"))


class NativeSource:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.reader = ShardedReader(self.path)

        def parse(meta: dict[str, Any]) -> DeepseekV3Config:
            if meta.get("format") != NATIVE_FORMAT:
                raise ConfigError(f"not an {NATIVE_FORMAT} checkpoint (format: {meta.get('format')!r})")
            if meta.get("format_version") != NATIVE_VERSION:
                raise ConfigError(f"unsupported format_version {meta.get('format_version')!r}")
            return DeepseekV3Config.from_dict(meta.get("config") or {})

        self.config = _config_from(self.path, parse)
        self.dtype = self.reader.dtype("embed_tokens.weight") if "embed_tokens.weight" in self.reader else None

    def get(self, name: str) -> torch.Tensor:
        if name not in self.reader:
            raise CheckpointError(f"{self.path}: missing tensor '{name}'")
        return self.reader.get(name)

    def unused_keys(self, names: list[str]) -> list[str]:
        return sorted(set(self.reader.keys()) - set(names))


def open_source(fmt: str, path: str | Path) -> Any:
    """A reader of checkpoint ``path``: "hf", "native", or "run" (a training run or checkpoint folder)."""
    if fmt == "run":
        from ...train.checkpoint import RunSource

        return RunSource(path)
    return HFSource(path) if fmt == "hf" else NativeSource(path)


# -- sinks -----------------------------------------------------------------------------------------

class Sink:
    """Writes native tensors as format ``fmt``; a context manager around a `ShardedWriter`."""

    def __init__(self, fmt: str, path: str | Path, config: DeepseekV3Config, *,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False, dtype: torch.dtype | None = None):
        if fmt not in FORMATS:
            raise ValueError(f"unknown checkpoint format {fmt!r}")
        self.fmt, self.config = fmt, config
        self.writer = ShardedWriter(path, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
        if fmt == "hf":
            hf = config.to_hf()
            if dtype is not None:
                hf["torch_dtype"] = str(dtype).removeprefix("torch.")
            self.writer.add_json("config.json", hf)
        else:
            self.writer.add_json("config.json", {"format": NATIVE_FORMAT, "format_version": NATIVE_VERSION,
                                                 "architecture": "deepseek_v3", "config": config.to_dict()})

    def __enter__(self) -> Sink:
        self.writer.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.writer.__exit__(*exc)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        if self.fmt == "native":
            self.writer.add(name, tensor)
            return
        for key, part in adapter.plan(name, self.config).to_hf(tensor).items():
            self.writer.add(key, part)
        for key in adapter.hf_copies(name, self.config):
            self.writer.add(key, tensor.clone())


# -- model-level API -------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _dtype_named(name: str | None) -> torch.dtype | None:
    return _DTYPES.get(name) if isinstance(name, str) else None


@torch.no_grad()
def load(fmt: str, path: str | Path, backend: Backend | str | None = None, *, dtype: torch.dtype | None = None,
         device: torch.device | str | None = None) -> DeepseekV3:
    """A model with the weights of checkpoint ``path`` (format ``fmt``: "hf" or "native").

    ``dtype`` defaults to the checkpoint's (``torch_dtype`` of config.json, FP8 giving bfloat16), else float32.
    """
    source = open_source(fmt, path)
    target_dtype = dtype or source.dtype or torch.float32
    if isinstance(source, HFSource):
        source.fp8_dtype = target_dtype  # dequantize straight to the model's dtype, not through bfloat16
    model = build_model(source.config, backend, dtype=target_dtype, device=device, init=False)
    state = model.state_dict()
    for name, tensor in state.items():
        value = source.get(name)
        if tuple(value.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{path}: '{name}' has shape {tuple(value.shape)}, the config says "
                                  f"{tuple(tensor.shape)}")
        tensor.copy_(value)
    unused = source.unused_keys(list(state))
    if unused:
        warnings.warn(f"{path}: {len(unused)} tensor(s) not used by the model, e.g. {unused[0]}", stacklevel=2)
    return model


@torch.no_grad()
def save(fmt: str, model: DeepseekV3, path: str | Path, *, dtype: torch.dtype | None = None,
         max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False) -> None:
    """Write ``model`` as format ``fmt`` ("hf": a directory transformers loads; "native": ours)."""
    state = model.state_dict()
    first = next(iter(state.values()))
    with Sink(fmt, path, model.config, max_shard_bytes=max_shard_bytes, overwrite=overwrite,
              dtype=dtype or first.dtype) as sink:
        for name, tensor in state.items():
            if dtype is not None and tensor.is_floating_point() and not name.endswith("e_score_correction_bias"):
                tensor = tensor.to(dtype)
            sink.put(name, tensor)


def load_hf(path: str | Path, backend: Backend | str | None = None, *, dtype: torch.dtype | None = None,
            device: torch.device | str | None = None) -> DeepseekV3:
    """Load a HF DeepseekV3 checkpoint directory (MTP layers when present; FP8 block-scaled weights dequantized)."""
    return load("hf", path, backend, dtype=dtype, device=device)


def save_hf(model: DeepseekV3, path: str | Path, *, dtype: torch.dtype | None = None,
            max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False) -> None:
    """Write a HF DeepseekV3 checkpoint directory (with the MTP layers as DeepSeek lays them out)."""
    save("hf", model, path, dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite)


def load_native(path: str | Path, backend: Backend | str | None = None, *, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None) -> DeepseekV3:
    return load("native", path, backend, dtype=dtype, device=device)


def save_native(model: DeepseekV3, path: str | Path, *, dtype: torch.dtype | None = None,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False) -> None:
    save("native", model, path, dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
