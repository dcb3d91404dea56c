"""Model level: a few training steps on backend X against the same steps on the ``cpu`` reference.

Both runs start from the same initial weights (built once under the run's seed, then copied) and see
the same batches. The reference runs in float64 on the CPU; backend X runs in the dtype under test.
Each step records the loss and the global gradient norm before AdamW updates the weights. Checks:

- ``logits``: the step-0 forward logits, norm-wise within ``LOGITS_BAND[dtype]``;
- ``loss_curve`` / ``grad_norm_curve``: at every step, ``|x - ref| / |ref|`` within ``BANDS[dtype]``.

The bands come from measurements of the reference backend itself in each dtype (see
``docs/conformance/tolerances.md``): a backend that computes what the reference computes stays well
inside them; a wrong op (a sign, an eps, a dropped term) leaves them at the first step or soon after.

The model is the ``tiny`` DeepSeek-V3 preset (any model factory can be passed instead).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..backend import Backend, get_backend
from .manifest import Manifest, dtype_name
from .op_level import error_text
from .records import CheckResult

# dtype -> (loss relative band, grad-norm relative band), per step
BANDS: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (3e-2, 1.5e-1),
}
# dtype -> bound on ||logits - ref|| / ||ref|| at step 0. Norm-wise, not element-wise: in bf16 a token
# whose top-k experts nearly tie may be routed differently, which moves a few logits a lot and is
# still correct behaviour.
LOGITS_BAND: dict[torch.dtype, float] = {
    torch.float32: 1e-5,
    torch.bfloat16: 1e-1,
}

ModelFactory = Callable[[Backend], nn.Module]


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    name: str
    factory: ModelFactory
    vocab_size: int
    batch: int = 2
    seq: int = 32
    lr: float = 3e-4


def default_spec() -> ModelSpec:
    """The ``tiny`` DeepSeek-V3 preset."""
    from ..models import build_model, preset

    return ModelSpec(name="deepseek-v3 tiny", factory=lambda be: build_model("tiny", be),
                     vocab_size=preset("tiny").vocab_size)


def _logits_of(output: Any) -> torch.Tensor:
    """Logits from whatever a model returns: a tensor, a tuple starting with them, or an object/dict."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        return output["logits"]
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.logits


@dataclass
class Trajectory:
    logits: torch.Tensor  # step-0 logits, on the CPU
    loss: list[float]
    grad_norm: list[float]


def train_steps(model: nn.Module, backend: Backend, batches: list[torch.Tensor], lr: float,
                advance: Callable[[str], None] = lambda _: None) -> Trajectory:
    device = backend.device.torch_device
    cross_entropy = backend.op("cross_entropy")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    losses, norms, first_logits = [], [], None
    for step, batch in enumerate(batches):
        batch = batch.to(device)
        logits = _logits_of(model(batch[:, :-1]))
        if first_logits is None:
            first_logits = logits.detach().cpu()
        loss = cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.linalg.vector_norm(torch.stack([
            torch.linalg.vector_norm(p.grad.detach().cpu().to(torch.float64))
            for p in model.parameters() if p.grad is not None]))
        optimizer.step()
        losses.append(float(loss.detach().cpu()))
        norms.append(float(norm))
        advance(f"{backend.name} step {step}")
    assert first_logits is not None
    return Trajectory(first_logits, losses, norms)


def _normwise(x: torch.Tensor, ref: torch.Tensor) -> float:
    if x.shape != ref.shape:
        return float("inf")
    x = x.to(torch.float64)
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref).clamp(min=1e-300))


def _relative(x: list[float], ref: list[float]) -> list[float]:
    return [abs(a - b) / max(abs(b), 1e-12) if a == a else float("inf") for a, b in zip(x, ref)]


@dataclass
class ModelLevel:
    backend: Backend
    manifest: Manifest
    seed: int
    steps: int = 8
    spec: ModelSpec | None = None

    def run(self, dtypes: list[torch.dtype], advance: Callable[[str], None] = lambda _: None
            ) -> tuple[list[CheckResult], list[dict[str, Any]]]:
        try:
            spec = self.spec or default_spec()
            reference_backend = get_backend("cpu")
            torch.manual_seed(self.seed)
            initial = {k: v.detach().clone() for k, v in spec.factory(reference_backend).state_dict().items()}
            gen = torch.Generator().manual_seed(self.seed)
            # two batches in turn, so the loss has something to learn and the curves have a shape
            distinct = [torch.randint(0, spec.vocab_size, (spec.batch, spec.seq + 1), generator=gen)
                        for _ in range(2)]
            batches = [distinct[i % 2] for i in range(self.steps)]
            ref = train_steps(self._model(spec, reference_backend, initial, torch.float64), reference_backend,
                              batches, spec.lr, advance)
        except Exception as e:  # the reference run itself broke: report it, the other levels still count
            return [CheckResult(level="model", op="model", check="loss_curve", status="error", seed=self.seed,
                                message=f"the reference model run raised {error_text(e)}")], []
        results, curves = [], []
        for dtype in dtypes:
            dt = dtype_name(dtype)
            base = dict(level="model", op="model", dtype=dt, seed=self.seed, sample=spec.name,
                        shape=f"batch {spec.batch}x{spec.seq}, {self.steps} steps",
                        replay=f"openseek-hal conform --backend {self.backend.name} --level model "
                               f"--dtype {dt} --seed {self.seed}")
            skip = self.manifest.skip_reason(dt)
            if skip:
                results.append(CheckResult(**base, check="loss_curve", status="skip", message=skip))
                continue
            started = time.perf_counter()
            try:
                got = train_steps(self._model(spec, self.backend, initial, dtype), self.backend, batches, spec.lr,
                                  advance)
            except Exception as e:
                results.append(CheckResult(**base, check="loss_curve", status="error", message=error_text(e)))
                continue
            elapsed = round(time.perf_counter() - started, 3)
            loss_band, norm_band = BANDS.get(dtype, BANDS[torch.bfloat16])
            logits_band = LOGITS_BAND.get(dtype, LOGITS_BAND[torch.bfloat16])
            error = _normwise(got.logits, ref.logits)
            results.append(CheckResult(
                **base, check="logits", status="pass" if error <= logits_band else "fail",
                max_abs_err=float((got.logits.double() - ref.logits).abs().max()), max_rel_err=error,
                rtol=logits_band, err_ratio=error / logits_band, duration_s=elapsed,
                message="" if error <= logits_band else f"||logits - ref|| / ||ref|| = {error:.3g} > {logits_band:g}"))
            for check, x, r, band in (("loss_curve", got.loss, ref.loss, loss_band),
                                      ("grad_norm_curve", got.grad_norm, ref.grad_norm, norm_band)):
                rel = _relative(x, r)
                worst = max(range(len(rel)), key=rel.__getitem__)
                ok = rel[worst] <= band
                results.append(CheckResult(
                    **base, check=check, status="pass" if ok else "fail", max_rel_err=rel[worst], rtol=band,
                    err_ratio=rel[worst] / band,
                    max_abs_err=abs(x[worst] - r[worst]),
                    message="" if ok else f"step {worst}: {x[worst]:.6g} vs reference {r[worst]:.6g} "
                                          f"(relative {rel[worst]:.3g} > band {band:g})"))
            curves.append({"dtype": dt, "model": spec.name, "band": {"loss": loss_band, "grad_norm": norm_band},
                           "steps": list(range(self.steps)), "loss": got.loss, "loss_ref": ref.loss,
                           "grad_norm": got.grad_norm, "grad_norm_ref": ref.grad_norm})
        return [self.manifest.apply(r) for r in results], curves

    @staticmethod
    def _model(spec: ModelSpec, backend: Backend, initial: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
        model = spec.factory(backend)
        model.load_state_dict(initial)
        return model.to(device=backend.device.torch_device, dtype=dtype)
