"""A two-kind training job on one host: rank 0 on `cuda`, rank 1 on `cpu`, data parallel 2 through `hier`,
against one rank (`cuda`) with the whole batch, in the same regime (fp32 weights: a mixed job's `dtype: auto`).

    python benchmarks/comm/two_kind_train.py OUT_DIR [--steps 50] [--batch-size 8] [--seq-len 128]

Needs one GPU. Runs the built-in corpus and the `tiny` preset (the README's default model), no
checkpoint, a loss logged every step:

- ``one``: ``openseek-hal train --backend cuda --set dtype=fp32`` (the reference);
- ``two_kind``: ``openseek-hal train -n 2 --backend cuda,cpu`` (``dtype: auto`` -> fp32 on both ranks,
  ``comm_adaptor`` "" -> ``hier``; the CPU rank gets ``OMP_NUM_THREADS`` = the host's cores - 2).

Both start from the same weights (the mixed job broadcasts rank 0's, drawn on cuda:0 as the
reference's are). The CPU rank computes its half of each batch with the CPU's reference ops, the
reference all of it with the cuda kernels, so the losses agree to float32 rounding, not bitwise.
Writes ``two_kind_train.json`` (provenance, every step's loss of both runs, max |diff|, tokens/s,
wall times, logs) and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

COMMON = ["--set", "save=false", "--set", "log_every=1", "--set", "eval_batches=1", "--set", "sample_tokens=8",
          "--model", "tiny"]


def run(name: str, out: Path, extra: list[str], args: argparse.Namespace, env: dict[str, str]) -> dict:
    run_dir = out / name
    cmd = [sys.executable, "-m", "openseek_hal", "train", "--steps", str(args.steps), "--batch-size",
           str(args.batch_size), "--seq-len", str(args.seq_len), "--out", str(run_dir), *COMMON, *extra]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = 124, f"{(e.stdout or b'').decode(errors='replace')}{(e.stderr or b'').decode(errors='replace')}" \
                        f"\ntimed out after {args.timeout} s"
    (out / f"{name}.log").write_text(text)
    row: dict = {"run": name, "command": " ".join(cmd[1:]), "rc": rc, "wall_s": round(time.perf_counter() - t0, 1)}
    if rc != 0:
        row["error"] = text.strip().splitlines()[-1:] or ["?"]
        return row
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    row["losses"] = [m["loss"] for m in steps]
    last = steps[-1]
    row["tokens_per_s"] = last.get("tokens_per_s")
    row["phases_ms"] = {k: last[k] for k in last if k.endswith("_ms")}
    row["val_loss"] = next((m["val_loss"] for m in metrics if "val_loss" in m), None)
    row["header"] = [line for line in text.splitlines() if line.startswith(("openseek-hal train", "model:"))]
    return row


def environment() -> dict:
    from openseek_hal.provenance import cuda_devices, provenance

    return {**provenance(), "cpu_count": os.cpu_count(), **cuda_devices()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=8, help="global batch (sequences per step)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds per run")
    ap.add_argument("--device-backend", default="cuda",
                    help="rank 0's backend (cuda; 'cpu' only to smoke-test this script without a GPU)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OPENSEEK_HAL_CACHE=str(args.out / "cache"),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) - 2))))
    env.pop("OPENSEEK_HAL_BACKEND", None)
    t0 = time.perf_counter()
    rows = []
    # the reference first: it also trains the tokenizer into the shared cache
    dev = args.device_backend
    for name, extra in (("one", ["--backend", dev, "--set", "dtype=fp32"]),
                        ("two_kind", ["-n", "2", "--backend", f"{dev},cpu", "--set", "dtype=fp32"] if dev == "cpu"
                         else ["-n", "2", "--backend", f"{dev},cpu"])):
        rows.append(run(name, args.out, extra, args, env))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "losses"}), flush=True)
    one, two = rows
    result: dict = {"env": environment(), "steps": args.steps, "global_batch_size": args.batch_size,
                    "seq_len": args.seq_len, "omp_num_threads": env["OMP_NUM_THREADS"], "runs": rows,
                    "total_wall_s": round(time.perf_counter() - t0, 1)}
    ok = one["rc"] == 0 and two["rc"] == 0 and len(one["losses"]) == len(two["losses"])
    if ok:
        diffs = [abs(a - b) for a, b in zip(one["losses"], two["losses"])]
        result["max_abs_loss_diff"] = max(diffs)
        result["max_rel_loss_diff"] = max(d / abs(a) for d, a in zip(diffs, one["losses"]))
        result["first_step_abs_loss_diff"] = diffs[0]
    (args.out / "two_kind_train.json").write_text(json.dumps(result, indent=1))

    print(f"\nsteps {args.steps}, batch {args.batch_size} x {args.seq_len}, card {result['env'].get('card')}, "
          f"commit {str(result['env'].get('commit'))[:10]}")
    print(f"{'run':<10} {'rc':>3} {'first loss':>11} {'last loss':>10} {'tokens/s':>10} {'wall s':>7}")
    for r in rows:
        if r["rc"]:
            print(f"{r['run']:<10} {r['rc']:>3} failed: {r.get('error')}")
            continue
        print(f"{r['run']:<10} {r['rc']:>3} {r['losses'][0]:>11.6f} {r['losses'][-1]:>10.6f} "
              f"{r['tokens_per_s']:>10,.0f} {r['wall_s']:>7.1f}")
    if ok:
        print(f"max |loss diff| over {len(one['losses'])} steps: {result['max_abs_loss_diff']:.3e} "
              f"(relative {result['max_rel_loss_diff']:.3e}; step 1: {result['first_step_abs_loss_diff']:.3e})")
    print(f"wrote {args.out / 'two_kind_train.json'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
