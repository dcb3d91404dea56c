"""Process lifetime helpers that need nothing but the standard library (no torch: they run first thing)."""

from __future__ import annotations

import ctypes
import signal
import sys


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits (Linux ``PR_SET_PDEATHSIG``).

    Returns False where the platform has no such call. The signal fires when the parent *thread*
    that started this process exits, and it is not inherited by this process's own children; it
    survives ``exec``. The caller must check ``os.getppid()`` afterwards: a parent that died before
    the call has already reparented this process and no signal will come.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, ctypes.c_ulong(int(sig)), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    return True
