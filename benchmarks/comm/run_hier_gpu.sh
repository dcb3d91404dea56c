#!/usr/bin/env bash
# hier algorithms on GPUs: exact checks, the leader vs parallel benchmark with simulated kinds, the tuning
# table. Run from the repository root on one host with N >= 2 GPUs; results go to ${OUT:-benchmarks/comm/results_hier}/.
#   2 GPUs: kinds [a, b] (one rank per kind: both algorithms move the same bytes between kinds)
#   4+ GPUs: kinds [a, a, b, b] (the parallel algorithm's case) and [a, b, b, b]
set -euo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
out="${OUT:-benchmarks/comm/results_hier}"
mkdir -p "$out"
export OPENSEEK_HAL_CACHE="$out/cache"   # the tuning table lands here, not in ~/.cache
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/gpus.txt" || true
python benchmarks/comm/check_hier_cuda.py 2>&1 | tee "$out/check.log"
layouts=("a,b")
if [ "$gpus" -ge 4 ]; then layouts=("a,a,b,b" "a,b,b,b"); fi
for kinds in "${layouts[@]}"; do
    n=$(echo "$kinds" | tr ',' '\n' | wc -l)
    tag=$(echo "$kinds" | tr -d ',')
    python -m openseek_hal.comm.bench --backend cuda -n "$n" --kinds "$kinds" --adaptor hier,torch \
        --op all_reduce,all_gather,reduce_scatter,all_to_all_single --min-bytes 64K --max-bytes 64M \
        --staged-max-bytes 64M --dtype bfloat16 --out "$out/bench_$tag" 2>&1 | grep -v '^bench comm:' \
        | tee "$out/bench_$tag.log"
    python -m openseek_hal.comm.bench --backend cuda -n "$n" --kinds "$kinds" --adaptor hier,host --tune \
        --min-bytes 64K --max-bytes 64M --factor 4 --dtype bfloat16 --out "$out/tune_$tag" 2>&1 \
        | grep -v '^bench comm:' | tee "$out/tune_$tag.log"
done
