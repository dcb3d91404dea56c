"""A recorder of host reads: operators whose result the host must wait for on a GPU (a value read, an
output sized by the data) and `Tensor.tolist`, which dispatches nothing on a CPU tensor. On a GPU each is a
stall of the host; under ``torch.compile`` each is a graph break. Tests run code under it on CPU tensors."""

from __future__ import annotations

from unittest.mock import patch

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.bincount.default",
           "aten.masked_select.default", "aten._unique2.default", "aten.unique_consecutive.default",
           "aten.repeat_interleave.Tensor"}


class HostReads(TorchDispatchMode):
    """``with HostReads() as reads: ...``; then ``reads.seen`` lists what read the device's data."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

        def tolist(t: torch.Tensor) -> list:  # a function: a class attribute binds the tensor as `t`
            self.seen.append("Tensor.tolist")
            return t.detach().numpy().tolist()

        self._patch = patch.object(torch.Tensor, "tolist", tolist)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        # repeat_interleave sized by the caller (output_size) needs no read
        if name in SYNCING and not (name == "aten.repeat_interleave.Tensor" and (kwargs or {}).get("output_size")):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._patch.start()
        return super().__enter__()

    def __exit__(self, *exc):
        self._patch.stop()
        return super().__exit__(*exc)
