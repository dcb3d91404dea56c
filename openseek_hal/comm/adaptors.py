"""Communicator adaptors as plugins: the ``openseek_hal.comm_adaptors`` entry-point group.

An adaptor is a class (subclass `Adaptor`, or any class with the same attributes) that says which
torch device types it serves, whether it can run here (``is_available``: cheap, never raises, imports
no vendor library at module import) and builds a `Communicator` (``create``). The in-tree ``torch``,
``nccl``, ``host`` and ``hier`` register through the same group as a vendor's package, so a
vendor's collective library is found exactly as ours are.

The rules are the backends' (`openseek_hal.backend.discover`): an entry point names the class or a
zero-argument function returning it (or None when the plugin does not apply to this machine, or a
``"module:Class"`` string); a plugin that fails to load is recorded with its error and never breaks
the others; a name registered by two packages is unusable, with an error naming both, until one is
uninstalled (which one wins must never depend on install order).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import CollectiveError

if TYPE_CHECKING:
    from ..backend import Backend
    from . import Communicator

ENTRY_POINT_GROUP = "openseek_hal.comm_adaptors"
_IN_TREE = ("torch", "nccl", "host", "hier")  # listing order of the in-tree adaptors


class UnknownAdaptorError(CollectiveError):
    """No adaptor of that name is installed, or its plugin failed to load (a user error: exit status 2)."""

    exit_code = 2


class Adaptor:
    """One way of running collectives. Subclass it and register the class under ``openseek_hal.comm_adaptors``.

    ``create(backend, pg, *, name, timeout, check, **options)`` gets the backend (its ``device`` is
    this rank's device), the torch.distributed process group the communicator spans (already
    initialized: the default group or one from ``new_group``), the group's name for error messages,
    the timeout in seconds, and whether the cross-rank consistency check is on. It is called on
    every rank of ``pg``, in the same order, so it may create process groups of its own.
    """

    name: ClassVar[str]
    device_types: ClassVar[tuple[str, ...]] = ()  # torch device types it serves; () = every device type
    description: ClassVar[str] = ""
    # whether one communicator may span ranks on different chip kinds (backends): the trainer runs a job
    # whose ranks use different backends only through such an adaptor (``hier``)
    spans_kinds: ClassVar[bool] = False

    @classmethod
    def is_available(cls) -> tuple[bool, str]:
        """(True, "") when it can run in this process's environment, else (False, why). Cheap; never raises."""
        return True, ""

    @classmethod
    def serves(cls, device_type: str) -> bool:
        return not cls.device_types or device_type in cls.device_types

    @classmethod
    def create(cls, backend: Backend, pg: Any, *, name: str, timeout: float, check: bool,
               **options: Any) -> Communicator:
        raise NotImplementedError(f"adaptor {cls.name!r} does not implement create()")


@dataclass(frozen=True)
class AdaptorInfo:
    name: str
    cls: type | None
    package: str  # the distribution that registered it
    available: bool
    reason: str  # why not available, or the plugin's load error

    @property
    def device_types(self) -> tuple[str, ...]:
        return tuple(getattr(self.cls, "device_types", ())) if self.cls is not None else ()


_registered: dict[str, type] = {}
_discovered: tuple[dict[str, type], dict[str, str], dict[str, str]] | None = None


def _check_adaptor_class(obj: Any, ep_name: str) -> type:
    if not isinstance(obj, type):
        raise TypeError(f"entry point '{ep_name}' gave {obj!r}, not an adaptor class")
    if not isinstance(getattr(obj, "name", None), str):
        raise TypeError(f"adaptor class {obj.__name__} has no string class attribute 'name'")
    types_ = getattr(obj, "device_types", None)
    if not isinstance(types_, tuple) or not all(isinstance(t, str) for t in types_):
        raise TypeError(f"adaptor class {obj.__name__}: 'device_types' must be a tuple of device type strings")
    for method in ("is_available", "create"):
        if not callable(getattr(obj, method, None)):
            raise TypeError(f"adaptor class {obj.__name__} has no '{method}'")
    if not callable(getattr(obj, "serves", None)):  # a duck-typed class: give it Adaptor's rule
        obj.serves = classmethod(Adaptor.serves.__func__)  # type: ignore[attr-defined]
    return obj


def _load_entry_point(ep: Any) -> type | None:
    from ..backend import load_entry_point  # the backends' rule: a class, a function naming it, or None

    obj = load_entry_point(ep)
    return None if obj is None else _check_adaptor_class(obj, ep.name)


def register_adaptor(cls: type) -> type:
    """Register an adaptor class directly (tests, notebooks); packages use the entry-point group.

    Only this process sees it: `launch` starts fresh processes, which find entry points only.
    """
    _check_adaptor_class(cls, cls.__dict__.get("name", cls.__name__))
    _registered[cls.name] = cls
    return cls


def unregister_adaptor(name: str) -> None:
    _registered.pop(name, None)


def discover_adaptors(refresh: bool = False) -> tuple[dict[str, type], dict[str, str]]:
    """``(adaptor classes by name, load errors by name)``; cached until ``refresh``."""
    found, errors, _ = _discover(refresh)
    return {**found, **_registered}, dict(errors)


def _discover(refresh: bool = False) -> tuple[dict[str, type], dict[str, str], dict[str, str]]:
    global _discovered
    if _discovered is None or refresh:
        found: dict[str, type] = {}
        errors: dict[str, str] = {}
        owners: dict[str, str] = {}  # adaptor name -> the package that registered it
        clashes: dict[str, list[str]] = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            package = getattr(getattr(ep, "dist", None), "name", None) or "an unknown package"
            try:
                cls = _load_entry_point(ep)
            except Exception as e:  # a broken plugin is reported, never fatal
                errors[ep.name] = f"{type(e).__name__}: {e}"
                owners.setdefault(ep.name, package)
                continue
            if cls is None:
                continue
            if cls.name in found and found[cls.name] is not cls:
                clashes.setdefault(cls.name, [owners[cls.name]]).append(package)
                continue
            found[cls.name], owners[cls.name] = cls, package
        for name, packages in clashes.items():
            found.pop(name, None)
            errors[name] = (f"the adaptor name '{name}' is registered by more than one package "
                            f"({', '.join(repr(p) for p in packages)}); uninstall all but one")
        _discovered = (found, errors, owners)
    return _discovered


def adaptor_names() -> list[str]:
    """Every adaptor that loaded (available here or not), in-tree first, then by name."""
    found, _ = discover_adaptors()
    return sorted(found, key=lambda n: (not found[n].__module__.startswith("openseek_hal."),
                                        _IN_TREE.index(n) if n in _IN_TREE else len(_IN_TREE), n))


def availability(cls: type) -> tuple[bool, str]:
    try:
        ok, reason = cls.is_available()
    except Exception as e:  # is_available must not raise; if it does, the adaptor is unusable
        return False, f"is_available() raised {type(e).__name__}: {e}"
    return bool(ok), str(reason)


def get_adaptor(name: str) -> type:
    """The adaptor class registered as ``name``, or `UnknownAdaptorError` saying why there is none."""
    found, errors = discover_adaptors()
    if name in found:
        return found[name]
    if name in errors:
        raise UnknownAdaptorError(f"adaptor '{name}' cannot be used: its plugin failed to load: {errors[name]}",
                                  op="create")
    hint = ""
    if not any(n in found or n in errors for n in _IN_TREE):  # openseek-hal's own entry points are missing
        hint = ("; openseek-hal's own adaptors are not registered either: its installed metadata is stale, "
                "reinstall it (pip install -e .)")
    raise UnknownAdaptorError(f"unknown adaptor '{name}' (installed: {', '.join(adaptor_names()) or 'none'}; "
                              f"`openseek-hal backends` lists them){hint}", op="create")


def list_adaptors() -> list[AdaptorInfo]:
    """Every discovered adaptor (available or not) and every adaptor plugin that failed to load."""
    found, errors = discover_adaptors()
    owners = _discover()[2]
    infos = [AdaptorInfo(name, found[name], owners.get(name, "registered in this process"),
                         *availability(found[name])) for name in adaptor_names()]
    infos += [AdaptorInfo(name, None, owners.get(name, "?"), False, f"failed to load: {err}")
              for name, err in sorted(errors.items())]
    return infos
