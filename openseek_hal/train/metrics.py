"""Metrics sinks: ``metrics.jsonl`` in the run folder always, Weights & Biases (offline) on request.

wandb is imported only when enabled and always runs in offline mode (no network at run time);
``wandb sync`` uploads a run later from a machine that may reach the service.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserError


class MetricsLogger:
    def __init__(self, out: Path, *, use_wandb: bool = False, run_name: str | None = None,
                 config: dict[str, Any] | None = None, append: bool = False, enabled: bool = True):
        """``enabled=False`` (data-parallel ranks other than 0) logs nothing."""
        self._file = (out / "metrics.jsonl").open("a" if append else "w") if enabled else None
        self._wandb = None
        if use_wandb and enabled:
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
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
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
