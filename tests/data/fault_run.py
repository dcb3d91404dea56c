"""Run ``openseek-hal ARGS`` in this process with a fault injected: for tests that need a real process.

``FAULT`` (environment), ``;``-separated:

- ``kill:MODULE:QUALNAME:N``: SIGKILL this process right after the N-th call of that function returns;
- ``sleep:MODULE:QUALNAME:SECONDS``: every call sleeps first (forked workers inherit the patch).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import time


def _patch(spec: str) -> None:
    kind, module, qualname, arg = spec.split(":")
    owner = importlib.import_module(module)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        if kind == "sleep":
            time.sleep(float(arg))
        result = original(*args, **kwargs)
        calls[0] += 1
        if kind == "kill" and calls[0] == int(arg):
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, wrapper)


if __name__ == "__main__":
    for spec in filter(None, os.environ.get("FAULT", "").split(";")):
        _patch(spec)
    from openseek_hal.cli import main

    main(sys.argv[1:])
