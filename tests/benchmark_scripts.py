"""Load a script of ``benchmarks/`` as a module in a test, and skip what needs the NVIDIA toolchain."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str) -> ModuleType:
    """``benchmarks/<relative>`` (e.g. ``ops/memops_sweep.py``) imported under its file name."""
    path = ROOT / "benchmarks" / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def require_sm90_compiler(*tools: str) -> None:
    """Skip unless Triton can compile for sm_90 here: kernels not interpreted process-wide, and the given
    tools (``ptxas``, ``cuobjdump``) shipped with this Triton."""
    import triton

    from openseek_hal.ops.kernel_loader import interpreter_enabled

    if interpreter_enabled():
        pytest.skip("TRITON_INTERPRET is set for the whole process: there are no compiled kernels to build")
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not all((bin_dir / tool).exists() for tool in tools):
        pytest.skip("this Triton has no NVIDIA toolchain")
