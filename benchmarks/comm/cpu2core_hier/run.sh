#!/usr/bin/env bash
# hier: leader vs parallel shards, 4 gloo ranks on the CPU as two simulated chip kinds of two ranks
# ([a, a, b, b]), float32, 64 KiB - 64 MiB, raw torch.distributed (gloo, one kind) beside them.
# Run from the repository root; writes to benchmarks/comm/cpu2core_hier/$1 (default run1).
set -euo pipefail
out="benchmarks/comm/cpu2core_hier/${1:-run1}"
mkdir -p "$out"
{ echo "command: $0 $*"; echo "commit: $(git rev-parse HEAD)$(git diff --quiet || echo ' (dirty)')";
  echo "machine: $(uname -srm), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)";
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"; } > "$out/provenance.txt"
python -m openseek_hal.comm.bench --backend cpu -n 4 --kinds a,a,b,b --adaptor hier \
    --op all_reduce,all_gather,reduce_scatter,all_to_all_single --min-bytes 64K --max-bytes 64M \
    --staged-max-bytes 64M --dtype float32 --out "$out" 2>&1 | grep -v '^bench comm:' | tee "$out/bench.log"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/provenance.txt"
