#!/usr/bin/env bash
# The issue #5 collective benchmark on one host with 2 GPUs (recorded on 2 x H100 SXM, NVLink).
# Run from the repository root; results go to ${OUT:-benchmarks/comm/results}/.
set -euo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
out="${OUT:-benchmarks/comm/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/gpus.txt" || true
nvidia-smi topo -m >> "$out/gpus.txt" || true
# 1. correctness of every adaptor on the GPUs (the collective conformance level), then 2. the bench
# (python -c, not a here-document: spawned ranks re-import the main script, and stdin has none)
python -c '
import collections, json, sys
from openseek_hal.conformance.collectives import run_collective_checks
rows = run_collective_checks("cuda", ["torch", "nccl", "host", "hier"], [2], quick=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
print("conformance:", dict(collections.Counter((r["adaptor"], r["status"]) for r in rows)))
for r in [r for r in rows if r["status"] != "pass"][:20]:
    print("NOT PASSING:", r["name"], r["status"], r["message"][:300])
' "$out/comm_conformance.json" 2>&1 | tee "$out/conformance.log"
python -m openseek_hal.comm.bench --backend cuda --world-size 2 \
    --adaptor torch,nccl,host,hier --op all_reduce,all_gather,reduce_scatter,all_to_all_single \
    --min-bytes 8K --max-bytes 1G --staged-max-bytes 64M --dtype bfloat16 --out "$out" "$@" 2>&1 | tee "$out/bench.log"
