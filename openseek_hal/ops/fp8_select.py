"""Pick, once per shape, the faster of several block-scaled FP8 GEMMs by timing them.

`fp8_gemm`'s contract (``C = dequant(A) @ dequant(B)^T``, A per 1x128 tile, B per 128x128 block or per
1x128 tile, `openseek_hal.ops.fp8`) has two implementations on NVIDIA Hopper: our Triton kernel
(``ops/kernels/fp8.py``, portable to every Triton chip) and cuBLAS's block-scaled FP8 GEMM, reached
through ``torch._scaled_mm`` with 1x128 / 128x128 scales (CUDA 12.9+, compute capability 9.0).
`cublas_fp8_gemm` adapts the operands (A's scales outer-dimension-major, B passed transposed, which
is the column-major layout cuBLAS wants, without a copy) and refuses shapes cuBLAS does not take.

`FastestFP8Gemm` dispatches each key ``(M, N, K, B's tile, output dtype)`` to the candidate that ran
fastest on the first call with that key (timed on that call's own operands: a GEMM has no side
effects), among those that first pass `exact_check` at that shape (operands whose product is exact in
any summation order, so a library that reads a scale from the wrong place is caught rather than timed:
the one way this contract has gone wrong, see `cublas_fp8_gemm`). It records the decision with every
candidate's time (`FastestFP8Gemm.report`); a candidate that raises or fails the check is recorded with
its error and skipped. A call that cannot be timed (inside ``torch.compile`` tracing, during CUDA graph
capture) uses the key's recorded choice, else the first candidate. Training calls each GEMM shape
thousands of times with the same key, so the check and the timing are paid once per shape, in the
first step.
"""

from __future__ import annotations

import statistics
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .attention_select import _untimeable, pick_fastest
from .fp8 import TILE, _cdiv, b_tile, out_dtype_of

GemmKey = tuple[int, int, int, str, str]
GemmTimer = Callable[[Callable[..., torch.Tensor], tuple[Any, ...]], float]


def cublas_fp8_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
                    out_dtype: str | torch.dtype = "bfloat16") -> torch.Tensor:
    """`fp8_gemm`'s contract through cuBLAS's block-scaled FP8 GEMM (``torch._scaled_mm``).

    The scales go in the layouts cuBLAS reads: 1x128 scales ``[rows, K/128]`` with unit stride along the
    rows; 128x128 scales with unit stride along K and a leading dimension of ``round_up(K/128, 4)``, whatever
    the strides say. ``torch._scaled_mm`` checks only the shape ``[K/128, N/128]`` and refuses that padding,
    so it gets them when K/128 is a multiple of 4 (padded and unpadded coincide), and
    ``torch.nn.functional.scaled_mm`` (which takes ``[round_up(K/128, 4), N/128]`` explicitly) otherwise.
    Raises ValueError for what this path does not take (K, or N of a 128x128-scaled B, not a multiple of
    128; N not a multiple of 16; empty operands): the per-shape choice then keeps the Triton kernel."""
    if a_q.dim() != 2 or b_q.dim() != 2 or a_q.shape[1] != b_q.shape[1]:
        raise ValueError(f"fp8_gemm: a {tuple(a_q.shape)} and b {tuple(b_q.shape)} must be [M, K] and [N, K]")
    (m, k), n = a_q.shape, b_q.shape[0]
    tile = b_tile(b_q, b_scale)
    if min(m, n, k) == 0 or k % TILE or n % (TILE if tile == "128x128" else 16):
        raise ValueError(f"cuBLAS's block-scaled GEMM here needs K a multiple of 128 and N of "
                         f"{TILE if tile == '128x128' else 16} (got M={m} N={n} K={k}, B per {tile})")
    a_q = a_q if a_q.stride(1) == 1 else a_q.contiguous()
    b_q = b_q if b_q.stride(1) == 1 else b_q.contiguous()
    a_s = a_scale.float().t().contiguous().t()
    dtype = out_dtype_of(out_dtype)
    if tile == "1x128":
        b_s = b_scale.float().t().contiguous()  # [K/128, N]: B^T's 1x128 scales, unit stride along N
        return torch._scaled_mm(a_q, b_q.t(), scale_a=a_s, scale_b=b_s, out_dtype=dtype)
    kb = b_scale.shape[1]
    if kb % 4 == 0:  # the [K/128, N/128] view already has the leading dimension cuBLAS reads
        b_s = b_scale.float().contiguous().t()  # [K/128, N/128], strides (1, K/128), whatever b_scale's were
        return torch._scaled_mm(a_q, b_q.t(), scale_a=a_s, scale_b=b_s, out_dtype=dtype)
    # torch._scaled_mm refuses the padded layout; its successor takes it explicitly
    if not hasattr(F, "scaled_mm"):
        raise ValueError(f"K/128 = {kb} is not a multiple of 4 and this torch has no torch.nn.functional.scaled_mm")
    padded = torch.zeros(b_scale.shape[0], _cdiv(kb, 4) * 4, dtype=torch.float32, device=b_scale.device)
    padded[:, :kb] = b_scale
    st = F.ScalingType
    return F.scaled_mm(a_q, b_q.t(), a_s, st.BlockWise1x128, padded.t(), st.BlockWise128x128, output_dtype=dtype)


def cuda_time_gemm(fn: Callable[..., torch.Tensor], args: tuple[Any, ...], warmup: int = 2, reps: int = 5) -> float:
    """Median milliseconds of ``fn(*args)`` (CUDA events, after ``warmup`` calls that compile/plan)."""
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(statistics.median(times))


E4M3_ONE = 0x38  # the float8_e4m3fn byte of 1.0


class WrongResult(RuntimeError):
    """A candidate GEMM failed the exact check (`exact_check`)."""


def exact_check(fn: Callable[..., torch.Tensor], m: int, n: int, k: int, tile: str, out_dtype: str | torch.dtype,
                device: torch.device | str) -> None:
    """Run ``fn`` at shape ``(M, N, K)`` with B scaled per ``tile`` on operands whose product is known exactly;
    raise `WrongResult` if any output element differs from it.

    Row ``r`` of A is 1.0 on K block ``r % ceil(K/128)`` and 0 elsewhere, B is all 1.0, and every scale is a
    power of two drawn from 2^-4..2^4 (fixed seed). So ``C[r, c]`` is one block's element count times one A
    scale times one B scale: exact in float32, bfloat16 and float16, whatever the summation order or the
    accumulator's precision, and a scale read from another tile (a layout the library reads otherwise than
    documented) changes it by a factor of 2^d with probability 8/9 per element. Costs one GEMM of the shape."""
    dtype = out_dtype_of(out_dtype)
    kb, rows_b = _cdiv(k, TILE), (n if tile == "1x128" else _cdiv(n, TILE))
    gen = torch.Generator().manual_seed(20261206)
    a_exp = torch.randint(-4, 5, (m, kb), generator=gen)
    b_exp = torch.randint(-4, 5, (rows_b, kb), generator=gen)
    blk = torch.arange(m, device=device) % kb
    a_q = ((torch.arange(k, device=device) // TILE)[None, :] == blk[:, None]).to(torch.uint8) * E4M3_ONE
    a_q = a_q.view(torch.float8_e4m3fn)
    b_q = torch.full((n, k), E4M3_ONE, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn)
    a_s, b_s = torch.exp2(a_exp.float()).to(device), torch.exp2(b_exp.float()).to(device)
    count = (k - torch.arange(kb, device=device) * TILE).clamp(max=TILE).float()
    b_rows = b_s if tile == "1x128" else b_s.repeat_interleave(TILE, 0)[:n]  # [N, K/128]
    a_sel = a_s.gather(1, blk[:, None])[:, 0] * count[blk]  # [M]
    expected = a_sel[:, None] * b_rows.t()[blk]  # [M, N], powers of two times counts <= 128: exact
    got = fn(a_q, a_s, b_q, b_s, dtype).float()
    bad = got != expected
    if bad.any():
        r, c = (int(i) for i in bad.nonzero()[0])
        raise WrongResult(f"exact check failed at {int(bad.sum())} of {bad.numel()} elements "
                          f"(C[{r}, {c}] = {got[r, c].item()}, expected {expected[r, c].item()})")


class FastestFP8Gemm:
    """An `fp8_gemm` that dispatches each shape to the fastest of ``candidates`` (see the module doc).

    ``candidates``: ``{name: implementation}`` with `fp8_gemm`'s signature, the default first.
    ``timer``: ``timer(fn, args) -> milliseconds`` (default: CUDA events); tests inject timings through it.
    ``check``: run on every candidate but the default before it is timed, ``check(fn, M, N, K, tile,
    out_dtype, device)``, raising if the candidate computes something else (default: `exact_check`).
    """

    def __init__(self, candidates: Mapping[str, Callable[..., torch.Tensor]], *, timer: GemmTimer | None = None,
                 check: Callable[..., None] | None = exact_check):
        if not candidates:
            raise ValueError("FastestFP8Gemm needs at least one candidate")
        self.candidates = dict(candidates)
        self.default = next(iter(self.candidates))
        self.timer: GemmTimer = timer or cuda_time_gemm
        self.check = check
        self.decisions: dict[GemmKey, dict[str, Any]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(a_q: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor, out_dtype: str | torch.dtype) -> GemmKey:
        return (a_q.shape[0], b_q.shape[0], a_q.shape[1], b_tile(b_q, b_scale),
                str(out_dtype_of(out_dtype)).removeprefix("torch."))

    def choose(self, a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
               out_dtype: str | torch.dtype = "bfloat16") -> str:
        """The candidate for this call's key: timed on these operands and recorded on first use."""
        key = self.key(a_q, b_q, b_scale, out_dtype)
        decision = self.decisions.get(key)
        if decision is not None:
            return decision["choice"]
        if len(self.candidates) == 1 or _untimeable() or a_q.numel() == 0 or b_q.numel() == 0:
            return self.default
        with self._lock:
            if key not in self.decisions:
                args = (a_q, a_scale, b_q, b_scale, out_dtype)

                def time_one(fn: Callable[..., torch.Tensor]) -> float:
                    if self.check is not None and fn is not self.candidates[self.default]:
                        self.check(fn, key[0], key[1], key[2], key[3], out_dtype, a_q.device)
                    return self.timer(fn, args)

                self.decisions[key] = pick_fastest(self.candidates, time_one, self.default)
            return self.decisions[key]["choice"]

    def __call__(self, a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
                 out_dtype: str | torch.dtype = "bfloat16") -> torch.Tensor:
        name = self.choose(a_q, a_scale, b_q, b_scale, out_dtype)
        return self.candidates[name](a_q, a_scale, b_q, b_scale, out_dtype)

    def preset(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Take decisions in `report`'s row format without timing (rows naming an unknown candidate are skipped)."""
        for r in rows:
            if r.get("choice") in self.candidates:
                key = (int(r["M"]), int(r["N"]), int(r["K"]), str(r["b_tile"]), str(r["out_dtype"]))
                self.decisions[key] = {"choice": r["choice"], "ms": dict(r.get("ms", {})),
                                       "errors": dict(r.get("errors", {}))}

    def report(self) -> list[dict[str, Any]]:
        """The decisions so far, JSON-ready: one row per key, with every candidate's milliseconds."""
        return [{"M": m, "N": n, "K": k, "b_tile": tile, "out_dtype": out, "choice": d["choice"],
                 "ms": dict(d["ms"]), "errors": dict(d["errors"])}
                for (m, n, k, tile, out), d in sorted(self.decisions.items())]
