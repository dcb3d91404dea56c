"""Does a training variant's loss curve stay inside the baseline's seed-to-seed band?

    OPENSEEK_HAL_COMMIT=<sha> python benchmarks/train/loss_band.py --out DIR [--steps 300] [--seeds 0,1,2]
        [--candidates fp8,fp32moments] [--candidate-seeds 0,1,2]

The baseline (the trainer's default regime) trains once per seed; each candidate (a named set of config
overrides, below) trains at the first seed, or at each of ``--candidate-seeds`` (baseline seeds: each
candidate run has a baseline twin with its initial weights and batches, and the paired gaps over the seeds
give the candidate's cost with its seed-to-seed spread). Each curve is smoothed by a trailing mean over
``--window`` steps (a single step's loss is mostly its batch's noise); the band at step t is where one more
baseline seed's curve would land with 95% probability (Student t over the seeds, ``band_verdict``). A
candidate is inside when its smoothed loss lies in the band at 95% of the steps from ``--window`` on; the
report gives that fraction, the worst excursion in units of the band's half-width, and the validation loss
at the end next to the baseline runs'. Three seeds give a wide band (t = 4.3); more seeds narrow it.

Data: a generated corpus that has something to learn beyond token frequencies (``structured_ids``): Zipf
unigrams, each token's few favoured successors, and spans copied from earlier in the document (which only
attention can predict), over ``--vocab`` ids (the real openseek-small vocabulary by default), tokenized by
``openseek-hal data tokenize`` into shards. Writes ``loss_band.json`` (card, versions, commit, command, every
run's losses, the verdicts) and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from bench_train import VOCAB, environment, run_train, write_corpus

CANDIDATES = {
    # name: config overrides on top of the baseline's
    "fp8": ["fp8=true"],
    # where FP8's loss goes (`fp8_exclude`): only the routed experts in fp8 (every linear layer's name has
    # "proj"), only attention (the MLPs and experts excluded), and all but attention's output projection
    # (whose input DeepSeek-V3 keeps in a wider format)
    "fp8-experts-only": ["fp8=true", "fp8_exclude=*proj*"],
    "fp8-attention-only": ["fp8=true", "fp8_exclude=*.mlp.*"],
    "fp8-keep-oproj": ["fp8=true", "fp8_exclude=*.o_proj"],
    "bf16moments": ["moment_dtype=bf16"],  # the GPU default (moment_dtype: auto); on the CPU a candidate
    "fp32moments": ["moment_dtype=master"],
    "full-master": ["master_remainder=false"],
    "autocast": ["dtype=autocast"],
}


def structured_ids(n_tokens: int, vocab: int, seed: int = 0) -> list[np.ndarray]:
    """Documents of ids in ``[1, vocab)``: after each token, with probability 1/2 one of its 4 favoured
    successors (Zipf over the 4), else with probability 0.01 the start of a copy of 8-32 earlier tokens of
    the document, else a Zipf-distributed draw over the vocabulary."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, vocab)
    unigram = 1.0 / (ranks + 10.0)
    unigram /= unigram.sum()
    successors = rng.integers(1, vocab, size=(vocab, 4))
    pick = np.array([1.0, 0.5, 0.33, 0.25])
    pick /= pick.sum()
    docs, written = [], 0
    while written < n_tokens:
        n = int(rng.integers(500, 3000))
        draws = rng.choice(ranks, size=n, p=unigram)
        u = rng.random(n)
        which = rng.choice(4, size=n, p=pick)
        doc = np.empty(n, dtype=np.int64)
        doc[0] = draws[0]
        i = 1
        while i < n:
            if u[i] < 0.5:
                doc[i] = successors[doc[i - 1], which[i]]
            elif u[i] < 0.51 and i > 64:
                length = min(int(rng.integers(8, 33)), n - i)
                start = int(rng.integers(0, i - length)) if i > length else 0
                doc[i:i + length] = doc[start:start + length]
                i += length
                continue
            else:
                doc[i] = draws[i]
            i += 1
        docs.append(doc)
        written += n + 1
    return docs


def smooth(losses: list[float], window: int) -> np.ndarray:
    """Trailing mean over ``window`` steps: element t is the mean of steps t-window+1..t (NaN before)."""
    x = np.asarray(losses, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(x)])
    out = np.full(len(x), np.nan)
    out[window - 1:] = (c[window:] - c[:-window]) / window
    return out


# Student t's 0.975 quantile by degrees of freedom (seeds - 1): the two-sided 95% prediction interval
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def band_verdict(baseline: list[list[float]], candidate: list[float], window: int, need: float = 0.95,
                 twin: int | None = 0) -> dict:
    """Compare a candidate's smoothed curve with the baseline seeds' band.

    The band at step t is the 95% prediction interval of one more baseline run from the seeds' smoothed
    losses there: ``mean +- t_{0.975, n-1} * sd * sqrt(1 + 1/n)`` (n seeds, sample sd): where a new seed's
    curve lands 19 times in 20 if it is the same regime. The candidate is inside when its smoothed loss is
    in the band at ``need`` of the steps from ``window`` on. Also reported: the fraction inside the seeds'
    plain range (min..max), and the worst excursion in units of the band's half-width.

    With ``twin`` (the index of the baseline run with the candidate's seed: the same initial weights and
    batches), the paired difference too: candidate minus twin, smoothed, at the last step and on average,
    and that average in units of the seeds' mean sd. Few seeds make a wide band; a twin cancels the
    seed's own luck, so a steady gap shows there long before it leaves the band.
    """
    curves = np.stack([smooth(b, window) for b in baseline])
    n = len(curves)
    if n < 2:
        raise ValueError("a band needs at least two baseline runs")
    steps = np.arange(window - 1, len(candidate))
    seeds = curves[:, steps]
    mean = seeds.mean(axis=0)
    half = np.maximum(T975.get(n - 1, 1.96) * seeds.std(axis=0, ddof=1) * np.sqrt(1 + 1 / n), 1e-12)
    cand = smooth(candidate, window)[steps]
    outside = np.maximum(np.abs(cand - mean) - half, 0.0) / half
    inside = outside == 0.0
    in_range = (cand >= seeds.min(axis=0)) & (cand <= seeds.max(axis=0))
    out = {"inside": bool(inside.mean() >= need), "fraction_inside": float(inside.mean()),
           "fraction_inside_seed_range": float(in_range.mean()),
           "worst_excursion_half_widths": float(outside.max()),
           "first_step_outside": None if inside.all() else int(steps[np.argmin(inside)]) + 1,
           "mean_half_width": float(half.mean()), "last_window_mean": float(cand[-1]),
           "baseline_last_window_mean": float(mean[-1])}
    if twin is not None:
        gap = cand - seeds[twin]
        out |= {"paired_gap_last_window": float(gap[-1]), "paired_gap_mean": float(gap.mean()),
                "paired_gap_mean_in_seed_sd": float(gap.mean() / seeds.std(axis=0, ddof=1).mean())}
    return out


def _key(name: str, seed: int, cand_seeds: list[int]) -> str:
    """A verdict's key: the candidate's name at the first candidate seed, ``name@seed`` at the others."""
    return name if seed == cand_seeds[0] else f"{name}@{seed}"


def run(name: str, sets: list[str], seed: int, args: argparse.Namespace, data: Path) -> dict:
    train_args = ["--backend", args.backend, "--model", args.model, "--data", str(data), "--steps", str(args.steps),
                  "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
    settings = ["save=false", "log_every=1", f"eval_batches={args.eval_batches}", "sample_tokens=1",
                f"warmup_steps={args.warmup}", f"lr={args.lr}", f"seed={seed}", *args.set, *sets]
    record, rows = run_train(train_args, settings, args.out / f"run-{name}-seed{seed}",
                             args.out / f"{name}-seed{seed}.log")
    result = {"name": name, "seed": seed, **record}
    if not rows:
        return result
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    result["losses"] = [losses[s] for s in range(1, args.steps + 1)]
    result["val_loss"] = next(r["val_loss"] for r in reversed(rows) if "val_loss" in r)
    result["tokens_per_s"] = next((r["tokens_per_s"] for r in reversed(rows) if r.get("tokens_per_s")), None)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", default="0,1,2", help="the baseline's seeds; candidates train at the first")
    ap.add_argument("--candidates", default="fp8,fp32moments", help=f"comma-separated, of {', '.join(CANDIDATES)}")
    ap.add_argument("--candidate-seeds", default=None,
                    help="baseline seeds each candidate trains at (default: the first of --seeds)")
    ap.add_argument("--window", type=int, default=20, help="steps of the trailing mean")
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--model", default="openseek-small")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--eval-batches", type=int, default=4)
    ap.add_argument("--set", action="append", default=["model.num_nextn_predict_layers=0"],
                    help="a config override for every run (repeatable)")
    ap.add_argument("--vocab", type=int, default=VOCAB)
    ap.add_argument("--data-tokens", type=int, default=3_000_000)
    ap.add_argument("--data", type=Path, default=Path("/tmp/openseek-band-data"))
    args = ap.parse_args(argv)
    unknown = [c for c in args.candidates.split(",") if c and c not in CANDIDATES]
    if unknown:
        ap.error(f"unknown candidate {unknown[0]!r}: one of {', '.join(CANDIDATES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(seeds) < 2:
        ap.error("--seeds needs at least two seeds (the band is their spread)")
    if args.steps < args.window:
        ap.error("--steps must be at least --window")
    cand_seeds = [int(s) for s in args.candidate_seeds.split(",")] if args.candidate_seeds else seeds[:1]
    if not set(cand_seeds) <= set(seeds):
        ap.error("--candidate-seeds must be among --seeds (each candidate run is compared with its twin)")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = write_corpus(args.data, structured_ids(args.data_tokens, args.vocab), args.vocab)
    print(f"data ready in {time.perf_counter() - t0:.0f}s", flush=True)
    runs: list[dict] = []
    report = {"env": environment(), "command": " ".join(sys.argv), "window": args.window, "runs": runs,
              "verdicts": {}, "paired_gaps": {}}

    def record(result: dict) -> dict:
        runs.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)
        (args.out / "loss_band.json").write_text(json.dumps(report, indent=1))
        return result

    baseline = [record(run("baseline", [], s, args, data)) for s in seeds]
    ok_seeds = [s for s, b in zip(seeds, baseline) if b["rc"] == 0]
    ok = [b["losses"] for b in baseline if b["rc"] == 0]
    for name in filter(None, args.candidates.split(",")):
        for seed in cand_seeds:
            cand = record(run(name, CANDIDATES[name], seed, args, data))
            if cand["rc"] == 0 and len(ok) >= 2:  # compared with its twin (the same seed's baseline), if that ran
                report["verdicts"][_key(name, seed, cand_seeds)] = band_verdict(
                    ok, cand["losses"], args.window, twin=ok_seeds.index(seed) if seed in ok_seeds else None)
        gaps = [v["paired_gap_mean"] for seed in cand_seeds
                if "paired_gap_mean" in (v := report["verdicts"].get(_key(name, seed, cand_seeds), {}))]
        if gaps:
            report["paired_gaps"][name] = {"seeds": len(gaps), "mean_of_paired_gap_means": float(np.mean(gaps)),
                                           "sd": float(np.std(gaps, ddof=1)) if len(gaps) > 1 else None}
    (args.out / "loss_band.json").write_text(json.dumps(report, indent=1))
    print(f"\n{'run':<16} {'seed':>4} {'tok/s':>10} {'loss@end':>9} {'val loss':>9} {'inside':>7} {'worst':>6} "
          f"{'vs twin':>8}")
    for r in runs:
        if r["rc"]:
            print(f"{r['name']:<16} {r['seed']:>4} failed: {r.get('error')}")
            continue
        v = report["verdicts"].get(_key(r["name"], r["seed"], cand_seeds)) if r["name"] != "baseline" else None
        tail = smooth(r["losses"], args.window)[-1]
        inside = f"{100 * v['fraction_inside']:>6.1f}%" if v else f"{'band':>7}"
        worst = f"{v['worst_excursion_half_widths']:>6.2f}" if v else f"{'':>6}"
        gap = f"{v['paired_gap_last_window']:>+8.4f}" if v and "paired_gap_last_window" in v else f"{'':>8}"
        print(f"{r['name']:<16} {r['seed']:>4} {r.get('tokens_per_s') or float('nan'):>10,.0f} {tail:>9.4f} "
              f"{r['val_loss']:>9.4f} {inside} {worst} {gap}")
    for name, g in report["paired_gaps"].items():
        spread = f" +- {g['sd']:.4f} (sd over seeds)" if g["sd"] is not None else ""
        print(f"{name}: mean paired gap to its twins {g['mean_of_paired_gap_means']:+.4f}{spread}, "
              f"{g['seeds']} seed(s)")
    failed = any(r["rc"] for r in runs) or len(ok) < 2
    return 1 if failed or not all(v["inside"] for v in report["verdicts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
