"""Profile a few steps of a run with ``torch.profiler`` (config ``profile_step``).

Every rank records host and device activity over steps ``[first, first + count)`` and writes, under
``<run>/profile/``: ``rank<r>.trace.json.gz`` (a Chrome / Perfetto trace), ``rank<r>-device.txt``
(operators and kernels by device time), ``rank<r>-host.txt`` (by host time) and
``rank<r>-shapes.txt`` (operators by device time, split by their input shapes: which call of an operator
costs what), ``rank<r>-summary.json`` (wall time of the profiled steps and the device's busy time in it: a device
that is busy far less than the wall time waits for the host).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from ..device import Device


class StepProfiler:
    """Call `before(step)` at the start of each step and `after(step)` at its end (steps count from 1)."""

    def __init__(self, out: Path, rank: int, device: Device, first: int, count: int = 2):
        self.folder, self.rank, self.device = out / "profile", rank, device
        self.first, self.last = first, first + count - 1
        self._prof: profile | None = None
        self._t0 = 0.0

    def before(self, step: int) -> None:
        if step != self.first:
            return
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self.device.synchronize()
        self._prof = profile(activities=activities, record_shapes=True)
        self._prof.__enter__()
        self._t0 = time.perf_counter()

    def after(self, step: int) -> Path | None:
        """Stop after the last profiled step and write the files; returns the folder then."""
        if self._prof is None or step != self.last:
            return None
        self.device.synchronize()
        wall = time.perf_counter() - self._t0
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        averages = prof.key_averages()
        device_key = "self_device_time_total" if self.device.type != "cpu" else "self_cpu_time_total"
        r = self.rank
        (self.folder / f"rank{r}-device.txt").write_text(
            averages.table(sort_by=device_key, row_limit=60, max_name_column_width=80))
        (self.folder / f"rank{r}-shapes.txt").write_text(
            prof.key_averages(group_by_input_shape=True).table(
                sort_by=device_key, row_limit=80, max_name_column_width=60, max_shapes_column_width=100))
        (self.folder / f"rank{r}-host.txt").write_text(
            averages.table(sort_by="self_cpu_time_total", row_limit=60, max_name_column_width=80))
        prof.export_chrome_trace(str(self.folder / f"rank{r}.trace.json.gz"))
        # kernels only (operators' device totals would count their kernels twice)
        busy_us = sum(getattr(e, "self_device_time_total", 0.0) for e in averages
                      if getattr(e, "device_type", None) is not None and e.device_type.name != "CPU")
        summary = {"rank": r, "steps": [self.first, self.last], "wall_ms": 1e3 * wall,
                   "device_busy_ms": busy_us / 1e3 if self.device.type != "cpu" else None}
        (self.folder / f"rank{r}-summary.json").write_text(json.dumps(summary, indent=1))
        return self.folder
