"""`Device`: the same calls work on every backend's device."""

from __future__ import annotations

import torch


def test_device_basics(backend):
    dev = backend.device
    assert dev.count() >= 1
    assert dev.torch_device.type == backend.device_type
    assert isinstance(dev.name(), str) and dev.name()
    dev.set_current()
    x = torch.arange(6.0, device=dev.torch_device)
    dev.synchronize()
    assert float(x.sum()) == 15.0
    stats = dev.memory_stats()
    assert set(stats) == {"allocated", "reserved", "peak_allocated"}
    assert all(isinstance(v, int) and v >= 0 for v in stats.values())


def test_streams_and_events(backend):
    dev = backend.device
    assert dev.stream().device.type == backend.device_type
    assert dev.current_stream().device.type == backend.device_type
    start, end = dev.event(enable_timing=True), dev.event(enable_timing=True)
    start.record(dev.current_stream())
    x = torch.randn(256, 256, device=dev.torch_device)
    for _ in range(4):
        x = x @ x / 16
    end.record(dev.current_stream())
    end.synchronize()
    assert start.query() and end.query()
    assert end.elapsed_time(start) <= 0.0 <= start.elapsed_time(end) < 60_000


def test_manual_seed_is_reproducible(backend):
    dev = backend.device
    dev.manual_seed(1234)
    a = torch.rand(8, device=dev.torch_device)
    dev.manual_seed(1234)
    b = torch.rand(8, device=dev.torch_device)
    dev.manual_seed(4321)
    c = torch.rand(8, device=dev.torch_device)
    assert torch.equal(a, b) and not torch.equal(a, c)
