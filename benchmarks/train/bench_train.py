"""Trainer throughput on GPUs, every row in one run: one GPU (the baseline), data parallel (ZeRO-1), expert parallel.

    OPENSEEK_HAL_COMMIT=<sha> python benchmarks/train/bench_train.py --out DIR [--rows 1gpu,dp2,ep2] [--steps 30]
    ... --rows 1gpu,dp8,ep8x8,ep4x8,dp4,ep4x4,1gpu-again      (on an 8-GPU host)

Data: a token-shard folder with the real openseek-small vocabulary (151,872 ids), written by
``openseek-hal data tokenize`` from generated documents with a word-level tokenizer of that size (no
download). Each row is one ``openseek-hal train`` (``--nproc-per-node G`` for several GPUs) on the
``openseek-small`` preset, seq 4096, micro-batch 2 per GPU, no checkpoint; its numbers come from the
last row of the run's ``metrics.jsonl`` (tokens/s over every step after the first, per-device MFU,
peak memory per rank, step-time breakdown, all-to-all time per MoE layer). Writes ``train_bench.json``
(card, versions, commit, command, every row) and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

VOCAB = 151_872


def make_data(folder: Path, n_tokens: int, seed: int = 0) -> Path:
    """A token-shard folder of about ``n_tokens`` tokens over the whole vocabulary (Zipf-like ids)."""
    rng = random.Random(seed)
    ids = range(1, VOCAB)
    cum, total = [], 0.0
    for i in ids:
        total += 1.0 / (i + 9)
        cum.append(total)
    docs, written = [], 0
    while written < n_tokens:
        n = rng.randint(500, 3000)
        docs.append(rng.choices(ids, cum_weights=cum, k=n))
        written += n + 1
    return write_corpus(folder, docs, VOCAB)


def write_corpus(folder: Path, docs: Iterable[Sequence[int]], vocab: int) -> Path:
    """Documents of ids in ``[1, vocab)`` as a token-shard folder (``folder/shards``), through a word-level
    tokenizer whose word ``w<i>`` is id ``i`` (0 is the end of a document) and ``openseek-hal data
    tokenize``: the path a user's data takes. A folder already written is used as it is."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    shards = folder / "shards"
    if (shards / "index.json").is_file():
        return shards
    folder.mkdir(parents=True, exist_ok=True)
    words = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    with (folder / "docs.jsonl").open("w") as f:
        for doc in docs:
            f.write(json.dumps({"text": " ".join(f"w{i}" for i in doc)}) + "\n")
    subprocess.run([sys.executable, "-m", "openseek_hal", "data", "tokenize", str(folder / "docs.jsonl"), "-o",
                    str(shards), "--tokenizer", str(folder / "tokenizer.json"), "--workers", "8", "-q"], check=True)
    return shards


ROWS = {
    # name: (GPUs, extra --set options)
    "1gpu": (1, ["model.num_nextn_predict_layers=0"]),  # the default regime: the step captured (graph_step auto)
    "1gpu-eager": (1, ["model.num_nextn_predict_layers=0", "graph_step=false"]),  # every step launched eagerly
    "1gpu-again": (1, ["model.num_nextn_predict_layers=0"]),  # the baseline once more, last: drift shows
    "1gpu-mtp": (1, []),
    # attention kept inside each document (the data's documents are 500-3,000 tokens: 2-3 a 4,096 window);
    # every layer then takes the flash kernel with the documents' bounds
    "1gpu-docmask": (1, ["model.num_nextn_predict_layers=0", "document_mask=true"]),
    # FP8 linear layers and routed experts (DeepSeek-V3's recipe); compare with "1gpu" in the same run
    "1gpu-fp8": (1, ["model.num_nextn_predict_layers=0", "fp8=true"]),
    # the update of the buckets no collective touches on a side stream, beside the next forward
    "1gpu-overlap": (1, ["model.num_nextn_predict_layers=0", "optimizer_overlap=true"]),
    # fp32 AdamW moments (the default keeps them in bf16 on GPUs, as DeepSeek-V3 does)
    "1gpu-fp32moments": (1, ["model.num_nextn_predict_layers=0", "moment_dtype=master"]),
    # whole fp32 masters (the default keeps them as int16 remainders of the bf16 weights)
    "1gpu-full-master": (1, ["model.num_nextn_predict_layers=0", "master_remainder=false"]),
    "1gpu-autocast-mtp": (1, ["dtype=autocast"]),
    "dp2": (2, ["model.num_nextn_predict_layers=0"]),
    "dp2-bf16reduce": (2, ["model.num_nextn_predict_layers=0", "reduce_dtype=bf16"]),
    # fp32 sums at bf16 traffic: buckets exchanged by all-to-all in bf16, summed by their owners in fp32
    "dp2-a2a": (2, ["model.num_nextn_predict_layers=0", "grad_exchange=all_to_all"]),
    "ep2": (2, ["model.num_nextn_predict_layers=0", "expert_parallel=2"]),
    "ep2-overlap": (2, ["model.num_nextn_predict_layers=0", "expert_parallel=2", "expert_overlap=true"]),
    # one row per (token, rank) in the all-to-alls instead of one per (token, expert)
    "ep2-tokens": (2, ["model.num_nextn_predict_layers=0", "expert_parallel=2", "expert_dispatch=tokens"]),
    # every token to every rank (all-gather), no split sizes: no host sync per MoE layer
    "ep2-allgather": (2, ["model.num_nextn_predict_layers=0", "expert_parallel=2", "expert_dispatch=allgather"]),
    "ep2-allgather-overlap": (2, ["model.num_nextn_predict_layers=0", "expert_parallel=2",
                                  "expert_dispatch=allgather", "expert_overlap=true"]),
    "ep2-allgather-compile": (2, ["model.num_nextn_predict_layers=0", "expert_parallel=2",
                                  "expert_dispatch=allgather", "compile=true"]),
    "ep2-mtp": (2, ["expert_parallel=2"]),
    "1gpu-compile": (1, ["model.num_nextn_predict_layers=0", "compile=true", "graph_step=false"]),
    "1gpu-graph-compile": (1, ["model.num_nextn_predict_layers=0", "compile=true"]),
    "ep2-compile": (2, ["model.num_nextn_predict_layers=0", "expert_parallel=2", "compile=true"]),
    # steps 10-11 under torch.profiler (run-<row>/profile/): where the time goes, not a throughput row
    "1gpu-profile": (1, ["model.num_nextn_predict_layers=0", "profile_step=10"]),
    "ep2-profile": (2, ["model.num_nextn_predict_layers=0", "expert_parallel=2", "profile_step=10"]),
}


def row_spec(name: str) -> tuple[int, list[str]]:
    """A named row, or ``dpN`` (N GPUs, ZeRO-1) / ``epExN`` (N GPUs, expert parallel E), MTP off."""
    if name in ROWS:
        return ROWS[name]
    m = re.fullmatch(r"dp(\d+)|ep(\d+)x(\d+)", name)
    if not m:
        raise SystemExit(f"unknown row {name!r}: one of {', '.join(ROWS)}, dpN or epExN")
    if m.group(1):
        return int(m.group(1)), ["model.num_nextn_predict_layers=0"]
    return int(m.group(3)), ["model.num_nextn_predict_layers=0", f"expert_parallel={m.group(2)}"]


def run_row(name: str, data: Path, out: Path, steps: int, micro: int, seq: int) -> dict:
    gpus, sets = row_spec(name)
    run_dir = out / f"run-{name}"
    args = ["--backend", "cuda", "--model", "openseek-small", "--data", str(data), "--steps", str(steps),
            "--batch-size", str(micro * gpus), "--seq-len", str(seq), "--nproc-per-node", str(gpus)]
    settings = ["save=false", "log_every=" + str(steps), "eval_batches=1", "sample_tokens=1", "warmup_steps=2",
                "lr=3e-4", *sets]
    record, metrics = run_train(args, settings, run_dir, out / f"{name}.log")
    row = {"row": name, "gpus": gpus, **record}
    if metrics:
        row.update(next(m for m in reversed(metrics) if "tokens_per_s" in m))
    return row


def run_train(args: list[str], settings: list[str], run_dir: Path, log: Path) -> tuple[dict, list[dict]]:
    """One ``openseek-hal train`` subprocess (``args``, each of ``settings`` as a ``--set``) writing to
    ``run_dir``, its output kept in ``log``. Returns its record (command, exit status, wall time and, when it
    failed, the last line of its output as ``error``) and the rows of its ``metrics.jsonl`` ([] on failure)."""
    cmd = [sys.executable, "-m", "openseek_hal", "train", *args, "--out", str(run_dir)]
    for s in settings:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    record = {"command": " ".join(cmd[1:]), "rc": proc.returncode, "wall_s": time.perf_counter() - t0}
    if proc.returncode != 0:
        record["error"] = ((proc.stderr or proc.stdout).strip().splitlines() or ["?"])[-1]
        return record, []
    return record, [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def environment() -> dict:
    from openseek_hal.provenance import cuda_devices, provenance

    return {**provenance(), **cuda_devices()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", default="1gpu,1gpu-mtp,dp2,ep2")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--data-tokens", type=int, default=6_000_000)
    ap.add_argument("--data", type=Path, default=Path("/tmp/openseek-bench-data"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "warmup").mkdir(exist_ok=True)
    t0 = time.perf_counter()
    data = make_data(args.data, args.data_tokens)
    print(f"data ready in {time.perf_counter() - t0:.0f}s", flush=True)
    # compile every Triton kernel once (the cache is shared by the runs), so no row pays for it
    warm = run_row("1gpu", data, args.out / "warmup", 3, args.micro_batch, args.seq_len)
    print(f"warm-up run: rc {warm['rc']} in {warm['wall_s']:.0f}s", flush=True)
    rows = []
    for name in args.rows.split(","):
        rows.append(run_row(name, data, args.out, args.steps, args.micro_batch, args.seq_len))
        print(json.dumps(rows[-1]), flush=True)
        (args.out / "train_bench.json").write_text(json.dumps({"env": environment(), "rows": rows}, indent=1))
    base = next((r.get("tokens_per_s") for r in rows if r["row"] == "1gpu"), None)
    print(f"\n{'row':<20} {'GPUs':>4} {'tok/s':>10} {'x 1gpu':>7} {'MFU/dev':>8} {'peak MiB':>9} "
          f"{'step':>6} {'fwd':>6} {'bwd':>6} {'gsync':>6} {'opt':>6} {'opt side':>8} {'wsync':>6} "
          f"{'a2a/layer':>9} {'hidden':>6} "
          f"{'last loss':>10}")
    for r in rows:
        if r["rc"]:
            print(f"{r['row']:<20} failed: {r.get('error')}")
            continue
        speedup = r["tokens_per_s"] / base if base else float("nan")
        print(f"{r['row']:<20} {r['gpus']:>4} {r['tokens_per_s']:>10,.0f} {speedup:>7.2f} "
              f"{100 * r.get('mfu', float('nan')):>7.1f}% {r.get('peak_memory_mib', 0):>9,.0f} "
              f"{step_ms(r):>6.1f} {r.get('forward_ms', 0):>6.1f} {r.get('backward_ms', 0):>6.1f} "
              f"{r.get('grad_sync_ms', 0):>6.1f} "
              f"{r.get('optimizer_ms', 0):>6.1f} {r.get('optimizer_overlapped_ms', 0):>8.1f} "
              f"{r.get('weight_sync_ms', 0):>6.1f} "
              f"{r.get('a2a_ms_per_layer', float('nan')):>9.2f} {r.get('a2a_hidden_fraction', float('nan')):>6.2f} "
              f"{r.get('loss', float('nan')):>10.6f}")


def step_ms(row: dict) -> float:
    """Device time of a step: a captured step's (graph_step) as timed, else the sum of the phases on the
    compute stream."""
    if row.get("step_ms"):
        return row["step_ms"]
    return sum(row.get(f"{k}_ms", 0.0) for k in ("forward", "backward", "grad_sync", "optimizer", "weight_sync"))


if __name__ == "__main__":
    main()
