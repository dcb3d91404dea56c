"""The hier adaptor's algorithms on real GPUs: every collective, both algorithms (parallel shards and
leaders), on CUDA tensors with simulated chip kinds, checked exactly against a kind-order reference
(tests/hier_workers.py, the same checks the CPU tests run), plus random floats: the same bits on
every rank and within the summation bound.

    python benchmarks/comm/check_hier_cuda.py         # every layout the visible GPUs allow; exits 1 on a mismatch

Layouts: 2 GPUs: [a, b]; 3 GPUs: [a, a, b]; 4+ GPUs: [a, a, b, b], [a, b, b, b], [a, b, a, b].
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

import hier_workers as w  # noqa: E402
import torch  # noqa: E402

from openseek_hal.comm import launch  # noqa: E402

LAYOUTS = {2: [["a", "b"]], 3: [["a", "a", "b"]],
           4: [["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b", "a", "b"]]}


def main() -> int:
    gpus = torch.cuda.device_count()
    layouts = [k for n, ks in LAYOUTS.items() if n <= gpus for k in ks]
    if not layouts:
        print(f"needs at least 2 GPUs, found {gpus}")
        return 1
    failed = 0
    for kinds in layouts:
        for chunk in (4096, 1 << 20):
            results = launch(w.every_collective, len(kinds), backend="cuda", adaptor="hier", kinds=kinds,
                             timeout=300, options={"chunk_bytes": chunk})
            problems = [p for r in results for p in r["problems"]]
            same = all(r["digests"] == results[0]["digests"] for r in results)
            ran = results[0]["ran"]
            print(f"hier kinds={kinds} chunk={chunk}: {'ok' if not problems and same else 'FAILED'} (ran {ran})"
                  + (f" ({len(problems)} problems: {problems[:3]})" if problems else "")
                  + ("" if same else " (ranks differ)"), flush=True)
            failed += bool(problems) or not same
        floats = launch(w.random_floats, len(kinds), backend="cuda", adaptor="hier", kinds=kinds, timeout=300)
        bad = [k for k in floats[0] if not floats[0][k][1] or any(f[k] != floats[0][k] for f in floats)]
        print(f"hier kinds={kinds} random floats: {'ok' if not bad else 'FAILED ' + str(bad)}", flush=True)
        failed += bool(bad)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
