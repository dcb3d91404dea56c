"""Helpers shared by the Triton kernel launchers: accumulation type, block sizes, grid sizes."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


def acc_type(dtype: torch.dtype):
    """The Triton type kernels accumulate in: float64 for float64 inputs, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` viewed as ``(rows, last_dim)`` with a unit stride on the last dim (copies only if it must)."""
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    return x2 if x2.stride(-1) == 1 or x2.shape[-1] <= 1 else x2.contiguous()


def block_for(n: int, cap: int = 65536) -> int:
    block = triton.next_power_of_2(max(n, 1))
    if block > cap:
        raise ValueError(f"a row of {n} elements is longer than this kernel's limit of {cap}")
    return block


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter runs programs one after another: few, longer programs cost the same


def persistent_programs(device: torch.device, rows: int, per_sm: int = 4) -> int:
    """A grid size for kernels that loop over rows and write one partial result per program."""
    return max(1, min(rows, per_sm * _sm_count(device)))


def round_to_float32(x: float) -> float:
    """``x`` rounded to the nearest float32 (ties to even), in plain float arithmetic: under
    ``torch.compile`` this folds to a constant, where ``float(torch.tensor(x, dtype=float32))`` would be
    a ``Tensor.item()`` graph break (whose resumed frame then passed the launch's ints on as symbols,
    which Triton's ``num_warps`` refuses). Finite ``x`` within float32's range."""
    if x == 0 or not math.isfinite(x):
        return x
    mantissa, exponent = math.frexp(x)  # x = mantissa * 2**exponent, 0.5 <= |mantissa| < 1
    # 24 significant bits for normal float32 numbers (exponent >= -125), fewer below (subnormals)
    bits = 24 - max(0, -125 - exponent)
    return math.ldexp(round(math.ldexp(mantissa, bits)), exponent - bits)  # round(): ties to even, exact here


def split_float(x: float) -> tuple[float, float]:
    """``x`` as two float32 numbers whose sum is ``x`` to ~48 bits: a kernel's float scalar argument is
    float32, and a float64 kernel that needs the constant exactly adds the two halves in float64."""
    hi = round_to_float32(x)
    return hi, round_to_float32(x - hi)
