#!/usr/bin/env bash
# One device call's worth of training measurements (issues #11 and #12): every row against the one-GPU
# baseline in the same job, torchtitan's loop last, every record in one archive ($OUT/train_job.tgz; the
# device tool returns only a few files). Run from the repository root with OPENSEEK_HAL_COMMIT set to the
# commit being measured (a device copy's git metadata may be stale), and the wheels of torchtitan 0.2.2 and
# its pure-Python dependencies (tyro, docstring_parser) in .whl/ (`pip download --no-deps`):
#   OPENSEEK_HAL_COMMIT=$(git rev-parse --short=8 HEAD) bash benchmarks/train/run_gpu_job.sh
# Rows (ROWS= overrides): 1 GPU: 1gpu (the default regime: captured step, bf16 moments), 1gpu-eager,
# 1gpu-fp32moments, 1gpu-mtp, then 1gpu-again; 2 GPUs also dp2, dp2-a2a, dp2-bf16reduce, ep2, ep2-allgather, ep2-tokens. Before them, the
# conformance of the ops the default step's update, attention inputs and head loss run (adamw, mla_qkv,
# linear_cross_entropy, moe_permute) on the GPU and mla_qkv's bench row. STEPS (20), CHECK_TIMEOUT (120 s), BENCH_TIMEOUT (60 s), TRAIN_TIMEOUT (300 s) and
# TITAN_TIMEOUT (120 s) bound the job to one 600-second device call.
set -uo pipefail
: "${OPENSEEK_HAL_COMMIT:?set OPENSEEK_HAL_COMMIT to the commit being measured}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
out="${OUT:-/tmp/train_job_out}"
work="$out/train_job"
mkdir -p "$work"
steps="${STEPS:-20}"
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
rows="${ROWS:-1gpu,1gpu-eager,1gpu-fp32moments,1gpu-mtp}"
if [ "$gpus" -ge 2 ] && [ -z "${ROWS:-}" ]; then
    rows="$rows,dp2,dp2-a2a,dp2-bf16reduce,ep2,ep2-allgather,ep2-tokens"
fi
rows="$rows,1gpu-again"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$work/gpus.txt"
python3 -m pip install -q --no-deps .whl/*.whl > /dev/null 2>&1 || echo "no wheels in .whl/: torchtitan's row will fail"
timeout "${CHECK_TIMEOUT:-120}" python3 -m openseek_hal conform --backend cuda --level ops --op adamw,mla_qkv,linear_cross_entropy,moe_permute \
    --report "$work/conform" > "$work/conform_log.txt" 2>&1 || echo "conform: exit $?" >> "$work/conform_log.txt"
timeout "${BENCH_TIMEOUT:-60}" python3 -m openseek_hal bench --backend cuda --op mla_qkv \
    --json "$work/bench_mla_qkv.json" > "$work/bench_log.txt" 2>&1
timeout "${TRAIN_TIMEOUT:-300}" python3 benchmarks/train/bench_train.py --out "$work/train" --rows "$rows" \
    --steps "$steps" --data-tokens 3000000 > "$work/train_log.txt" 2>&1
timeout "${TITAN_TIMEOUT:-120}" python3 benchmarks/train/torchtitan_baseline.py --steps "$steps" --warmup 3 \
    --micro-batch 2 --seq-len 4096 --mtp 0 --precision bf16 --json "$work/torchtitan_bf16.json" \
    > "$work/torchtitan_log.txt" 2>&1
rm -f "$work"/train/run-*/tokenizer.json "$work"/train/warmup/run-*/tokenizer.json
tar czf "$out/train_job.tgz" --exclude="*.trace.json.gz" -C "$out" train_job
grep -h -i -A3 "traceback\|error" "$work"/train/*.log | head -20
tail -n 2 "$work/conform_log.txt"
tail -n 4 "$work/bench_log.txt"
tail -n 16 "$work/train_log.txt"
tail -n 3 "$work/torchtitan_log.txt"
