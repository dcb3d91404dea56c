#!/usr/bin/env bash
# Training rows of two versions of the package in one device call (the change and its baseline on the
# same warm GPU): the working tree's `openseek_hal` and a base copy of it in $BASE (a directory holding
# an `openseek_hal/` package, e.g. `git archive <commit> openseek_hal | tar -x -C $BASE`), whose rows run
# from $BASE with PYTHONPATH=$BASE. Passes (PASSES=, default "new base new-again": drift shows) in that order;
# a pass written NAME:DIR runs the package copy in DIR the same way, recorded under the commit that
# VARIANT_COMMITS="NAME=sha ..." gives for NAME. From the repository root:
#   OPENSEEK_HAL_COMMIT=<new sha> BASE=.ab_base BASE_COMMIT=<base sha> ROWS=1gpu bash benchmarks/train/ab_job.sh
# Writes $OUT/ab_job.tgz (each pass's bench_train JSON and logs) and prints the passes' tables.
set -uo pipefail
: "${OPENSEEK_HAL_COMMIT:?}" "${BASE:?}" "${BASE_COMMIT:?}"
out=$(realpath -m "${OUT:-/tmp/ab_job_out}")
work="$out/ab_job"
rows="${ROWS:-1gpu}"
steps="${STEPS:-20}"
mkdir -p "$work"
root=$(pwd)
bench() {  # $1: pass name, $2: the directory holding the package it runs; the rest: its environment
    local name=$1 dir=$2; shift 2
    # run from the package's directory: `python -m` puts the working directory first on sys.path
    (cd "$dir" && env "$@" timeout "${PASS_TIMEOUT:-150}" python3 "$root/benchmarks/train/bench_train.py" \
        --out "$work/$name" --rows "$rows" --steps "$steps" --data-tokens 3000000 > "$work/$name.log" 2>&1)
    echo "== $name"; tail -n 4 "$work/$name.log"
}
variant_commit() {  # the commit of variant $1 from VARIANT_COMMITS, else "unknown"
    local kv
    for kv in ${VARIANT_COMMITS:-}; do [ "${kv%%=*}" = "$1" ] && { echo "${kv#*=}"; return; }; done
    echo unknown
}
for pass in ${PASSES:-new base new-again}; do
    if [ "$pass" = base ]; then
        bench base "$BASE" PYTHONPATH="$(cd "$BASE" && pwd)" OPENSEEK_HAL_COMMIT="$BASE_COMMIT"
    elif [ "${pass#*:}" != "$pass" ]; then
        name=${pass%%:*} dir=${pass#*:}
        bench "$name" "$dir" PYTHONPATH="$(cd "$dir" && pwd)" OPENSEEK_HAL_COMMIT="$(variant_commit "$name")"
    else
        bench "$pass" "$root"
    fi
done
rm -f "$work"/*/run-*/tokenizer.json "$work"/*/warmup/run-*/tokenizer.json
tar czf "$out/ab_job.tgz" -C "$out" ab_job
