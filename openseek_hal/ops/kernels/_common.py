"""Helpers shared by the Triton kernel launchers: accumulation type, block sizes, grid sizes."""

from __future__ import annotations

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


def split_float(x: float) -> tuple[float, float]:
    """``x`` as two float32 numbers whose sum is ``x`` to ~48 bits: a kernel's float scalar argument is
    float32, and a float64 kernel that needs the constant exactly adds the two halves in float64."""
    hi = float(torch.tensor(x, dtype=torch.float32))
    return hi, float(torch.tensor(x - hi, dtype=torch.float32))
