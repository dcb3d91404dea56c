"""Exact-substring dedup benchmark: throughput and peak memory of `openseek-hal data dedup-exact`.

The corpus is built from the same real sentences as ``minhash_bench.py`` (English docstrings, Chinese
gettext catalogs and man pages on this machine); a quarter of the documents get one of 200 boilerplate
blocks (real text too, 150-600 bytes) inserted at a random place, so the repeated bytes are known.
The stage runs in a subprocess; peak RSS is reported in full and above the process's RSS just before
the run (Python, numpy, torch via the package, pydivsufsort, rich), against the corpus size and the
suffix array size.

Usage:  python benchmarks/data/exact_bench.py --mb 64 --work /tmp/exbench
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from minhash_bench import chinese_sentences, english_sentences  # noqa: E402
from record import provenance  # noqa: E402


def build(path: Path, target_bytes: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    pools = {"en": english_sentences(), "zh": chinese_sentences()}
    blocks = []
    for _ in range(200):
        lang = rng.choice(["en", "zh"])
        text = ""
        while len(text.encode()) < rng.randint(150, 600):
            text += rng.choice(pools[lang]) + (" " if lang == "en" else "")
        blocks.append(text)
    size = injected = n = 0
    with open(path, "w", encoding="utf-8") as fh:
        while size < target_bytes:
            lang = "en" if n % 2 == 0 else "zh"
            sents = [rng.choice(pools[lang]) for _ in range(rng.randint(8, 20))]
            if rng.random() < 0.25:
                block = rng.choice(blocks)
                sents.insert(rng.randrange(len(sents) + 1), block)
                injected += len(block.encode())
            text = (" " if lang == "en" else "").join(sents)
            fh.write(json.dumps({"id": n, "text": text}, ensure_ascii=False) + "\n")
            size += len(text.encode())
            n += 1
    return {"docs": n, "text_bytes": size, "boilerplate_bytes_inserted": injected}


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(corpus: Path, out: Path, min_bytes: int, low_memory: bool) -> None:
    import pydivsufsort  # noqa: F401 - fixed-size imports happen before the baseline RSS
    import rich.progress  # noqa: F401

    from openseek_hal.data.dedup_exact import dedup_exact
    from openseek_hal.data.runner import OutputOptions

    base = rss_mb()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    stats = dedup_exact(
        [str(corpus)], OutputOptions(out, quiet=True), min_bytes=min_bytes, low_memory=low_memory
    )
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    peak = cpu1.ru_maxrss / 1024
    print(
        json.dumps(
            {
                "wall_s": wall,
                "cpu_s": cpu,
                "rss_before_mb": base,
                "peak_rss_mb": peak,
                "bytes_in": stats.bytes_in,
                "bytes_removed": stats.extra["bytes_removed"],
                "docs_changed": stats.extra["docs_changed"],
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=64)
    ap.add_argument("--min-bytes", type=int, default=100)
    ap.add_argument("--work", type=Path, default=Path("/tmp/exbench"))
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--low-memory", action="store_true")
    ap.add_argument("--record", type=Path, help="also append the result, with provenance, to this JSON-lines file")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    corpus = args.work / f"corpus_{args.mb}mb.jsonl"
    if args.child:
        return child(corpus, args.work / "out", args.min_bytes, args.low_memory)
    info_path = corpus.with_suffix(".info.json")
    if not info_path.exists():
        info_path.write_text(json.dumps(build(corpus, args.mb << 20)))
    info = json.loads(info_path.read_text())
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--mb",
        str(args.mb),
        "--min-bytes",
        str(args.min_bytes),
        "--work",
        str(args.work),
    ] + (["--low-memory"] if args.low_memory else [])
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    run = json.loads(res.stdout.strip().splitlines()[-1])
    corpus_mb = info["text_bytes"] / 2**20
    sa_mb = info["text_bytes"] * (4 if info["text_bytes"] < 2**31 else 8) / 2**20
    result = {
        **info,
        **run,
        "corpus_mb": corpus_mb,
        "suffix_array_mb": sa_mb,
        "mb_per_s_wall": corpus_mb / run["wall_s"],
        "mb_per_s_cpu": corpus_mb / run["cpu_s"],
        "peak_above_start_mb": run["peak_rss_mb"] - run["rss_before_mb"],
    }
    result["peak_above_start_over_corpus_plus_sa"] = result["peak_above_start_mb"] / (corpus_mb + sa_mb)
    result["low_memory"] = args.low_memory
    (args.work / f"results{'_low_memory' if args.low_memory else ''}.json").write_text(
        json.dumps(result, indent=2)
    )
    print(json.dumps(result, indent=2))
    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        with open(args.record, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({**result, "provenance": provenance([corpus], ("numpy", "pydivsufsort"))}) + "\n")


if __name__ == "__main__":
    main()
