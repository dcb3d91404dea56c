"""Render bench JSON files (``openseek-hal bench --json``) as one Markdown table.

    python benchmarks/ops/render.py results/run1.json [results/run2.json ...] > results.md

A later file's rows replace an earlier file's rows of the same op (a kernel re-measured after a change).
"""

from __future__ import annotations

import json
import sys

ORDER = ("eager", "compile", "flaggems", "liger", "torch-fused", "sdpa", "flex", "torch-bf16", "torch-grouped-mm-bf16")


def render(paths: list[str]) -> str:
    runs = [json.load(open(p)) for p in paths]
    rows: dict[str, list[dict]] = {}
    for run in runs:
        by_op: dict[str, list[dict]] = {}
        for r in run["rows"]:
            by_op.setdefault(r["op"], []).append(r)
        rows.update(by_op)
    names = [n for n in ORDER if any(n in r["baselines"] for rs in rows.values() for r in rs)]
    copies = ", ".join(f"{run['copy_bandwidth_GBps']:.0f}" for run in runs)
    lines = [f"Device: {runs[0]['device']}, torch {runs[0]['torch']}, Triton {runs[0]['triton']}; "
             f"copy bandwidth measured in each run: {copies} GB/s.",
             "", "Speedup columns: baseline time / our time (above 1.00x: ours is faster).", "",
             "| op | shape | dir | ms | GB/s | % copy | " + " | ".join(f"vs {n}" for n in names) + " |",
             "|---|---|---|---:|---:|---:|" + "---:|" * len(names)]
    for rs in rows.values():
        for r in rs:
            cells = [r["op"], r["shape"], r["dir"], f"{r['ours_ms']:.3f}",
                     f"{r['GBps']:.0f}" if r["GBps"] else "-", f"{r['pct_copy']:.0f}" if r["pct_copy"] else "-"]
            for n in names:
                b = r["baselines"].get(n)
                cells.append(f"{b['speedup']:.2f}x" if b and "speedup" in b else "-")
            lines.append("| " + " | ".join(cells) + " |")
    for run in runs:
        for shape, mem in run.get("cross_entropy_extra_peak_bytes", {}).items():
            lines += ["", f"cross_entropy {shape}, extra peak memory of one forward+backward (MiB): "
                      + ", ".join(f"{k} {v / 2**20:.1f}" if isinstance(v, int) else f"{k} {v}" for k, v in mem.items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render(sys.argv[1:]))
