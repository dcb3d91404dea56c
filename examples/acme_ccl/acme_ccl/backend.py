"""The ``acme`` backend: the CPU's ops, with Acme CCL as its torch.distributed library and adaptor.

A CPU-type backend that brings its own process-group backend: openseek-hal starts its jobs with
``cpu:acme`` (not ``cpu:gloo,cpu:acme``, which torch refuses), and its communicators default to the
``acme`` adaptor.
"""

from __future__ import annotations

from openseek_hal.backends.cpu import CPUBackend

from . import process_group


class AcmeBackend(CPUBackend):
    name = "acme"
    device_type = "cpu"
    priority = -10  # never the default over the in-tree cpu
    dist_backend = process_group.NAME
    comm_adaptor = "acme"
