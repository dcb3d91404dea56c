"""Model level: a few training steps on backend X against the same steps on the ``cpu`` reference.

Both runs start from the same initial weights (built once under the run's seed, then copied) and see
the same batches. The reference runs in float64 on the CPU; backend X runs in the dtype under test.
A model with a ``loss`` method (DeepSeek-V3) trains the way the trainer does: ``model.loss`` (main,
MTP and balance losses; the in-place cross entropy), the trainer's `DistributedOptimizer` on the
backend's own ``adamw`` op (fp32 masters for bf16 weights) and the expert-bias update; any other
model is called for logits and trained on the backend's ``cross_entropy``. Each step records the loss
and the global gradient norm before the update. Checks:

- ``logits``: the step-0 forward logits, norm-wise within ``LOGITS_BAND[dtype]``;
- ``loss_curve`` / ``grad_norm_curve``: at every step, ``|x - ref| / |ref|`` within ``BANDS[dtype]``.

The bands come from measurements of the reference backend itself in each dtype (see
``docs/conformance/tolerances.md``): a backend that computes what the reference computes stays well
inside them; a wrong op (a sign, an eps, a dropped term) leaves them at the first step or soon after.
When a check fails, one forward is run again on both backends with every op call captured, and the
message names the first op whose outputs leave the logits band (`first_divergence`), so a vendor
does not bisect by hand.

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

# dtype -> (loss relative band, grad-norm relative band), per step: about 3x the worst spread measured
# with benchmarks/conformance/model_level_spread.py over 8 steps on `cpu` (30 seeds), `cuda` (H200, 5
# seeds) and `triton-interpret` (fp32: loss 2.7e-7, grad norm 1.1e-5; bf16: loss 1.1e-3, grad norm 0.039)
BANDS: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-6, 4e-5),
    torch.bfloat16: (3.5e-3, 1.2e-1),
}
# dtype -> bound on ||logits - ref|| / ||ref|| at step 0. Norm-wise, not element-wise: in bf16 a token
# whose top-k experts nearly tie may be routed differently, which moves a few logits a lot and is
# still correct behaviour.
LOGITS_BAND: dict[torch.dtype, float] = {  # measured: fp32 5.3e-7, bf16 0.029
    torch.float32: 2e-6,
    torch.bfloat16: 9e-2,
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
    from ..train.zero import DistributedOptimizer, master_dtype, named_spaces

    device = backend.device.torch_device
    cross_entropy = backend.op("cross_entropy")
    master = master_dtype(next(model.parameters()).dtype)
    optimizer = DistributedOptimizer(named_spaces(model, None, None, lambda p: False), backend, world=None, lr=lr,
                                     betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, master_dtype=master)
    has_loss = callable(getattr(model, "loss", None))
    losses, norms, first_logits = [], [], None
    for step, batch in enumerate(batches):
        batch = batch.to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        if first_logits is None:
            with torch.no_grad():
                first_logits = _logits_of(model(x)).detach().cpu()
        optimizer.start_step(1)
        if has_loss:
            loss = model.loss(x, y).total
        else:
            logits = _logits_of(model(x))
            loss = cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        optimizer.finish_gradients()
        stats = optimizer.step(lr, None)
        if callable(getattr(model, "update_expert_bias", None)):
            model.update_expert_bias()
        losses.append(float(loss.detach().cpu()))
        norms.append(float(stats.grad_norm))
        advance(f"{backend.name} step {step}")
    optimizer.close()
    assert first_logits is not None
    return Trajectory(first_logits, losses, norms)


@dataclass
class OpCall:
    op: str
    module: str  # the module that called it
    outputs: list[torch.Tensor]  # floating outputs, float64 on the CPU


def capture_forward(model: nn.Module, backend: Backend, ids: torch.Tensor) -> list[OpCall]:
    """Every HAL op call of one forward of ``model``, with its floating outputs, in call order.

    The model's modules keep the callables `Backend.op` returned; each is wrapped for this forward.
    """
    from .. import ops

    by_callable = {}
    for name in ops.REGISTRY:
        try:
            by_callable[id(backend.op(name))] = name
        except Exception:  # noqa: S112 - an op this backend cannot give is simply not captured
            continue
    calls: list[OpCall] = []
    patched: list[tuple[nn.Module, str, Any]] = []

    def wrap(fn: Callable[..., Any], op: str, where: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            leaves = out if isinstance(out, (tuple, list)) else [out]
            calls.append(OpCall(op, where, [t.detach().to("cpu", torch.float64) for t in leaves
                                            if isinstance(t, torch.Tensor) and t.is_floating_point()]))
            return out
        return call

    for where, module in model.named_modules():
        for attr, value in list(vars(module).items()):
            if callable(value) and id(value) in by_callable:
                patched.append((module, attr, value))
                setattr(module, attr, wrap(value, by_callable[id(value)], where or "model"))
    try:
        with torch.no_grad():
            model(ids.to(backend.device.torch_device))
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)
    return calls


def first_divergence(got: list[OpCall], ref: list[OpCall], band: float) -> str:
    """The first call whose outputs differ from the reference's by more than ``band`` (norm-wise)."""
    for i, (a, r) in enumerate(zip(got, ref)):
        if a.op != r.op:
            return f"call {i} is {a.op} ({a.module}) where the reference calls {r.op} ({r.module})"
        for j, (x, e) in enumerate(zip(a.outputs, r.outputs)):
            err = _normwise(x, e)
            if not err <= band:
                return (f"first divergence: op {a.op} in {a.module} (call {i}, output {j}): "
                        f"||x - ref|| / ||ref|| = {err:.3g} > {band:g}")
    if len(got) != len(ref):
        return f"{len(got)} op calls in the forward, the reference makes {len(ref)}"
    return "every op of the forward matches the reference: the divergence is in a backward or the update"


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
            failed = [r for r in results if r.level == "model" and r.dtype == dt and r.status == "fail"]
            if failed:
                where = self._localize(spec, reference_backend, initial, dtype, batches[0][:, :-1], logits_band)
                for r in failed:
                    r.message = f"{r.message}; {where}"
            curves.append({"dtype": dt, "model": spec.name, "band": {"loss": loss_band, "grad_norm": norm_band},
                           "steps": list(range(self.steps)), "loss": got.loss, "loss_ref": ref.loss,
                           "grad_norm": got.grad_norm, "grad_norm_ref": ref.grad_norm})
        return [self.manifest.apply(r) for r in results], curves

    def _localize(self, spec: ModelSpec, reference: Backend, initial: dict[str, torch.Tensor], dtype: torch.dtype,
                  ids: torch.Tensor, band: float) -> str:
        try:
            ref = capture_forward(self._model(spec, reference, initial, torch.float64), reference, ids)
            got = capture_forward(self._model(spec, self.backend, initial, dtype), self.backend, ids)
            return first_divergence(got, ref, band)
        except Exception as e:  # localizing is a help, never a reason to lose the verdict
            return f"(the op capture raised {error_text(e)})"

    @staticmethod
    def _model(spec: ModelSpec, backend: Backend, initial: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
        model = spec.factory(backend)
        model.load_state_dict(initial)
        return model.to(device=backend.device.torch_device, dtype=dtype)
