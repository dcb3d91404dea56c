"""Load the Triton kernel package compiled for the GPU, or a second copy of it run by Triton's interpreter.

Triton decides at decoration time (``@triton.jit`` reads ``TRITON_INTERPRET``) whether a kernel is
compiled or interpreted. So the ``triton-interpret`` backend cannot just flip the variable at call
time, and setting it for the whole process would turn the ``cuda`` backend's kernels into CPU
interpreted ones. Instead:

* ``load_kernels(interpret=False)`` imports ``openseek_hal.ops.kernels`` normally;
* ``load_kernels(interpret=True)`` executes the same source files a second time as the package
  ``openseek_hal.ops._kernels_interpreted``, with ``TRITON_INTERPRET=1`` set only while those
  modules are executed, so every ``@triton.jit`` in that copy is an interpreted function.
  Triton's own library functions (``tl.sum``, ``tl.max``, ...) are ``@triton.jit`` functions too,
  decorated once when triton was first imported (compiled mode, usually). So each launch of an
  interpreted kernel swaps in interpreted twins of them for its duration, under a lock (the
  interpreter runs synchronously in the caller's thread); compiled kernels are unaffected.

Both copies can live in one process: the ``cuda`` and ``triton-interpret`` backends can run side by
side (e.g. to compare a kernel on the GPU with its interpreted run on the CPU). When the whole
process runs with ``TRITON_INTERPRET=1`` (CI), the normal import is interpreted too and is reused;
the ``cuda`` backend then runs interpreted kernels (correct, slow), so leave it unset on a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

_COMPILED = "openseek_hal.ops.kernels"
_INTERPRETED = "openseek_hal.ops._kernels_interpreted"


def interpreter_enabled() -> bool:
    """Whether ``@triton.jit`` would build interpreted kernels right now (``TRITON_INTERPRET``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


@contextlib.contextmanager
def _interpret_env():
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


_stdlib_lock = threading.RLock()


@functools.cache
def _stdlib_twins() -> tuple[tuple[ModuleType, str, Any, Any], ...]:
    """``(module, name, compiled function, interpreted twin)`` for Triton's ``@jit`` library functions."""
    import triton.language as tl
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    # Modules that copy these functions when first imported must see the compiled ones: import
    # them now, before any swap (the interpreter's launch path imports gluon lazily).
    with contextlib.suppress(ImportError):
        importlib.import_module("triton.experimental.gluon")
    return tuple((module, name, value, InterpretedFunction(value.fn))
                 for module in (tl, standard) for name, value in vars(module).items()
                 if isinstance(value, JITFunction))


def _language_namespaces() -> tuple[Any, ...]:
    """The modules and classes of ``triton.language`` whose attributes the interpreter patches."""
    import triton.language as tl
    import triton.language.core as core
    import triton.language.standard as standard

    names = (tl, core, standard, tl.math, core.tensor, core.dtype, getattr(core, "condition", None),
             getattr(core, "tensor_descriptor_base", None))
    return tuple(n for n in names if n is not None)


def _snapshot(namespaces: tuple[Any, ...]) -> list[tuple[Any, dict[str, Any]]]:
    return [(ns, dict(vars(ns))) for ns in namespaces]


def _restore(snapshot: list[tuple[Any, dict[str, Any]]]) -> None:
    """Put back every attribute that changed since `_snapshot`. Added names stay: the interpreter adds
    its own (``interpreter_semantic``) to the globals of the library functions it rewrites, and its
    cached rewrites need them."""
    for ns, before in snapshot:
        for name, value in list(vars(ns).items()):
            if name in before and before[name] is not value:
                setattr(ns, name, before[name])


@contextlib.contextmanager
def _interpreted_stdlib():
    with _stdlib_lock:
        twins = _stdlib_twins()
        # Triton 3.9's interpreter patches triton.language for a launch and restores it, but a @jit
        # function called from inside a kernel patches it again (``tl.core``'s builtins among others)
        # and never restores that: a kernel compiled for the GPU later in the process then builds
        # with interpreter semantics and fails ("'block_argument' object has no attribute 'dtype'").
        saved = _snapshot(_language_namespaces())
        for module, name, _, twin in twins:
            setattr(module, name, twin)
        try:
            yield
        finally:
            for module, name, original, _ in twins:
                setattr(module, name, original)
            _restore(saved)


class _InterpretedKernel:
    """An interpreted ``@triton.jit`` function whose launches (``kernel[grid](...)``) run with
    `_interpreted_stdlib`; a call from inside another kernel goes straight to the function."""

    def __init__(self, fn: Any):
        self.fn = fn

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        launch = self.fn[grid]

        def run(*args: Any, **kwargs: Any) -> Any:
            # NaN/Inf arithmetic is silent on a GPU; numpy (the interpreter) would warn on every launch
            with _interpreted_stdlib(), np.errstate(all="ignore"):
                return launch(*args, **kwargs)

        return run

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def _wrap_kernels(package: ModuleType) -> None:
    from triton.runtime.interpreter import InterpretedFunction

    for name, module in list(sys.modules.items()):
        if name.startswith(package.__name__ + "."):
            for attr, value in list(vars(module).items()):
                if isinstance(value, InterpretedFunction):
                    setattr(module, attr, _InterpretedKernel(value))


def _load_interpreted_copy() -> ModuleType:
    package_dir = Path(__file__).with_name("kernels")
    spec = importlib.util.spec_from_file_location(_INTERPRETED, package_dir / "__init__.py",
                                                  submodule_search_locations=[str(package_dir)])
    module = importlib.util.module_from_spec(spec)
    # Triton itself (and gluon, which checks its library functions at import) must be imported in
    # compiled mode before the copy's context: a process whose first Triton import happened inside
    # it would get an interpreted standard library, and a later gluon import fails an assertion.
    _stdlib_twins()
    sys.modules[_INTERPRETED] = module
    try:
        with _interpret_env():
            spec.loader.exec_module(module)  # its submodules import, and decorate, inside the context
        _wrap_kernels(module)
    except BaseException:
        for name in [n for n in sys.modules if n == _INTERPRETED or n.startswith(_INTERPRETED + ".")]:
            del sys.modules[name]
        raise
    return module


def load_kernels(interpret: bool) -> ModuleType:
    """The kernel package: compiled for the GPU, or (``interpret=True``) run by Triton's interpreter."""
    if not interpret:
        return importlib.import_module(_COMPILED)
    if _INTERPRETED in sys.modules:
        return sys.modules[_INTERPRETED]
    if interpreter_enabled() and _COMPILED not in sys.modules:
        return importlib.import_module(_COMPILED)  # decorated now, under the process-wide setting
    return _load_interpreted_copy()


def kernel_table(interpret: bool) -> Mapping[str, Callable]:
    """``{op name: Triton implementation}`` from `load_kernels`."""
    return load_kernels(interpret).KERNELS
