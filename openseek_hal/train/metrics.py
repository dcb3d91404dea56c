"""Metrics sinks: ``metrics.jsonl`` in the run folder always, Weights & Biases (offline) on request.

Each line is strict JSON (a non-finite value is written as ``null``). A resumed run first drops the
rows of steps after the checkpoint it resumed from (an interrupted run may have logged them), so
every step appears once. wandb is imported only when enabled and always runs in offline mode (no
network at run time); ``wandb sync`` uploads a run later from a machine that may reach the service.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..fileio import atomic_write_text


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLogger:
    def __init__(self, out: Path, *, use_wandb: bool = False, run_name: str | None = None,
                 config: dict[str, Any] | None = None, resume_step: int | None = None, enabled: bool = True):
        """``resume_step``: continue the file of a run resumed at that step; ``enabled=False`` logs nothing."""
        self._file = None
        self._wandb = None
        if not enabled:
            return
        path = out / "metrics.jsonl"
        if resume_step is not None and path.exists():
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if int(json.loads(line)["step"]) <= resume_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by a crash
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        self._file = path.open("a" if resume_step is not None else "w", encoding="utf-8")
        if use_wandb:
            try:
                import wandb
            except ImportError:
                raise UserError("wandb logging was asked for but wandb is not installed "
                                "(pip install 'openseek-hal[wandb]')") from None
            self._wandb = wandb.init(project="openseek-hal", name=run_name, dir=str(out), mode="offline",
                                     config=config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self._file is None:
            return
        row = {k: _finite(v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, **row}, allow_nan=False) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
