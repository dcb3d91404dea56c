"""openseek-hal: train DeepSeek-V3-class models on any AI chip through one small contract.

Public API (re-exports only): the `Backend` contract and its registry, `Device`, and the op set.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

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

try:
    __version__ = version("openseek-hal")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "Backend", "BackendInfo", "BackendUnavailableError", "Capabilities", "Device", "ExpectedFailure",
    "MissingOpError", "OpDef", "OpFallbackWarning", "UnknownBackendError", "UserError", "__version__",
    "backend_names", "default_backend_name", "get_backend", "list_backends", "register_backend",
]
