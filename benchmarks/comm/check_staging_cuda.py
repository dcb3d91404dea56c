"""The host staging's device path on real GPUs: every collective of the ``host`` and ``hier`` adaptors on
CUDA tensors, both transports, chunk sizes that split every size, checked against independent references.

    python benchmarks/comm/check_staging_cuda.py          # 2 ranks on 2 CUDA devices; exits 1 on any mismatch
    python benchmarks/comm/check_staging_cuda.py 1        # 1 rank: the same copy pipeline on one GPU

(The CPU tests run the same checks on CPU tensors: tests/test_comm_staging.py.)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

import staging_workers as w  # noqa: E402

from openseek_hal.comm import launch  # noqa: E402


def main(world_size: int) -> int:
    failed = 0
    runs = [("host", {"transport": "shm", "chunk_bytes": 4096}, None),
            ("host", {"transport": "gloo", "chunk_bytes": 4096}, None),
            ("host", {"transport": "shm", "chunk_bytes": 1 << 20}, None)]
    if world_size == 2:
        runs.append(("hier", {"chunk_bytes": 4096}, ["a", "b"]))
    for adaptor, options, kinds in runs:
        results = launch(w.every_collective, world_size, backend="cuda", adaptor=adaptor, timeout=300,
                         options=options, kinds=kinds)
        problems = [p for r in results for p in r["problems"]]
        same = all(r["digests"] == results[0]["digests"] for r in results)
        print(f"{adaptor} {options}: {'ok' if not problems and same else 'FAILED'}"
              + (f" ({len(problems)} problems: {problems[:3]})" if problems else "")
              + ("" if same else " (ranks differ)"), flush=True)
        failed += bool(problems) or not same
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2))
