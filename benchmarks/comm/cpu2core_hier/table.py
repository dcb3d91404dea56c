"""The docs/comm.md table from the runs in this folder: per collective and size, the best (lowest) time of
the runs for raw gloo, hier/leader and hier/parallel, and parallel's speed-up over leader.

    python benchmarks/comm/cpu2core_hier/table.py run1 run2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

here = Path(__file__).parent
runs = [json.loads((here / r / "comm_bench.json").read_text())["results"] for r in sys.argv[1:]]
best: dict[tuple, float] = {}
for results in runs:
    for r in results:
        key = (r["op"], r["bytes"], r["impl"])
        best[key] = min(best.get(key, float("inf")), r["time_us"])
ops = list(dict.fromkeys(op for op, _, _ in best))
sizes = sorted({b for _, b, _ in best})


def human(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


print("| size | " + " | ".join(f"{op} gloo / leader / parallel (x)" for op in ops) + " |")
print("|---:|" + "---:|" * len(ops))
for b in sizes:
    cells = []
    for op in ops:
        g, lead, par = (best.get((op, b, i)) for i in ("torch.distributed", "hier/leader", "hier/parallel"))
        cells.append(f"{g / 1e3:.1f} / {lead / 1e3:.1f} / {par / 1e3:.1f} ({lead / par:.2f}x)")
    print(f"| {human(b)} | " + " | ".join(cells) + " |")
