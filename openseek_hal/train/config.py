"""Training configuration: keyword-only dataclasses, loadable from YAML, overridable from the CLI."""

from __future__ import annotations

import copy
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
    # None: $OPENSEEK_HAL_BACKEND, else the best available backend. One name per local rank ("cuda,cpu", or
    # "cuda=1,cpu=1") runs a job whose ranks use different backends (docs/train.md, "Mixed-kind jobs")
    backend: str | None = None
    data: str | None = None  # None: the built-in corpus (Python's own documentation)
    out: str = "runs/default"
    steps: int = 200
    global_batch_size: int = 16  # sequences per optimizer step, over every rank and micro-batch
    micro_batch_size: int = 0  # sequences per forward on one rank; 0: global_batch_size / data-parallel size
    seq_len: int = 128
    lr: float = 3e-3
    lr_schedule: str = "cosine"  # cosine, wsd (warmup-stable-decay) or constant; all after a linear warmup
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    decay_fraction: float = 0.1  # wsd: the last fraction of the steps decays to lr * min_lr_ratio
    decay_shape: str = "linear"  # wsd: linear, cosine or sqrt (1 - sqrt, MiniCPM)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # global gradient-norm clip; null: none
    seed: int = 0
    # "auto": bf16 weights + fp32 master (+ bf16 moments, `moment_dtype`) on accelerators, fp32 on the CPU.
    # "bf16": bf16 weights, fp32 master and moments. "autocast": fp32 weights, bf16 autocast. "fp32".
    # "fp64" (verification runs).
    dtype: str = "auto"
    log_every: int = 10
    save_every: int = 0  # 0: save only at the end
    save: bool = True  # false: write no checkpoint at all (benchmarks)
    eval_batches: int = 8
    sample_tokens: int = 48
    tokenizer_vocab_size: int = 4096
    wandb: bool = False  # also log to Weights & Biases, offline (needs the `wandb` extra)
    # parallelism: the world (torchrun / SLURM / --nproc-per-node) is data-parallel x expert-parallel
    expert_parallel: int = 1  # ranks one MoE layer's routed experts are spread over
    expert_overlap: bool = False  # run the shared experts while the routed tokens travel (measured: no gain on NVLink)
    # what the expert exchanges carry: "pairs" (a row per token and expert), "tokens" (a row per token and
    # rank, with the routing for that rank's experts: fewer rows, one small extra exchange) or
    # "allgather" (every token to every rank of the group: no split sizes, so no host sync per layer)
    expert_dispatch: str = "pairs"
    bucket_mb: float = 128.0  # gradient bucket size (fp32 bytes); reduce-scattered as soon as it is ready
    reduce_dtype: str = "fp32"  # the dtype gradients are reduced in: fp32 or bf16
    # how gradient buckets reach their shard owners: "reduce_scatter" (summed on the wire, in reduce_dtype) or
    # "all_to_all" (each rank gets the others' copies of its shard in the gradients' dtype and sums them in
    # reduce_dtype itself: fp32 sums at bf16 traffic when a step has one micro-batch)
    grad_exchange: str = "reduce_scatter"
    # the AdamW moments: "auto" (bf16 where `dtype: auto` gives bf16 weights, i.e. on accelerators, as
    # DeepSeek-V3 trains: half the moments' memory and traffic, loss inside the fp32-moment runs' band, see
    # docs/train.md; else the master's dtype), "master" (the master weights' dtype: fp32, fp64 in
    # verification runs) or "bf16"
    moment_dtype: str = "auto"
    # bf16 weights with fp32 masters: keep each master as an int16 remainder of its bf16 weight (the weight
    # is the master's upper half; together they are the same fp32 number) instead of a whole fp32 copy:
    # 2 bytes a parameter less memory and optimizer traffic. The weights are then their masters rounded
    # to nearest with exact halves away from zero (round-to-even's choice at 1 in 65536 of the values)
    master_remainder: bool = True
    # accelerators: update the buckets no collective touches on a side stream, beside the next forward
    # (each block waits for its own weights); the same kernels, so the same weights as the serial update.
    # Off by default: on one H100 the forward slowed by what the update saved (docs/train.md)
    optimizer_overlap: bool = False
    comm_adaptor: str = ""  # the Communicator adaptor every collective goes through ("": the backend's own)
    comm_timeout: float = 300.0  # seconds any collective or the rendezvous may wait before failing
    recompute: bool = False  # recompute each transformer block's activations in backward
    compile: bool = False  # torch.compile each block (where the backend supports it)
    # capture the whole training step (forward, backward, optimizer) as one device graph after one eager
    # warm-up step, and replay it: no per-kernel launches from the host (backends with device graphs: cuda).
    # "true": one rank, no fp8, no optimizer_overlap (refused otherwise). "auto" (default): captured where
    # "true" would run and no profile is asked for, eager elsewhere. The phases logged are the latest replay's
    graph_step: str = "auto"
    # FP8 training as DeepSeek-V3 does it: the linear layers of attention, the MLPs, the shared and routed
    # experts compute in e4m3 with per-tile scales (activations 1x128, weights 128x128), fp32 accumulation;
    # embedding, output head, norms and router stay in the model's dtype. Needs a backend with FP8 support.
    fp8: bool = False
    # with fp8: layers kept in the model's dtype, as comma-separated globs over the layer names
    # (e.g. "*.o_proj,*.experts": attention's output projection and the routed experts); "" keeps none
    fp8_exclude: str = ""
    # attention stays inside each document of a packed training window: a document starts at each window's
    # start and after each end-of-text token (the data's document separator), and no token attends to an
    # earlier document's (the attention op's cu_seqlens; positions are not reset). Off: a window is one
    # sequence, documents attend across their separators
    document_mask: bool = False
    profile_step: int = 0  # > 0: profile this step and the next (torch.profiler) into <out>/profile/


# Fields that a resumed run may change; any other change would break its exactness and is refused.
RESUMABLE = frozenset({"steps", "out", "backend", "log_every", "save_every", "save", "eval_batches", "sample_tokens",
                       "wandb", "comm_adaptor", "comm_timeout", "bucket_mb", "micro_batch_size", "expert_parallel",
                       "expert_overlap", "expert_dispatch", "optimizer_overlap", "recompute", "compile", "graph_step",
                       "reduce_dtype", "grad_exchange", "profile_step"})


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
        if isinstance(value, bool) and tp is str:  # YAML's true/false for a field that also takes words
            return "true" if value else "false"
        if isinstance(value, bool):
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
    """Refuse values that cannot be meant, with one line naming the field (`ConfigError`)."""
    positive = {"steps": cfg.steps, "global_batch_size": cfg.global_batch_size, "seq_len": cfg.seq_len,
                "log_every": cfg.log_every, "eval_batches": cfg.eval_batches, "expert_parallel": cfg.expert_parallel,
                "comm_timeout": cfg.comm_timeout, "bucket_mb": cfg.bucket_mb}
    for name, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{name} must be positive, got {value}")
    non_negative = {"micro_batch_size": cfg.micro_batch_size, "save_every": cfg.save_every,
                    "warmup_steps": cfg.warmup_steps, "sample_tokens": cfg.sample_tokens,
                    "weight_decay": cfg.weight_decay, "min_lr_ratio": cfg.min_lr_ratio,
                    "profile_step": cfg.profile_step}
    for name, value in non_negative.items():
        if not value >= 0:
            raise ConfigError(f"{name} must be zero or positive, got {value}")
    if cfg.grad_clip is not None and not (cfg.grad_clip > 0 and math.isfinite(cfg.grad_clip)):
        raise ConfigError(f"grad_clip must be a positive norm (or null for no clipping), got {cfg.grad_clip}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be in [0, 1), got {getattr(cfg, name)}")
    if not cfg.eps > 0:
        raise ConfigError(f"eps must be positive, got {cfg.eps}")
    if not cfg.lr > 0 or not math.isfinite(cfg.lr):
        raise ConfigError(f"lr must be positive, got {cfg.lr}")
    if not cfg.min_lr_ratio <= 1:
        raise ConfigError(f"min_lr_ratio must be at most 1, got {cfg.min_lr_ratio}")
    choices = {"dtype": ("auto", "bf16", "autocast", "fp32", "fp64"), "lr_schedule": ("cosine", "wsd", "constant"),
               "decay_shape": ("linear", "cosine", "sqrt"), "reduce_dtype": ("fp32", "bf16"),
               "grad_exchange": ("reduce_scatter", "all_to_all"),
               "expert_dispatch": ("pairs", "tokens", "allgather"), "moment_dtype": ("auto", "master", "bf16"),
               "graph_step": ("auto", "true", "false")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    if not 0 < cfg.decay_fraction <= 1:
        raise ConfigError(f"decay_fraction must be in (0, 1], got {cfg.decay_fraction}")
    if cfg.tokenizer_vocab_size < MIN_VOCAB:
        raise ConfigError(f"tokenizer_vocab_size must be at least {MIN_VOCAB} (256 bytes + end of text), "
                          f"got {cfg.tokenizer_vocab_size}")
    if cfg.backend:
        from .kinds import parse_backends

        parse_backends(cfg.backend)  # one backend, or one per local rank: a typo fails here
    if cfg.fp8_exclude and not cfg.fp8:
        raise ConfigError("fp8_exclude names layers to keep out of fp8, but fp8 is off")
    if cfg.fp8 and cfg.expert_parallel > 1 and cfg.expert_dispatch == "allgather":
        raise ConfigError("expert_dispatch=allgather does not run with fp8: its buffer has rows past the experts' "
                          "counts, which the fp8 grouped GEMM's weight gradient does not yet leave out; use "
                          "expert_dispatch=pairs or tokens with fp8")
    if cfg.graph_step == "true":
        for name, why in GRAPH_EXCLUDES.items():
            if getattr(cfg, name):
                raise ConfigError(f"graph_step does not run with {name}: {why}")
    mc = model_config(cfg)  # a bad model field fails here, before any data is read
    if mc.n_routed_experts and mc.n_routed_experts % cfg.expert_parallel:
        raise ConfigError(f"expert_parallel={cfg.expert_parallel} does not divide the {mc.n_routed_experts} "
                          "routed experts")


MIN_VOCAB = 257
# what a captured step cannot hold: `graph_step: true` refuses these, "auto" runs them eagerly
GRAPH_EXCLUDES = {"fp8": "its weight cache is refreshed by the host between steps",
                  "optimizer_overlap": "a captured step is one stream's work"}


def check_world(cfg: TrainConfig, world_size: int) -> tuple[int, int, int]:
    """``(data_parallel, micro_batch_size, accumulation_steps)`` of ``cfg`` on ``world_size`` ranks."""
    if world_size % cfg.expert_parallel:
        raise ConfigError(f"expert_parallel={cfg.expert_parallel} does not divide the {world_size} ranks")
    # every rank holds a replica of the dense weights and sees its own tokens: the data-parallel size is the world
    dp = world_size
    if cfg.global_batch_size % dp:
        raise ConfigError(f"global_batch_size {cfg.global_batch_size} does not split over {dp} data-parallel ranks")
    per_rank = cfg.global_batch_size // dp
    micro = cfg.micro_batch_size or per_rank
    if per_rank % micro:
        raise ConfigError(f"micro_batch_size {micro} does not divide the {per_rank} sequences per rank "
                          f"(global_batch_size {cfg.global_batch_size} over {dp} ranks)")
    return dp, micro, per_rank // micro


def check_resumable(saved: dict[str, Any], step: int, cfg: TrainConfig, where: str) -> None:
    """Refuse ``cfg`` as the continuation of a checkpoint (``saved`` config, at ``step``) when it would not be exact.

    Changing a field outside `RESUMABLE` (seed, batch, data, model, schedule, ...) would make the
    resumed run differ from an uninterrupted one; so would stopping before the checkpoint's step.
    """
    base = from_dict(TrainConfig, saved, "checkpoint config")
    changed = [f.name for f in dataclasses.fields(TrainConfig)
               if f.name not in RESUMABLE and getattr(cfg, f.name) != getattr(base, f.name)]
    if changed:
        name = changed[0]
        raise ConfigError(f"--resume: {name} differs from the checkpoint's ({getattr(base, name)!r} in {where}, "
                          f"now {getattr(cfg, name)!r}); a resumed run keeps the settings that decide its numbers "
                          "(start a new run to change it)")
    if cfg.steps < step:
        raise ConfigError(f"--resume: steps={cfg.steps} is below the checkpoint's step {step}")


def resumed_config(saved: dict[str, Any], step: int, overrides: dict[str, Any], where: str) -> TrainConfig:
    """The config of a resumed run: the checkpoint's, with ``overrides`` that keep the run exact."""
    merged = load_config(None, {**copy.deepcopy(saved), **overrides})
    check_resumable(saved, step, merged, where)
    return merged
