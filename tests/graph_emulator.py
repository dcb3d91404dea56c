"""A device graph for the CPU with CUDA graphs' semantics, to test `graph_step` where there is no GPU.

`RecordingGraph.capture()` runs the captured code once and records every aten operator it runs (what
CUDA records as kernels), then puts back every tensor that existed before the capture and that an
operator wrote, since a CUDA capture runs nothing. `replay()` runs the recorded operators again on the
same tensors, writing each result into the tensor the capture produced, without running any of the
Python that issued them. So, as on a GPU, a replay repeats the capture's arguments: a number the Python code passed
(a learning rate, a step count) is the capture's, and tensors are the only way in. A host read inside
the capture raises (the operators tests/host_reads.py names, and `Tensor.tolist`), as a CUDA capture
fails on a synchronizing call. Its timing events, recorded inside the capture, record the host clock at
their place in each replay (a CUDA graph's event record nodes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from unittest.mock import patch

import torch
from host_reads import SYNCING
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from openseek_hal.device import DeviceGraph, HostEvent


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


def _written(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors ``func`` writes (its schema's mutable arguments: ``self`` of ``add_``, ``out=``)."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            out.extend(_tensors(args[i] if i < len(args) else kwargs.get(arg.name)))
    return out


class _Recorder(TorchDispatchMode):
    def __init__(self, ops: list[tuple[Any, tuple, dict, Any]]):
        super().__init__()
        self.ops = ops
        self.created: set[int] = set()  # storages first made inside the capture
        self.saved: dict[int, tuple[torch.UntypedStorage, torch.UntypedStorage]] = {}  # storage -> its old bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name in SYNCING and not (name == "aten.repeat_interleave.Tensor" and kwargs.get("output_size")):
            raise RuntimeError(f"{name} reads a device value on the host inside a graph capture")
        for t in _written(func, args, kwargs):
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in self.created and key not in self.saved:
                self.saved[key] = (storage, storage.clone())
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        out = func(*args, **kwargs)
        self.created.update(p for t in _tensors(out) if (p := t.untyped_storage().data_ptr()) not in inputs)
        self.ops.append((func, args, kwargs, out))
        return out

    def restore(self) -> None:
        for storage, old in self.saved.values():
            storage.copy_(old)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


class _GraphEvent(HostEvent):
    """A `HostEvent` that, recorded inside its graph's capture, is recorded by each replay instead (as a CUDA
    event record node): before the first replay it has no time."""

    def __init__(self, graph: RecordingGraph):
        super().__init__()
        self.graph = graph

    def record(self, stream: Any = None) -> None:
        if self.graph.capturing:
            self.graph.ops.append((HostEvent.record.__get__(self), (), {}, None))
        else:
            super().record()


class RecordingGraph(DeviceGraph):
    def __init__(self, timing: bool = True) -> None:
        self.ops: list[tuple[Any, tuple, dict, Any]] = []
        self.replays = 0
        self.capturing = False
        self.timing = timing

    def timing_event(self) -> HostEvent | None:
        return _GraphEvent(self) if self.timing else None

    def stream(self) -> Any:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        if self.ops:
            raise RuntimeError("this graph was captured already")
        def tolist(t: torch.Tensor) -> list:
            raise RuntimeError("Tensor.tolist reads a device value on the host inside a graph capture")

        recorder = _Recorder(self.ops)
        self.capturing = True
        try:
            with recorder, patch.object(torch.Tensor, "tolist", tolist):
                yield
        finally:
            self.capturing = False
        recorder.restore()

    def replay(self) -> None:
        self.replays += 1
        with torch.no_grad():
            for func, args, kwargs, out in self.ops:
                result = func(*args, **kwargs)
                targets, _ = tree_flatten(out)
                values, _ = tree_flatten(result)
                for dst, src in zip(targets, values, strict=True):
                    if isinstance(dst, torch.Tensor) and not _same_memory(dst, src):
                        dst.copy_(src)
