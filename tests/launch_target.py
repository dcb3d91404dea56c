"""A tiny rank program for test_launch: started by spawn_local, torchrun, or by the test with an env:// world.

    launch_target.py world             world_from_env, die_with_parent, rendezvous, all_reduce; print both
    launch_target.py fail PIDDIR       rank 1 exits with code 3, the others sleep (to be stopped)
    launch_target.py sleep PIDDIR      every rank writes its pid and sleeps (to be signalled)
    launch_target.py rendezvous T      init_distributed from env:// with timeout T; print the error as one line
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def _pid(piddir: str, rank: int) -> None:
    Path(piddir, f"{rank}.tmp").write_text(str(os.getpid()))
    os.replace(Path(piddir, f"{rank}.tmp"), Path(piddir, str(rank)))


def main(mode: str, arg: str | None) -> int:
    from openseek_hal.train.launch import die_with_parent, world_from_env

    armed = die_with_parent()
    world = world_from_env()
    if mode == "world":
        import torch

        from openseek_hal.comm.rendezvous import init_distributed, shutdown

        init_distributed("cpu", "gloo", timeout=30)
        import torch.distributed as dist

        t = torch.tensor([world.rank + 1.0])
        dist.all_reduce(t)
        line = (f"world rank={world.rank} size={world.world_size} local={world.local_rank}/{world.local_world_size} "
                f"node={world.node_rank} source={world.source} armed={armed} sum={t.item():g} "
                f"nccl_nvls={os.environ.get('NCCL_NVLS_ENABLE')} "
                f"agent_store={os.environ.get('TORCHELASTIC_USE_AGENT_STORE')}")
        # one write of the whole line (under PIPE_BUF, so atomic): ranks share the pipe, and print's
        # separate writes of text and newline interleaved between ranks on a busy machine
        sys.stdout.flush()
        os.write(1, (line + "\n").encode())
        print(f"stderr of rank {world.rank}", file=sys.stderr, flush=True)
        shutdown()
        return 0
    if mode in ("fail", "sleep"):
        _pid(arg or ".", world.rank)
        if mode == "fail" and world.rank == 1:
            time.sleep(0.5)
            print("rank 1 fails on purpose", file=sys.stderr, flush=True)
            return 3
        time.sleep(120)
        return 0
    if mode == "rendezvous":
        from openseek_hal.comm import CollectiveError
        from openseek_hal.comm.rendezvous import init_distributed

        start = time.monotonic()
        try:
            init_distributed("cpu", "gloo", timeout=float(arg or 5))
        except CollectiveError as e:
            print(f"{type(e).__name__} after {time.monotonic() - start:.2f} s: {e}", flush=True)
            return 1
        print("joined", flush=True)
        return 0
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
