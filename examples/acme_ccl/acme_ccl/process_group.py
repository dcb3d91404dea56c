"""The ``acme`` torch.distributed process-group backend: what a vendor's collective library provides.

torch.distributed calls these methods of the object the creator returns (torch 2.13):
``allreduce``, ``allgather``, ``broadcast``, ``send``, ``recv``, ``barrier`` and the flat
``all_gather_single`` (``dist.all_gather_single``), ``reduce_scatter_single``
(``dist.reduce_scatter_single``) and ``all_to_all_single`` (``dist.all_to_all_single``). Each takes
the tensors and torch's options object and returns a ``Work``. Here every call is counted and handed
to a gloo group over the same ranks; a real library would run its own kernels at the TODO.

Set ``$ACME_CCL_TRACE`` to a folder to have each rank append the name of every call to
``rank<N>.log`` there (the tests read it to prove the traffic went through this library).
"""

from __future__ import annotations

import os
from collections import Counter
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

NAME = "acme"
CALLED: Counter[str] = Counter()  # calls of this process, by method
_METHODS = ("allreduce", "allgather", "broadcast", "send", "recv", "barrier", "all_gather_single",
            "reduce_scatter_single", "all_to_all_single")


class AcmeProcessGroup(dist.ProcessGroup):
    """One group of ranks of the ``acme`` library (a Python ``ProcessGroup``)."""

    def __init__(self, store: Any, rank: int, size: int, timeout: timedelta):
        super().__init__(rank, size)
        # TODO(vendor): create the library's communicator here (unique id through ``store``).
        gloo = dist.ProcessGroupGloo(dist.PrefixStore("acme/", store), rank, size, timeout)
        self._inner = dist.ProcessGroup(store, rank, size)
        self._inner._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, gloo)
        self._inner._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
        trace = os.environ.get("ACME_CCL_TRACE")
        self._trace = open(os.path.join(trace, f"rank{dist.get_rank() if dist.is_initialized() else rank}.log"),
                           "a") if trace else None

    def getBackendName(self) -> str:  # noqa: N802 (torch's name)
        return NAME

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        CALLED[method] += 1
        if self._trace is not None:
            self._trace.write(method + "\n")
            self._trace.flush()
        # TODO(vendor): run the collective with the library; here gloo moves the bytes.
        return getattr(self._inner, method)(*args, **kwargs)


def _forward(method: str):
    def call(self: AcmeProcessGroup, *args: Any, **kwargs: Any) -> Any:
        return self._call(method, *args, **kwargs)

    call.__name__ = method
    return call


for _method in _METHODS:
    setattr(AcmeProcessGroup, _method, _forward(_method))


def _create(store: Any, rank: int, size: int, timeout: timedelta) -> AcmeProcessGroup:
    return AcmeProcessGroup(store, rank, size, timeout)


def register() -> None:
    """Register ``acme`` with torch.distributed (once per process; safe to call again)."""
    if NAME.upper() not in getattr(dist.Backend, "_plugins", {}):
        dist.Backend.register_backend(NAME, _create, devices=["cpu"])


register()
