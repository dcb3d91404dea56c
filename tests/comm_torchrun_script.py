"""Run by test_comm_torchrun under torchrun: each adaptor, started from env:// with no launch helper."""

import sys

import torch

from openseek_hal.comm import create, shutdown

if __name__ == "__main__":
    for adaptor in sys.argv[1:]:
        comm = create(adaptor, "cpu", timeout=30)
        t = torch.tensor([comm.rank + 1.0])
        comm.all_reduce(t)
        print(f"rank {comm.rank}/{comm.world_size} {adaptor} sum={t.item():g}", flush=True)
    shutdown()
