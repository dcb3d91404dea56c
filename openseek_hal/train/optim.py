"""AdamW whose update is the backend's ``adamw`` op: one multi-tensor call per parameter group.

State keys match ``torch.optim.AdamW`` (``step``, ``exp_avg``, ``exp_avg_sq``), so checkpoints and
tools that read optimizer state see the same thing. A backend's fast ``adamw`` updates in place; the
reference returns new tensors, which are copied back.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..backend import Backend


class AdamW(torch.optim.Optimizer):
    def __init__(self, params: Iterable[Any], backend: Backend, *, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._adamw = backend.op("adamw")

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("AdamW.step does not take a closure")
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self.state[p] for p in params]
            for p, state in zip(params, states):
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
            beta1, beta2 = group["betas"]
            exp_avgs = [s["exp_avg"] for s in states]
            exp_avg_sqs = [s["exp_avg_sq"] for s in states]
            new = self._adamw(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, lr=group["lr"],
                              beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                              step=int(states[0]["step"]))
            for targets, results in zip((params, exp_avgs, exp_avg_sqs), new[:3]):
                for t, r in zip(targets, results):
                    if r is not t:
                        t.copy_(r)
