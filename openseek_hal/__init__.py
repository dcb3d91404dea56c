"""openseek-hal: train DeepSeek-V3-class models on any AI chip through one small contract.

Public API (re-exports only): the `Backend` contract and its registry, `Device`, the op set's
`OpDef`, and the user-facing errors. Names are imported on first use (PEP 562), so that commands
that need no torch (``openseek-hal --help``, the data tools) start without importing it.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("openseek-hal")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

_EXPORTS = {
    "backend": ("Backend", "BackendInfo", "Capabilities", "ExpectedFailure", "OpFallbackWarning", "backend_names",
                "default_backend_name", "get_backend", "list_backends", "register_backend"),
    "device": ("Device",),
    "errors": ("BackendUnavailableError", "MissingOpError", "UnknownBackendError", "UserError"),
    "ops": ("OpDef",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "Backend", "BackendInfo", "BackendUnavailableError", "Capabilities", "Device", "ExpectedFailure",
    "MissingOpError", "OpDef", "OpFallbackWarning", "UnknownBackendError", "UserError", "__version__",
    "backend_names", "default_backend_name", "get_backend", "list_backends", "register_backend",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'openseek_hal' has no attribute '{name}'")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from .backend import (
        Backend,
        BackendInfo,
        Capabilities,
        ExpectedFailure,
        OpFallbackWarning,
        backend_names,
        default_backend_name,
        get_backend,
        list_backends,
        register_backend,
    )
    from .device import Device
    from .errors import BackendUnavailableError, MissingOpError, UnknownBackendError, UserError
    from .ops import OpDef
