"""The `Device` half of the HAL contract: count, index, synchronize, streams/events, memory, RNG.

A thin layer over ``torch.accelerator`` (and ``torch.<device_type>`` where that module has what
``torch.accelerator`` lacks), so that a backend for any chip that PyTorch knows as a device type
gets a working `Device` without writing one. A backend whose chip needs something else overrides
the methods it must.
"""

from __future__ import annotations

import importlib
import resource
import sys
import time
from typing import Any

import torch


class HostEvent:
    """An event for the host CPU, where work is synchronous: it records the wall clock."""

    def __init__(self) -> None:
        self._t: float | None = None

    def record(self, stream: torch.Stream | None = None) -> None:
        self._t = time.perf_counter()

    def query(self) -> bool:
        return self._t is not None

    def synchronize(self) -> None:
        pass

    def wait(self, stream: torch.Stream | None = None) -> None:
        pass

    def elapsed_time(self, end: HostEvent) -> float:
        """Milliseconds from this event to ``end`` (both must have been recorded)."""
        if self._t is None or end._t is None:
            raise RuntimeError("both events must be recorded before elapsed_time()")
        return (end._t - self._t) * 1e3


class Device:
    """One device of a backend: ``Device("cuda", 0)``, ``Device("cpu")``."""

    def __init__(self, type: str, index: int | None = None):
        self.type = type
        self.index = 0 if index is None and type != "cpu" else index

    # -- identity ---------------------------------------------------------------------------
    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.type, self.index) if self.index is not None else torch.device(self.type)

    def __repr__(self) -> str:
        return f"Device({self.torch_device})"

    def _module(self) -> Any | None:
        """``torch.cuda`` for "cuda", ``torch.xpu`` for "xpu", ...; None when torch has none."""
        if self.type == "cpu":
            return None
        try:
            return importlib.import_module(f"torch.{self.type}")
        except ImportError:
            return getattr(torch, self.type, None)

    def _is_accelerator(self) -> bool:
        acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        return acc is not None and acc.type == self.type

    def count(self) -> int:
        """Devices of this type visible to the process (1 for the host CPU)."""
        if self.type == "cpu":
            return 1
        if self._is_accelerator():
            return torch.accelerator.device_count()
        mod = self._module()
        return int(mod.device_count()) if mod is not None and hasattr(mod, "device_count") else 0

    def name(self) -> str:
        if self.type == "cpu":
            import platform

            return platform.processor() or platform.machine() or "cpu"
        mod = self._module()
        if mod is not None and hasattr(mod, "get_device_name"):
            return str(mod.get_device_name(self.index))
        return self.type

    def set_current(self) -> None:
        if self.type != "cpu" and self._is_accelerator():
            torch.accelerator.set_device_index(self.index)

    # -- execution ----------------------------------------------------------------------------
    def synchronize(self) -> None:
        if self.type == "cpu":
            return
        if self._is_accelerator():
            torch.accelerator.synchronize(self.index)
        else:
            self._module().synchronize(self.index)

    def stream(self) -> torch.Stream:
        """A new stream on this device."""
        return torch.Stream(device=self.torch_device)

    def current_stream(self) -> torch.Stream:
        if self.type == "cpu":  # the host has one (default) stream
            return torch.Stream(device=self.torch_device)
        return torch.accelerator.current_stream(self.index)

    def event(self, enable_timing: bool = False) -> torch.Event | HostEvent:
        """A device event; on the CPU (where torch has none) a `HostEvent` with the same methods."""
        if self.type == "cpu":
            return HostEvent()
        return torch.Event(device=self.torch_device, enable_timing=enable_timing)

    # -- graphs -------------------------------------------------------------------------------
    def graph(self) -> DeviceGraph:
        """A new `DeviceGraph` (CUDA graphs on ``cuda``); a device type without them raises ``RuntimeError``.
        A backend whose chip has its own graph API overrides this."""
        if self.type != "cuda":
            raise RuntimeError(f"{self.type} has no device graphs here")
        return _CudaGraph(self)

    # -- memory -------------------------------------------------------------------------------
    def memory_stats(self) -> dict[str, int]:
        """Bytes allocated now, reserved now and the peak allocation since the last reset.

        On the CPU the peak is the process's peak resident set size (the OS reports nothing finer).
        """
        if self.type == "cpu":
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = rss if sys.platform == "darwin" else rss * 1024
            return {"allocated": 0, "reserved": 0, "peak_allocated": peak}
        return {
            "allocated": int(torch.accelerator.memory_allocated(self.index)),
            "reserved": int(torch.accelerator.memory_reserved(self.index)),
            "peak_allocated": int(torch.accelerator.max_memory_allocated(self.index)),
        }

    def reset_peak_memory(self) -> None:
        if self.type != "cpu":
            torch.accelerator.reset_peak_memory_stats(self.index)

    # -- randomness ---------------------------------------------------------------------------
    def manual_seed(self, seed: int) -> None:
        """Seed the host generator and this device's generator."""
        torch.manual_seed(seed)
        mod = self._module()
        if mod is not None and hasattr(mod, "manual_seed_all"):
            mod.manual_seed_all(seed)


class DeviceGraph:
    """Work recorded once and replayed: ``with graph.capture(): ...`` records what is queued inside
    (nothing runs), ``replay()`` runs it again on the same memory. Warm up (run the same work once,
    eagerly) under ``with graph.stream():``, the stream the capture uses, before capturing."""

    def stream(self) -> Any:
        raise NotImplementedError

    def capture(self) -> Any:
        raise NotImplementedError

    def replay(self) -> None:
        raise NotImplementedError

    def timing_event(self) -> Any | None:
        """A timing event that, recorded inside ``capture()``, becomes part of the graph: every replay records
        it again, so pairs of them time parts of a replay. None where the graph API has no such events (a
        replay is then timed only as a whole, from outside)."""
        return None


class _CudaGraph(DeviceGraph):
    def __init__(self, device: Device):
        self._graph = torch.cuda.CUDAGraph()
        self._stream = torch.cuda.Stream(device.torch_device)

    def stream(self) -> Any:
        return torch.cuda.stream(self._stream)

    def capture(self) -> Any:
        return torch.cuda.graph(self._graph, stream=self._stream)

    def replay(self) -> None:
        self._graph.replay()

    def timing_event(self) -> Any | None:
        try:  # an event record node (cudaEventRecordExternal), not a fork/join of the captured streams
            return torch.cuda.Event(enable_timing=True, external=True)
        except TypeError:  # a torch before external events (2.8)
            return None
