"""Pick, once per shape, the faster of several `causal_attention` implementations by timing them.

The ``cuda`` backend wraps the Triton flash kernel (``ops/kernels/attention.py``) and torch's SDPA in
a `FastestAttention`. On the first call with a new key ``(B, H, S, Dqk, Dv, dtype, packed)`` it times
every candidate on fresh random inputs of that shape and layout, forward plus backward (training is
what it is for), keeps the fastest and records the decision in `FastestAttention.decisions`
(readable for reports: `FastestAttention.report`). Later calls with that key are one dict lookup.

Calls that cannot be timed (inside ``torch.compile`` tracing, during CUDA graph capture) use the
shape's recorded choice if there is one, else ``untimed`` (default: the first candidate) for dense
calls and the first varlen candidate for packed ones, and record nothing. Packed sequences (``cu_seqlens``) are
timed only among the candidates that handle them without an ``S x S`` mask (``varlen`` names them).
A candidate that raises while being timed is recorded with its error and skipped.

Under ``torch.compile`` the choice is made while tracing (dynamo traces `choose`: the decision
lookup is a dict read, guarded) and the chosen candidate is traced into the graph. Every candidate
of the ``cuda`` backend traces with ``fullgraph=True``: SDPA, and the Triton flash kernel as its
``torch.library`` custom ops (``ops/kernels/attention.py``). A shape timed eagerly before the
compile (an eager step, or a `choose` call) keeps its timed choice in the compiled graph.
"""

from __future__ import annotations

import statistics
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

ShapeKey = tuple[int, int, int, int, int, str, bool]
Timer = Callable[[Callable[..., Any], torch.Tensor, torch.Tensor, torch.Tensor, float | None,
                  torch.Tensor | None], float]


def _like(t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random values with ``t``'s shape, dtype, device and strides (a (B,H,S,D) view of (B,S,H,D) stays one)."""
    try:
        out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
    except RuntimeError:
        out = torch.empty(t.size(), dtype=t.dtype, device=t.device)
    return out.normal_(generator=generator).requires_grad_(True)


def cuda_time_fwd_bwd(fn: Callable[..., Any], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: float | None, cu_seqlens: torch.Tensor | None, warmup: int = 2, reps: int = 5) -> float:
    """Median milliseconds of ``fn``'s forward + backward on random inputs shaped like ``q, k, v`` (CUDA events)."""
    # a private generator: timing must not move the global RNG (a training run stays reproducible)
    gen = torch.Generator(device=q.device).manual_seed(0)
    q, k, v = _like(q, gen), _like(k, gen), _like(v, gen)
    kwargs = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}

    def step() -> None:
        with torch.enable_grad():  # the model may be called under no_grad: time what training runs
            out = fn(q, k, v, scale, **kwargs)
            torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    for _ in range(warmup):  # compiles Triton kernels / picks SDPA's backend
        step()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(statistics.median(times))


def pick_fastest(candidates: Mapping[str, Callable[..., Any]], time_one: Callable[[Callable[..., Any]], float],
                 default: str) -> dict[str, Any]:
    """Time every candidate (``time_one(fn) -> ms``) and return the decision ``{"choice", "ms", "errors"}``:
    the fastest, or ``default`` if none could run. A candidate that raises is recorded with its error and
    skipped (one without this shape or dtype is not fatal)."""
    times: dict[str, float] = {}
    errors: dict[str, str] = {}
    for name, fn in candidates.items():
        try:
            times[name] = float(time_one(fn))
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    choice = min(times, key=times.__getitem__) if times else default
    return {"choice": choice, "ms": times, "errors": errors}


def _untimeable() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class FastestAttention:
    """A `causal_attention` that dispatches each shape to the fastest of ``candidates`` (see the module doc).

    ``candidates``: ``{name: implementation}`` with the op's signature, the default first.
    ``varlen``: the names that take ``cu_seqlens`` efficiently (default: the first candidate only).
    ``timer``: ``timer(fn, q, k, v, scale, cu_seqlens) -> milliseconds`` (default: CUDA events,
    forward + backward); tests inject timings through it.
    ``untimed``: the candidate for a dense call that cannot be timed (default: the first).
    """

    def __init__(self, candidates: Mapping[str, Callable[..., Any]], *, varlen: Iterable[str] | None = None,
                 timer: Timer | None = None, untimed: str | None = None):
        if not candidates:
            raise ValueError("FastestAttention needs at least one candidate")
        self.candidates = dict(candidates)
        self.default = next(iter(self.candidates))
        self.varlen = set(varlen) if varlen is not None else {self.default}
        self.untimed = untimed or self.default
        if self.untimed not in self.candidates:
            raise ValueError(f"untimed candidate {self.untimed!r} is not one of {list(self.candidates)}")
        self.timer: Timer = timer or cuda_time_fwd_bwd
        self.decisions: dict[ShapeKey, dict[str, Any]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(q: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None) -> ShapeKey:
        b, h, s, dqk = q.shape
        return (b, h, s, dqk, v.shape[-1], str(q.dtype).removeprefix("torch."), cu_seqlens is not None)

    def choose(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
               cu_seqlens: torch.Tensor | None = None) -> str:
        """The candidate for this call's key: timed and recorded on first use."""
        key = self.key(q, v, cu_seqlens)
        decision = self.decisions.get(key)
        if decision is not None:
            return decision["choice"]
        if _untimeable() or q.numel() == 0 or v.numel() == 0:
            if cu_seqlens is None:
                return self.untimed
            return next(n for n in self.candidates if n in self.varlen)
        with self._lock:
            if key in self.decisions:
                return self.decisions[key]["choice"]
            names = [n for n in self.candidates if cu_seqlens is None or n in self.varlen]
            if len(names) == 1:
                self.decisions[key] = {"choice": names[0], "ms": {}, "errors": {}}
            else:
                self.decisions[key] = pick_fastest(
                    {n: self.candidates[n] for n in names},
                    lambda fn: self.timer(fn, q, k, v, scale, cu_seqlens), self.default)
            return self.decisions[key]["choice"]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                 cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        name = self.choose(q, k, v, scale, cu_seqlens)
        if cu_seqlens is None:
            return self.candidates[name](q, k, v, scale)
        return self.candidates[name](q, k, v, scale, cu_seqlens=cu_seqlens)

    def preset(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Take decisions in `report`'s row format without timing (rows naming an unknown candidate are skipped)."""
        for r in rows:
            if r.get("choice") in self.candidates:
                key = (int(r["B"]), int(r["H"]), int(r["S"]), int(r["Dqk"]), int(r["Dv"]), str(r["dtype"]),
                       bool(r["cu_seqlens"]))
                self.decisions[key] = {"choice": r["choice"], "ms": dict(r.get("fwd_bwd_ms", {})),
                                       "errors": dict(r.get("errors", {}))}

    def report(self) -> list[dict[str, Any]]:
        """The decisions so far, JSON-ready: one row per key, with every candidate's forward+backward ms."""
        rows = []
        for (b, h, s, dqk, dv, dtype, packed), d in sorted(self.decisions.items()):
            rows.append({"B": b, "H": h, "S": s, "Dqk": dqk, "Dv": dv, "dtype": dtype, "cu_seqlens": packed,
                         "choice": d["choice"], "fwd_bwd_ms": dict(d["ms"]), "errors": dict(d["errors"])})
        return rows
