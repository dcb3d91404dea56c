"""Under torchrun the communicators start from env:// (the launch helper is only for local tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_create_under_torchrun():
    script = Path(__file__).with_name("comm_torchrun_script.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(script),
           "torch", "host", "hier"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        for adaptor in ("torch", "host", "hier"):
            assert f"rank {rank}/2 {adaptor} sum=3" in proc.stdout
