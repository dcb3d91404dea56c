"""One training step as one device graph (``graph_step: true``).

A step of `openseek-small` launches a few thousand kernels; where the device finishes some of them
sooner than Python queues the next, it waits for the host (on one H100, about 3% of the step; the
graph gained 1.8%). `GraphedStep` runs the step eagerly once (the warm-up: Triton compiles its
kernels, the backend times its op choices), captures the next one into a `DeviceGraph` and from then
on replays it: one launch per step. tests/graph_emulator.py gives the CPU a device graph with the
same semantics, so the tests replay real training steps.

What makes a step replayable, and how the trainer provides it:

- Its inputs live at fixed addresses: the batch is copied into static device tensors before each
  call, and the optimizer reads the learning rate and the step number from a `DeviceSchedule`
  written before each call (a fill, not a copy from host memory).
- It never reads a device value on the host (a capture fails if it does; tests/host_reads.py
  checks the forward and backward on the CPU).
- Everything it does on the host is the same every step: the capture records the kernels of one
  pass through the Python code, and the replays repeat exactly those. The Python-side state the
  step changes (the optimizer's step count) is advanced here for each replay.
- Its outputs (loss, gradient norm) are overwritten by every replay, so each call returns copies.

Warm-up, capture and replays all run on the graph's own stream, which the caller enters for the
whole loop (`stream`), so the caching allocator and the libraries' per-stream workspaces are the ones
the capture sees.

The step's phases (forward, backward, optimizer, ...) are marked inside the capture with the graph's
timing events (`DeviceGraph.timing_event`: event record nodes on CUDA), which every replay records
again: `last_replay_ms` reads the most recent replay's breakdown, so a captured step reports the same
phases as an eager one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..device import DeviceGraph
from ..errors import RunError
from .zero import DeviceSchedule, DistributedOptimizer

StepOutputs = tuple[torch.Tensor | None, ...]


def phase_ms(marks: Sequence[tuple[str, Any]]) -> dict[str, float]:
    """Milliseconds of each phase from timing events ``(phase, event)`` in the order recorded: each event
    ends the phase it names, which began at the event before it; a phase marked again adds up."""
    out: dict[str, float] = {}
    for (_, start), (phase, end) in zip(marks, marks[1:]):
        out[phase] = out.get(phase, 0.0) + start.elapsed_time(end)
    return out


class CapturedMarks:
    """Phase marks for a step being captured: ``mark(phase)`` ends ``phase`` with one of the graph's timing
    events (`GraphedStep` marks the start). Outside a capture (the eager warm-up) it marks nothing."""

    def __init__(self, graph: DeviceGraph):
        self.graph = graph
        self.capturing = False
        self.marks: list[tuple[str, Any]] = []

    def mark(self, phase: str) -> None:
        if self.capturing and (event := self.graph.timing_event()) is not None:
            event.record()
            self.marks.append((phase, event))


Body = Callable[[list[tuple[torch.Tensor, ...]], CapturedMarks], StepOutputs]


class GraphedStep:
    """``step(host_inputs, lr)``: the first call runs ``body`` eagerly, the second captures and replays it,
    later calls replay. ``body(device_inputs, marks)`` runs one training step on the static device inputs,
    with the optimizer reading ``schedule``, calls ``marks.mark(phase)`` at the end of each phase, and
    returns device tensors (or None)."""

    def __init__(self, graph: DeviceGraph, body: Body, optimizer: DistributedOptimizer, schedule: DeviceSchedule,
                 device: torch.device):
        self.graph, self.body, self.optimizer, self.schedule = graph, body, optimizer, schedule
        self.device = device
        self.calls = 0
        self._inputs: list[tuple[torch.Tensor, ...]] | None = None
        self._outputs: StepOutputs | None = None
        self._marks = CapturedMarks(graph)

    def last_replay_ms(self) -> dict[str, float]:
        """Each phase's device time (milliseconds) in the latest replay, summed over its marks (forward and
        backward once per micro-batch); waits for that replay. Empty before the first replay, or where the
        graph has no timing events."""
        marks = self._marks.marks
        if self.calls < 2 or len(marks) < 2:
            return {}
        marks[-1][1].synchronize()
        return phase_ms(marks)

    def stream(self) -> Any:
        """The context every step (and anything else queued between steps) runs under."""
        return self.graph.stream()

    def __call__(self, host_inputs: Sequence[tuple[torch.Tensor, ...]], lr: float) -> StepOutputs:
        if self._inputs is None:
            self._inputs = [tuple(torch.empty_like(t, device=self.device) for t in group) for group in host_inputs]
        for static, group in zip(self._inputs, host_inputs, strict=True):
            for dst, src in zip(static, group, strict=True):
                if dst.shape != src.shape:
                    raise ValueError(f"a captured step takes inputs of shape {tuple(dst.shape)}, "
                                     f"got {tuple(src.shape)}")
                dst.copy_(src, non_blocking=True)
        # the update about to run is the optimizer's next step (its count advances in `update`, or below)
        self.schedule.set(lr, self.optimizer.step_count + 1)
        self.calls += 1
        if self.calls == 1:  # warm-up, eagerly
            return self.body(self._inputs, self._marks)
        if self._outputs is None:
            try:
                with self.graph.capture():  # records; runs nothing (the Python code runs once, here)
                    self._marks.capturing = True
                    self._marks.mark("start")
                    self._outputs = self.body(self._inputs, self._marks)
            except RuntimeError as e:
                raise RunError(f"graph_step: the training step could not be captured ({str(e).splitlines()[0]}); "
                               "something in it reads a device value on the host or copies from pageable "
                               "memory. Run it eagerly with graph_step=false") from e
            finally:
                self._marks.capturing = False
        else:
            self.optimizer.step_count += 1  # the replay's update, which ran no Python
        self.graph.replay()
        return tuple(o.clone() if o is not None else None for o in self._outputs)
