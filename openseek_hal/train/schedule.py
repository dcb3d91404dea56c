"""Learning-rate schedules: a linear warmup, then cosine, warmup-stable-decay (WSD) or constant.

WSD (MiniCPM, OpenSeek) holds the peak rate after the warmup and decays only over the last
``decay_fraction`` of the steps, so a run can be extended from any checkpoint of its stable phase
and a decayed model taken at any time by branching off a short decay.
"""

from __future__ import annotations

import math

from .config import TrainConfig


def _decay(progress: float, shape: str) -> float:
    """The decay factor, 1 at ``progress`` 0 and 0 at 1."""
    progress = min(1.0, max(0.0, progress))
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - math.sqrt(progress)  # "sqrt": fast at first, then gentle (MiniCPM's 1 - sqrt)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of a ``cfg.steps``-step run."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return floor + (cfg.lr - floor) * _decay(progress, "cosine")
    # wsd: the decay phase is the last decay_fraction of the run (never reaching into the warmup)
    decay_steps = max(1, min(round(cfg.steps * cfg.decay_fraction), cfg.steps - cfg.warmup_steps))
    decay_start = cfg.steps - decay_steps
    if step < decay_start:
        return cfg.lr
    return floor + (cfg.lr - floor) * _decay((step - decay_start + 1) / decay_steps, cfg.decay_shape)
