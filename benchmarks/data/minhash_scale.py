"""Scale run of the staged `dedup-minhash`: N small generated documents, peak RSS and documents per second.

    python benchmarks/data/minhash_scale.py --docs 1000000 --work /tmp/mhscale [--workers 2] [--max-memory 1G]

Writes ``--files`` JSONL inputs of small documents (half English words, half Chinese characters, a
fifth of them edited copies of a recent one), runs ``openseek-hal data dedup-minhash`` on them as a
child process, and samples the resident memory of the job's whole process tree (main process plus
workers, from /proc) every 0.1 s. Prints one JSON line: documents, wall and CPU seconds (the job and
its workers), docs/s, peak RSS (sum over the tree, and the largest single process), removed documents.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

from record import provenance  # noqa: E402 (this folder is on sys.path when run as a script)

WORDS = [
    "".join(random.Random(i).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(3 + i % 6)) for i in range(5000)
]
HAN = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]


def generate(folder: Path, docs: int, files: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    recent: list[list[str]] = []
    per_file = -(-docs // files)
    n = 0
    for k in range(files):
        with open(folder / f"in-{k:03d}.jsonl", "w", encoding="utf-8") as fh:
            for _ in range(min(per_file, docs - n)):
                if recent and rng.random() < 0.2:
                    toks = list(rng.choice(recent))
                    for _ in range(rng.randrange(1, 3)):
                        toks[rng.randrange(len(toks))] = rng.choice(WORDS if toks[0].isascii() else HAN)
                elif n % 2:
                    toks = [rng.choice(HAN) for _ in range(rng.randrange(40, 100))]
                else:
                    toks = [rng.choice(WORDS) for _ in range(rng.randrange(25, 60))]
                recent = (recent + [toks])[-1000:]
                text = (" " if toks[0].isascii() else "").join(toks)
                fh.write(json.dumps({"id": n, "text": text}, ensure_ascii=False) + "\n")
                n += 1


def _tree_rss(root: int) -> tuple[int, int]:
    """(sum, max) resident bytes over ``root`` and its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            ppid, pages = int(fields[1]), int(fields[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = pages * os.sysconf("SC_PAGE_SIZE")
    total, peak, todo = 0, 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        peak = max(peak, rss.get(pid, 0))
        todo += children.get(pid, [])
    return total, peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=10)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mhscale"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-memory", default="1G")
    ap.add_argument("--extra", nargs="*", default=[], help="more dedup-minhash flags")
    ap.add_argument("--record", type=Path, help="append the result line, with provenance, to this JSON-lines file")
    args = ap.parse_args()
    inputs = args.work / f"in-{args.docs}"
    if not (inputs / "in-000.jsonl").exists():
        t = time.perf_counter()
        generate(inputs, args.docs, args.files)
        print(f"generated {args.docs} docs in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    out = args.work / "out"
    cmd = ["openseek-hal", "data", "dedup-minhash", str(inputs), "-o", str(out), "--workers", str(args.workers),
           "--max-memory", args.max_memory, *args.extra]
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    # The checkout this script is in, not whatever an installed openseek-hal points at.
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, env=env)
    work_peak = 0
    peak_sum = peak_one = 0
    while proc.poll() is None:
        s, m = _tree_rss(proc.pid)
        peak_sum, peak_one = max(peak_sum, s), max(peak_one, m)
        work_peak = max(work_peak, _folder_bytes(out))
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode:
        sys.exit(proc.returncode)
    stats = json.loads((out / "stats.json").read_text())
    row = {
        "command": " ".join(cmd), "docs": stats["docs_in"], "removed": stats["removed"], "seconds": round(seconds, 1),
        "docs_per_second": round(stats["docs_in"] / seconds),
        "cpu_seconds": round(cpu, 1),
        "docs_per_cpu_second": round(stats["docs_in"] / cpu), "peak_rss_tree_mb": round(peak_sum / 2**20),
        "peak_rss_largest_process_mb": round(peak_one / 2**20), "lsh": stats["config"].get("lsh", {}).get("bands"),
        "verify_threshold": stats["config"].get("verify_threshold"), "sketch_size": stats["config"].get("sketch_size"),
        "pairs_verified": stats.get("pairs_verified"), "pairs_accepted": stats.get("pairs_accepted"),
        "output_folder_peak_mb": round(work_peak / 2**20),
    }
    print(json.dumps(row))
    if args.record:
        row["provenance"] = provenance([inputs])
        args.record.parent.mkdir(parents=True, exist_ok=True)
        with open(args.record, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")


def _folder_bytes(folder: Path) -> int:
    """Bytes in the files under ``folder`` (the staging and work folders included), 0 if absent."""
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


if __name__ == "__main__":
    main()
