"""Training configuration: keyword-only dataclasses, loadable from YAML, overridable from the CLI."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..fileio import read_yaml_mapping

if typing.TYPE_CHECKING:
    from ..models.deepseek_v3.config import DeepseekV3Config


@dataclass(kw_only=True)
class TrainConfig:
    # A DeepSeek-V3 preset name (tiny, openseek-small, deepseek-v3) or a YAML file of config fields,
    # and overrides of its fields by their Hugging Face names (vocab_size comes from the tokenizer).
    model_preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)
    backend: str | None = None  # None: the best available backend
    data: str | None = None  # None: the built-in corpus (Python's own documentation)
    out: str = "runs/default"
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "auto"  # "auto": bf16 autocast on accelerators, fp32 on the CPU; or fp32 / bf16 / fp64 (verification)
    log_every: int = 10
    save_every: int = 0  # 0: save only at the end
    eval_batches: int = 8
    sample_tokens: int = 48
    tokenizer_vocab_size: int = 4096
    wandb: bool = False  # also log to Weights & Biases, offline (needs the `wandb` extra)
    data_parallel: int = 1  # local ranks, one model replica each (one device each on accelerators)
    comm_adaptor: str = "torch"  # the Communicator adaptor the ranks average gradients through


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check and convert ``value`` to the annotated type ``tp`` (dataclasses, Optional, scalars)."""
    if typing.get_origin(tp) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float, str):
        if isinstance(value, bool) and tp is not str:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        try:
            converted = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != converted:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return converted
    return value


def from_dict(cls: type, data: dict[str, Any], where: str = "config") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise `ConfigError`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (valid: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()})


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A `TrainConfig` from a YAML file (optional) with ``overrides`` (dotted keys allowed) applied."""
    data = read_yaml_mapping(path, "config file") if path is not None else {}
    for key, value in (overrides or {}).items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    cfg = from_dict(TrainConfig, data)
    validate(cfg)
    return cfg


def model_config(cfg: TrainConfig, **overrides: Any) -> DeepseekV3Config:
    """The model config of a run: its preset with ``cfg.model`` and ``overrides`` applied."""
    from ..models.deepseek_v3.build import resolve_config
    from ..models.deepseek_v3.presets import PRESETS

    if cfg.model_preset not in PRESETS and not Path(cfg.model_preset).is_file():
        raise ConfigError(f"model_preset '{cfg.model_preset}' is neither a preset ({', '.join(PRESETS)}) "
                          "nor a YAML file")
    try:
        return resolve_config(cfg.model_preset, **{**cfg.model, **overrides})
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None


def validate(cfg: TrainConfig) -> None:
    positive = {"steps": cfg.steps, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "log_every": cfg.log_every,
                "data_parallel": cfg.data_parallel}
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")
    if cfg.batch_size % cfg.data_parallel:
        raise ConfigError(f"batch_size {cfg.batch_size} does not split over data_parallel={cfg.data_parallel} ranks")
    model_config(cfg)  # a bad model field fails here, before any data is read
    if not cfg.lr > 0 or not math.isfinite(cfg.lr):
        raise ConfigError(f"lr must be positive, got {cfg.lr}")
    if cfg.dtype not in ("auto", "fp32", "bf16", "fp64"):
        raise ConfigError(f"dtype must be auto, fp32, bf16 or fp64, got {cfg.dtype!r}")
