"""The `Backend` half of the HAL contract, and how backends are found.

A backend is one subclass of `Backend` per chip. Its abstract methods are the whole contract:
``is_available`` (cheap; imports no vendor SDK), ``native_ops`` (its op table, by op name) and
``capabilities`` (dtypes, fp8, peak FLOP/s and memory bandwidth for MFU). Everything else, from op
resolution with fallback to the reference, to device handling and communicators, is shared.

Backends are discovered through the entry-point group ``openseek_hal.backends``; the in-tree ones
are registered there too, so a vendor's plugin package is found exactly as ours are. An entry
point names either a `Backend` subclass or a zero-argument function returning one (or None when
the plugin does not apply to this machine). A plugin that fails to load is recorded with its
error and never breaks discovery of the others.
"""

from __future__ import annotations

import os
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import import_module
from importlib.metadata import entry_points
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from . import ops as _ops
from .device import Device
from .errors import BackendUnavailableError, MissingOpError, UnknownBackendError

if TYPE_CHECKING:
    from .comm import Communicator

ENTRY_POINT_GROUP = "openseek_hal.backends"
ENV_BACKEND = "OPENSEEK_HAL_BACKEND"
ENV_STRICT = "OPENSEEK_HAL_STRICT"


class OpFallbackWarning(UserWarning):
    """A backend has no native implementation of an op; the reference runs instead."""


@dataclass(frozen=True, kw_only=True)
class Capabilities:
    """What a backend's device can do; ``peak_flops`` and ``memory_bandwidth`` feed MFU and %-of-peak."""

    device_name: str
    dtypes: tuple[torch.dtype, ...]
    fp8: bool = False
    peak_flops: Mapping[torch.dtype, float] = field(default_factory=dict)  # dense FLOP/s per dtype
    memory_bandwidth: float | None = None  # bytes/s
    compile: bool = False  # torch.compile traces this backend's ops and generates code for its device
    graphs: bool = False  # Device.graph() captures and replays this backend's work (CUDA graphs)


@dataclass(frozen=True)
class ExpectedFailure:
    """A check a backend declares it fails, with the reason (reported as xfail by conformance)."""

    op: str  # an op name, a collective name ("all_reduce") or "model"
    reason: str
    dtype: torch.dtype | None = None  # None: every dtype
    check: str | None = None  # one kind of check ("forward", "backward", "determinism", ...); None: all
    # samples whose label starts with this (variants such as ":noncontig" included); None: every sample
    sample: str | None = None


class Backend(ABC):
    """One chip's implementation of the HAL. Subclass it, fill in the three abstract methods."""

    name: ClassVar[str]
    device_type: ClassVar[str]  # a torch device type string: "cpu", "cuda", "xpu", "npu", ...
    priority: ClassVar[int] = 0  # the available backend with the highest priority is the default
    slow: ClassVar[bool] = False  # True: a test suite parametrized over every backend skips it unless asked
    dist_backend: ClassVar[str] = "gloo"  # torch.distributed backend for this chip's native collectives
    comm_adaptor: ClassVar[str] = "torch"  # the Communicator adaptor a job uses when none is named
    expected_failures: ClassVar[tuple[ExpectedFailure, ...]] = ()
    # dtypes this chip cannot run at all, with the reason; conformance reports their checks as xfail
    unsupported_dtypes: ClassVar[Mapping[torch.dtype, str]] = MappingProxyType({})

    @classmethod
    @abstractmethod
    def is_available(cls) -> tuple[bool, str]:
        """(True, "") when usable here, else (False, why). Must be cheap and must not raise."""

    @abstractmethod
    def native_ops(self) -> Mapping[str, Callable[..., Any]]:
        """This backend's own implementations, by op name. Ops not listed fall back to the reference."""

    @abstractmethod
    def capabilities(self) -> Capabilities:
        """Dtypes, fp8 support, peak FLOP/s and memory bandwidth of ``self.device``."""

    # -- shared machinery --------------------------------------------------------------------
    _warned: ClassVar[set[tuple[str, str]]] = set()
    _warn_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, device_index: int | None = None, *, strict: bool | None = None):
        self.device = Device(self.device_type, device_index)
        self.strict = os.environ.get(ENV_STRICT, "") in ("1", "true") if strict is None else strict
        self._native: Mapping[str, Callable[..., Any]] | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} on {self.device.torch_device}>"

    def _native_table(self) -> Mapping[str, Callable[..., Any]]:
        if self._native is None:
            self._native = dict(self.native_ops())
        return self._native

    def has_native(self, name: str) -> bool:
        return name in self._native_table()

    def op(self, name: str) -> Callable[..., Any]:
        """The callable implementing op ``name``: native if the backend has it, else the reference.

        Resolve once (at module construction) and keep the callable: dispatch is this dict lookup.
        A fallback warns once per (backend, op) per process; in strict mode it raises instead.
        """
        opdef = _ops.get(name)
        impl = self._native_table().get(name)
        if impl is not None:
            return impl
        if self.strict:
            raise MissingOpError(f"backend '{self.name}' has no native '{name}' (strict mode)")
        key = (self.name, name)
        with self._warn_lock:
            first = key not in self._warned
            self._warned.add(key)
        if first:
            warnings.warn(f"backend '{self.name}' has no native '{name}'; using the reference implementation",
                          OpFallbackWarning, stacklevel=2)
        return opdef.reference

    def communicator(self, adaptor: str | None = None, group: Any = None, **kwargs: Any) -> Communicator:
        """A `openseek_hal.comm.Communicator` on this backend's device (default: the backend's ``comm_adaptor``).

        Call it on every rank of an initialized job (torchrun, or `openseek_hal.comm.launch`).
        """
        from . import comm

        return comm.create(adaptor, self, group=group, **kwargs)

    def op_origins(self) -> dict[str, str]:
        """``{op: library}`` for each native op, for a backend that mixes libraries (``backends --ops``
        shows it); empty by default: every native op is the backend's own."""
        return {}

    def op_choices(self) -> dict[str, list[dict[str, Any]]]:
        """The per-shape choices made so far by native ops that time their candidates, by op name (JSON-ready).

        Such an op (e.g. `openseek_hal.ops.attention_select.FastestAttention`) has ``report()`` (its decisions
        as rows) and ``preset(rows)`` (take decisions without timing). The trainer saves these with each
        checkpoint and presets them on resume and on every rank, so a resumed run computes with the kernels of
        the run it continues (a second timing can come out the other way where two candidates are close)."""
        return {name: impl.report() for name, impl in self._native_table().items() if _timed_choice(impl)}

    def preset_op_choices(self, choices: Mapping[str, list[dict[str, Any]]]) -> None:
        """Take the decisions of `op_choices` (e.g. a checkpoint's) without timing; ops this backend does not
        time, and rows naming a candidate it does not have, are ignored (they are timed again when met)."""
        table = self._native_table()
        for name, rows in choices.items():
            impl = table.get(name)
            if _timed_choice(impl):
                impl.preset(rows)

    def coverage(self) -> dict[str, str]:
        """``{op name: "native" | "fallback"}`` over every registered op."""
        native = self._native_table()
        return {name: ("native" if name in native else "fallback") for name in _ops.names()}


def _timed_choice(impl: Any) -> bool:
    return callable(getattr(impl, "report", None)) and callable(getattr(impl, "preset", None))


# -- discovery --------------------------------------------------------------------------------

@dataclass(frozen=True)
class BackendInfo:
    name: str
    cls: type[Backend] | None
    available: bool
    reason: str  # why not available, or the plugin's load error


_registered: dict[str, type[Backend]] = {}
_discovered: tuple[dict[str, type[Backend]], dict[str, str]] | None = None


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Register a backend class directly (tests, notebooks). Packages use the entry-point group."""
    _check_backend_class(cls, cls.__dict__.get("name", cls.__name__))
    _registered[cls.name] = cls
    return cls


def unregister_backend(name: str) -> None:
    _registered.pop(name, None)


def _check_backend_class(obj: Any, ep_name: str) -> type[Backend]:
    if not (isinstance(obj, type) and issubclass(obj, Backend)):
        raise TypeError(f"entry point '{ep_name}' gave {obj!r}, not a Backend subclass")
    for attr in ("name", "device_type"):
        if not isinstance(getattr(obj, attr, None), str):
            raise TypeError(f"backend class {obj.__name__} has no string class attribute '{attr}'")
    return obj


def load_entry_point(ep: Any) -> Any:
    """What a plugin's entry point names: a class, or (vLLM-style) a function returning the class, a
    ``"module:qualname"`` string naming it, or None when the plugin does not apply here."""
    obj = ep.load()
    if not isinstance(obj, type) and callable(obj):
        obj = obj()
        if isinstance(obj, str):
            module, _, qualname = obj.partition(":")
            target: Any = import_module(module)
            for part in qualname.split("."):
                target = getattr(target, part)
            obj = target
    return obj


def _load_entry_point(ep: Any) -> type[Backend] | None:
    obj = load_entry_point(ep)
    return None if obj is None else _check_backend_class(obj, ep.name)


def discover(refresh: bool = False) -> tuple[dict[str, type[Backend]], dict[str, str]]:
    """``(backends by name, load errors by entry-point name)``; cached until ``refresh``."""
    global _discovered
    if _discovered is None or refresh:
        found: dict[str, type[Backend]] = {}
        errors: dict[str, str] = {}
        owners: dict[str, str] = {}  # backend name -> the package that registered it
        clashes: dict[str, list[str]] = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                cls = _load_entry_point(ep)
            except Exception as e:  # a broken plugin is reported, never fatal
                errors[ep.name] = f"{type(e).__name__}: {e}"
                continue
            if cls is None:
                continue
            package = getattr(getattr(ep, "dist", None), "name", None) or "an unknown package"
            if cls.name in found and found[cls.name] is not cls:
                clashes.setdefault(cls.name, [owners[cls.name]]).append(package)
                continue
            found[cls.name], owners[cls.name] = cls, package
        for name, packages in clashes.items():  # which one wins must never depend on install order
            found.pop(name, None)
            errors[name] = (f"the backend name '{name}' is registered by more than one package "
                            f"({', '.join(repr(p) for p in packages)}); uninstall all but one")
        _discovered = (found, errors)
    found, errors = _discovered
    return {**found, **_registered}, dict(errors)


def backend_names() -> list[str]:
    return sorted(discover()[0])


def _availability(cls: type[Backend]) -> tuple[bool, str]:
    try:
        ok, reason = cls.is_available()
    except Exception as e:  # is_available must not raise; if it does, the backend is unusable
        return False, f"is_available() raised {type(e).__name__}: {e}"
    return bool(ok), str(reason)


def list_backends() -> list[BackendInfo]:
    """Every discovered backend (available or not) and every plugin that failed to load."""
    found, errors = discover()
    infos = [BackendInfo(name, cls, *_availability(cls)) for name, cls in sorted(found.items())]
    infos += [BackendInfo(name, None, False, f"failed to load: {err}") for name, err in sorted(errors.items())]
    return infos


def default_backend_name() -> str:
    """``$OPENSEEK_HAL_BACKEND`` if set, else the available backend with the highest priority (in-tree first
    on a tie)."""
    env = os.environ.get(ENV_BACKEND)
    if env:
        return env
    found, _ = discover()
    usable = [cls for cls in found.values() if _availability(cls)[0]]
    if not usable:
        raise BackendUnavailableError("(default)", "no backend is available; run `openseek-hal backends`")
    # on a tie an in-tree backend wins: installing a plugin of equal priority never changes the default
    return max(usable, key=lambda c: (c.priority, c.__module__.startswith("openseek_hal."), c.name)).name


def get_backend(name: str | None = None, *, device_index: int | None = None,
                strict: bool | None = None) -> Backend:
    """An instance of backend ``name`` (default: `default_backend_name`), checked to be available."""
    name = name or default_backend_name()
    found, errors = discover()
    if name not in found:
        if name in errors:
            raise BackendUnavailableError(name, f"its plugin failed to load: {errors[name]}")
        raise UnknownBackendError(name, sorted(found))
    cls = found[name]
    ok, reason = _availability(cls)
    if not ok:
        raise BackendUnavailableError(name, reason)
    return cls(device_index, strict=strict)
