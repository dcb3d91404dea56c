"""Launch parameters of the memory-bound kernels (norms, SwiGLU gate, router backward, rope): one table.

No ``triton.autotune`` in the training path: a kernel's reduction order depends on its launch
parameters (rows per program, the number of weight-gradient partials), and a timing-based choice
could differ between runs, so results would stop being bitwise reproducible. Instead every launch
takes its parameters from `config` ``(kernel, n)``, a fixed function of the shape:

1. ``TABLE[(kernel, n)]`` if present: the measured winners at the model's sizes. **This is the
   table to edit after a GPU sweep** (``benchmarks/ops/memops_sweep.py`` prints, per row, the
   line to paste here);
2. else `_rule` (below): a documented rule of thumb for any other size.

``n`` is the row length: the hidden size for the norms, ``d`` (half the input's last dim) for
``silu_and_mul``, the expert count for ``moe_route``. The parameters per kernel (all integers):

* ``rms_norm_fwd``, ``add_rms_norm_fwd``: ``ROWS`` (rows per program, a ``ROWS x BLOCK`` tile,
  ``BLOCK = next_pow2(n)``), ``num_warps``.
* ``rms_norm_bwd``, ``add_rms_norm_bwd``: ``ROWS`` (rows per loop iteration), ``num_warps``,
  ``per_sm`` (programs per SM, so the number of float32 weight-gradient partials is
  ``min(row blocks, per_sm * SMs)``), ``num_stages`` (Triton's software pipelining of the row loop).
* ``silu_and_mul_fwd``, ``silu_and_mul_bwd``: ``BLOCK`` (columns per program, a power of two,
  capped at ``next_pow2(d)``), ``ROWS`` (rows per program), ``num_warps``.
* ``moe_route_bwd``: ``ROWS`` (tokens per program), ``num_warps``.
* ``rope`` (forward and backward: the same kernel): ``ROWS`` (rows of ``n``, the head dim, per
  program, positions of one head), ``num_warps``, optionally ``HEADS`` (heads per program, which share
  the angles' loads; default 1).

`override` (a context manager) replaces the choice for one kernel; the sweep and the tests use it
to run every entry of `candidates`. Each copy of the kernel package (compiled for the GPU,
interpreted) has its own copy of this module, hence its own overrides.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import triton

Config = dict[str, int]

KERNELS = ("rms_norm_fwd", "rms_norm_bwd", "add_rms_norm_fwd", "add_rms_norm_bwd", "silu_and_mul_fwd",
           "silu_and_mul_bwd", "moe_route_bwd", "rope")

# (kernel, n) -> launch parameters: measured winners at the model's sizes (OpenSeek-Small hidden 1280,
# ffn 2560, 64 experts; DeepSeek-V3 hidden 7168, ffn 2048, 256 experts; the 4096). Empty
# after a GPU sweep; other sizes take `_rule`. An entry must give every parameter of its kernel.
# Entries below: the winners of `benchmarks/ops/memops_sweep.py` on one H100 (commit 937c5260,
# benchmarks/ops/results/h100_memops_sweep_937c5260.json) where they beat the rule; ms is the sweep's
# median (rule's ms in brackets).
TABLE: dict[tuple[str, int], Config] = {
    # hidden 1280 and the 512-wide key-value latent (OpenSeek-Small's step), timed inside a CUDA graph
    # (benchmarks/ops/norm_bwd_sweep.py, H100, 8192 rows; in parentheses the rule's launch)
    ("rms_norm_bwd", 1280): dict(ROWS=1, num_warps=8, per_sm=4, num_stages=1),  # 0.036 (0.053)
    ("add_rms_norm_bwd", 1280): dict(ROWS=1, num_warps=8, per_sm=4, num_stages=1),  # 0.046 (0.065)
    ("rms_norm_bwd", 512): dict(ROWS=4, num_warps=16, per_sm=2, num_stages=1),  # 0.014 (0.023)
    ("rms_norm_bwd", 7168): dict(ROWS=1, num_warps=32, per_sm=1, num_stages=1),  # 0.286 (0.292)
    ("rms_norm_bwd", 4096): dict(ROWS=2, num_warps=32, per_sm=2, num_stages=1),  # 0.176 (0.244)
    ("add_rms_norm_bwd", 7168): dict(ROWS=1, num_warps=32, per_sm=1, num_stages=1),  # 0.367 (0.372)
    ("add_rms_norm_bwd", 4096): dict(ROWS=2, num_warps=32, per_sm=2, num_stages=1),  # 0.220 (0.265)
    ("silu_and_mul_fwd", 2560): dict(BLOCK=512, ROWS=4, num_warps=4),  # 0.090 (0.091)
    # second sweep (commit 64f474e4, h100_memops_sweep_64f474e4.json), the rows the first one cut short
    ("rms_norm_fwd", 1280): dict(ROWS=2, num_warps=4),  # 0.034 (0.051)
    ("silu_and_mul_bwd", 2048): dict(BLOCK=4096, ROWS=1, num_warps=8),  # 0.114 (0.153)
    # graph-timed sweep (device time, commit c350f66d, H100, results/h100_s17/sweep_graph_c350f66d.json): ms (rule's)
    # (the router: the third sweep, 2c202acc, results/h100_s17/sweep_router_graph_2c202acc.json, its kernel's
    # one-pick-at-a-time variant, the only one kept)
    ("moe_route_bwd", 64): dict(ROWS=4, num_warps=1),  # 0.009 (0.0212; torch.compile 0.012)
    ("rope", 64): dict(ROWS=32, num_warps=4, HEADS=2),  # half 0.0146 / 0.0146, interleaved 0.0147 / 0.0148 (fwd / bwd)
    ("moe_route_bwd", 256): dict(ROWS=1, num_warps=1),  # 0.020 (torch.compile 0.024)
}


def _pow2_divisor(n: int) -> int:
    return n & -n if n > 0 else 1


def _rule(kernel: str, n: int) -> Config:
    """The rule for sizes without a `TABLE` entry (fixed: a function of ``n`` alone)."""
    block = triton.next_power_of_2(max(n, 1))
    if kernel in ("rms_norm_fwd", "add_rms_norm_fwd"):
        # A row of <= 2048 elements is too little work for one program (hidden 1280 reached 47% of
        # copy bandwidth with one row per program): ~8192 elements per program. Long rows: one per
        # program, ~16 elements per thread (the previous launch, at 94-99% of copy).
        if block >= 4096:
            return dict(ROWS=1, num_warps=max(1, min(16, block // 512)))
        rows = max(1, min(16, 8192 // block))
        return dict(ROWS=rows, num_warps=max(1, min(8, rows * block // 1024)))
    if kernel in ("rms_norm_bwd", "add_rms_norm_bwd"):
        # 4-8 elements per thread per tensor (16 before). Compiled for sm_90 (Triton 3.9,
        # benchmarks/ops/memops_sm90_resources.py), the old 8-warp launch at 4096 took 127-145
        # registers a thread (16 warps resident per SM) and the 16-warp one at 7168 127-128 (16 warps,
        # add_rms_norm spilling 16 bytes); 32 warps take 32 (4096: 64 warps resident) and 62 (7168: 32).
        # Short rows are taken several per iteration, so a program has more than one row in flight.
        rows = 1 if block >= 4096 else max(1, min(8, 4096 // block))
        return dict(ROWS=rows, num_warps=max(4, min(32, rows * block // 128)), per_sm=2, num_stages=1)
    if kernel in ("silu_and_mul_fwd", "silu_and_mul_bwd"):
        # Column blocks that divide d (d = 2560 gave a second 2048-wide block 3/4 masked), at least
        # 256 wide; ~2048 elements of each half per program; 8 warps (16-byte bf16 vectors).
        cols = _pow2_divisor(n)
        cols = min(cols, 2048) if cols >= 256 else min(block, 2048)
        return dict(BLOCK=cols, ROWS=max(1, 2048 // cols), num_warps=8)
    if kernel == "moe_route_bwd":
        # A token's row is tiny (64-256 float32): several tokens per program.
        rows = max(1, min(8, 256 // block))
        return dict(ROWS=rows, num_warps=max(1, min(4, rows * block // 128)))
    if kernel == "rope":
        # ~4096 elements of x per program (a head dim of 64: 64 rows), 4 warps
        return dict(ROWS=max(1, min(64, 4096 // block)), num_warps=4)
    raise KeyError(f"no launch rule for kernel {kernel!r}")


def previous(kernel: str, n: int) -> Config:
    """The launch each kernel had before this module (for the sweep's comparison)."""
    block = triton.next_power_of_2(max(n, 1))
    if kernel in ("rms_norm_fwd", "add_rms_norm_fwd"):
        return dict(ROWS=1, num_warps=max(1, min(16, block // 512)))
    if kernel in ("rms_norm_bwd", "add_rms_norm_bwd"):
        return dict(ROWS=1, num_warps=max(1, min(16, block // 512)), per_sm=4, num_stages=3)
    if kernel in ("silu_and_mul_fwd", "silu_and_mul_bwd"):
        cols = min(block, 2048)
        return dict(BLOCK=cols, ROWS=1, num_warps=max(1, min(16, cols * 4 // 512)))
    if kernel == "moe_route_bwd":  # the launch only: that kernel's algorithm is gone (see kernels/moe.py)
        return dict(ROWS=1, num_warps=1 if n <= 64 else 4)
    if kernel == "rope":
        return _rule(kernel, n)
    raise KeyError(f"no launch rule for kernel {kernel!r}")


# Alternatives the sweep times (and the tests check against the float64 reference), besides the
# previous launch and the rule's choice.
_ALTERNATIVES: dict[str, list[Config]] = {
    "rms_norm_fwd": [dict(ROWS=r, num_warps=w) for r, w in
                     ((1, 8), (2, 4), (2, 8), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16))],
    "rms_norm_bwd": [dict(ROWS=r, num_warps=w, per_sm=p, num_stages=s) for r, w, p, s in
                     ((1, 32, 2, 1), (1, 32, 1, 1), (1, 32, 4, 1), (1, 32, 2, 3), (1, 16, 4, 1), (1, 16, 2, 1),
                      (1, 16, 8, 1), (1, 8, 4, 1), (2, 32, 2, 1), (2, 16, 2, 1), (4, 32, 2, 1),
                      # narrow rows (hidden 1280): more rows in flight per SM, fewer threads per row
                      (1, 8, 8, 1), (1, 4, 8, 1), (2, 8, 4, 1), (2, 8, 8, 1), (2, 16, 4, 1), (4, 16, 2, 1),
                      (4, 16, 4, 1), (1, 8, 4, 2), (2, 8, 4, 2), (2, 16, 2, 2))],
    "silu_and_mul_fwd": [dict(BLOCK=b, ROWS=r, num_warps=w) for b, r, w in
                         ((512, 4, 8), (512, 4, 4), (512, 8, 8), (1024, 2, 8), (1024, 1, 4), (2048, 1, 8),
                          (2048, 1, 4), (256, 8, 8))],
    "silu_and_mul_bwd": [dict(BLOCK=b, ROWS=r, num_warps=w) for b, r, w in
                         ((512, 4, 8), (512, 4, 4), (1024, 2, 8), (1024, 1, 4), (2048, 1, 8), (2048, 1, 4),
                          (2048, 2, 8), (4096, 1, 8))],
    "moe_route_bwd": [dict(ROWS=r, num_warps=w) for r, w in
                      ((1, 1), (1, 2), (2, 2), (4, 1), (4, 2), (4, 4), (8, 4), (8, 8), (16, 4))],
    "rope": [dict(ROWS=r, num_warps=w) for r, w in
             ((16, 2), (32, 2), (32, 4), (64, 2), (64, 8), (128, 4), (128, 8), (256, 8), (256, 16))]
            # several heads a program: the positions' angles read once for all of them (kernels/rope.py)
            + [dict(ROWS=r, num_warps=w, HEADS=h) for r, w, h in ((64, 4, 2), (32, 4, 2), (32, 4, 4), (64, 8, 4),
                                                                  (16, 4, 8), (32, 8, 8))],
}
_ALTERNATIVES["add_rms_norm_fwd"] = _ALTERNATIVES["rms_norm_fwd"]
_ALTERNATIVES["add_rms_norm_bwd"] = _ALTERNATIVES["rms_norm_bwd"]


def _spills(kernel: str, n: int, cfg: Config) -> bool:
    """Whether an alternative is too large to try at ``n``: more elements per thread than compiled
    without spilling for sm_90 (`benchmarks/ops/memops_sm90_resources.py`; norm backward: 16 a
    tensor for one row per iteration or rows up to 2048 wide, 8 for more; router backward: 16 of each
    of its two ``tokens x experts`` tiles; rope: 32 of x)."""
    block = triton.next_power_of_2(max(n, 1))
    threads = 32 * cfg["num_warps"]
    if kernel in ("rms_norm_bwd", "add_rms_norm_bwd"):
        # 2+ rows at 16 a thread spilled at 4096 and 7168, not at 2048 (hidden 1280: 105-125 registers)
        return cfg["ROWS"] * block > (16 if cfg["ROWS"] == 1 or block <= 2048 else 8) * threads
    if kernel == "moe_route_bwd":  # its rows' scores and gradients: two [ROWS, BLOCK_E] tiles
        return cfg["ROWS"] * block > 16 * threads
    if kernel == "rope":  # 64 elements a thread spilled; so did 256 rows at 16 warps (head dim 64)
        return cfg["ROWS"] * block > 32 * threads or cfg["ROWS"] > 128
    return False


def candidates(kernel: str, n: int) -> list[Config]:
    """The configs a sweep times for ``kernel`` at row length ``n``: the current choice first, then
    the previous launch, then the alternatives that do not spill at ``n`` (duplicates dropped)."""
    out: list[Config] = []
    alternatives = [c for c in _ALTERNATIVES[kernel] if not _spills(kernel, n, c)]
    for cfg in (config(kernel, n), previous(kernel, n), *alternatives):
        if cfg not in out:
            out.append(dict(cfg))
    return out


_OVERRIDE: dict[str, Config] = {}


def config(kernel: str, n: int) -> Config:
    """The launch parameters of ``kernel`` for row length ``n`` (an override, the table, or the rule)."""
    if kernel in _OVERRIDE:
        return dict(_OVERRIDE[kernel])
    found = TABLE.get((kernel, n))
    return dict(found) if found is not None else _rule(kernel, n)


@contextlib.contextmanager
def override(kernel: str, cfg: Config) -> Iterator[None]:
    """Launch ``kernel`` with ``cfg`` inside the block, whatever the shape (for sweeps and tests)."""
    if kernel not in KERNELS:
        raise KeyError(f"unknown kernel {kernel!r}; one of {KERNELS}")
    old = _OVERRIDE.get(kernel)
    _OVERRIDE[kernel] = dict(cfg)
    try:
        yield
    finally:
        if old is None:
            del _OVERRIDE[kernel]
        else:
            _OVERRIDE[kernel] = old
