"""MinHash dedup benchmark: openseek-hal vs datatrove 0.10.1 (4-stage pipeline) vs datasketch 2.0.0.

``ours`` is ``dedup-minhash`` with its defaults (16 x 6 bands, candidate verification with 256-value
sketches, the staged path, one worker); ``ours-noverify`` the same with ``--no-verify``; ``ours-14x8``
the configuration of the first recorded run (14 x 8, unverified, one-process path).

Builds a mixed English/Chinese corpus from real text found on this machine (English: Python's own
docstrings and ``pydoc_data.topics``; Chinese: the zh_CN gettext catalogs under /usr/share/locale and
the zh_CN man pages), with known duplicate clusters made by seeded edits (word/character deletions,
insertions, substitutions, sentence swaps, truncation). Then runs each tool on one worker, in a
subprocess of its own (wall time, CPU time and peak RSS are the child's; on a shared machine CPU
time is the fairer speed measure), and scores the kept documents:

- precision: of the removed documents, the share with another member of their true cluster kept;
- precision_j08: of the removed documents, the share with a kept member of their cluster at Jaccard >= 0.8;
- recall: of the same-cluster pairs with word-5-gram Jaccard >= 0.8 (Han characters count as words),
  the share where the tool did not keep both; reported for all, English and Chinese pairs.

Benchmark-only dependencies (not in any extra):  pip install datatrove==0.10.1 datasketch==2.0.0 spacy
Usage:  python benchmarks/data/minhash_bench.py all --docs 50000 --work /tmp/mhbench [--tools ours,datatrove]
        [--record benchmarks/data/results/NAME.json]   (the rows plus provenance: commit, command, machine)
"""

from __future__ import annotations

import argparse
import ast
import gettext
import glob
import gzip
import json
import random
import re
import resource
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from record import provenance  # noqa: E402 (this folder is on sys.path when run as a script)

HAN = re.compile(r"[\u4e00-\u9fff]")


# ----------------------------------------------------------------------------------------------- corpus
def english_sentences() -> list[str]:
    from pydoc_data.topics import topics

    texts = list(topics.values())
    root = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(root.rglob("*.py")):
        if {"site-packages", "test", "tests"} & set(f.parts):
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef):
                if doc := ast.get_docstring(node):
                    texts.append(doc)
    out = []
    for t in texts:
        for s in re.split(r"(?<=[.!?])\s+", t):
            s = " ".join(s.split())
            # Prose sentences only: long runs without a full stop are code or tables, shared by many docs.
            if 6 <= len(s.split()) <= 40 and len(re.findall(r"[a-z]", s)) >= 0.6 * len(s):
                out.append(s)
    return _distinct(out)


def _distinct(sentences: list[str]) -> list[str]:
    """One sentence per normalized form, so different base documents never share near-identical text."""
    from openseek_hal.data.text import normalize

    seen: dict[str, str] = {}
    for s in sorted(sentences):
        seen.setdefault(normalize(s), s)
    return sorted(seen.values())


def chinese_sentences() -> list[str]:
    out = []
    for mo in sorted(glob.glob("/usr/share/locale/zh_CN/LC_MESSAGES/*.mo")):
        try:
            catalog = gettext.GNUTranslations(open(mo, "rb"))._catalog
        except OSError:
            continue
        for v in catalog.values():
            if isinstance(v, str):
                for s in re.split(r"(?<=[。！？；\n])", v):
                    if _chinese_prose(s := s.strip()):
                        out.append(s)
    for f in sorted(glob.glob("/usr/share/man/zh_CN/*/*")):
        raw = (
            gzip.open(f, "rt", errors="ignore").read()
            if f.endswith(".gz")
            else open(f, errors="ignore").read()
        )
        raw = re.sub(r"\\f[BIRP]|\\-|^\.\S+ ?", "", raw, flags=re.M)
        for s in re.split(r"(?<=[。！？；])", raw):
            if _chinese_prose(s := " ".join(s.split())):
                out.append(s)
    return _distinct(out)


def _chinese_prose(s: str) -> bool:
    return 8 <= len(HAN.findall(s)) <= 80 and len(HAN.findall(s)) >= 0.7 * len(s)


def _edit(text: str, lang: str, rng: random.Random, strength: float) -> str:
    """Seeded edits: each op touches about ``strength`` of the units (words, or characters for zh)."""
    units = text.split(" ") if lang == "en" else list(text)
    vocab = units[:]
    ops = rng.sample(["delete", "insert", "substitute", "swap", "truncate"], k=rng.randint(1, 3))
    for op in ops:
        n = max(1, int(len(units) * strength * rng.random()))
        if op == "delete":
            for _ in range(n):
                if len(units) > 5:
                    del units[rng.randrange(len(units))]
        elif op == "insert":
            for _ in range(n):
                units.insert(rng.randrange(len(units) + 1), rng.choice(vocab))
        elif op == "substitute":
            for _ in range(n):
                units[rng.randrange(len(units))] = rng.choice(vocab)
        elif op == "swap":  # move one block of units elsewhere (sentence reordering)
            a = rng.randrange(len(units))
            block = units[a : a + max(3, n)]
            del units[a : a + len(block)]
            b = rng.randrange(len(units) + 1)
            units[b:b] = block
        else:
            units = units[: max(5, len(units) - n)]
    return (" " if lang == "en" else "").join(units)


def build_corpus(n_docs: int, path: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    pools = {"en": english_sentences(), "zh": chinese_sentences()}
    docs = []
    n_dups = n_docs // 5
    n_base = n_docs - n_dups
    # Sentences are dealt from a shuffled pool, reshuffled when used up, so each is reused as rarely as
    # the pool size allows and two base documents share a sentence only by chance.
    decks = {lang: [] for lang in pools}

    def deal(lang: str, k: int) -> list[str]:
        while len(decks[lang]) < k:
            fresh = pools[lang][:]
            rng.shuffle(fresh)
            decks[lang] += fresh
        out, decks[lang] = decks[lang][:k], decks[lang][k:]
        return out

    for i in range(n_base):
        lang = "en" if i % 2 == 0 else "zh"
        sents = deal(lang, rng.randint(6, 12) if lang == "en" else rng.randint(10, 20))
        docs.append(
            {"id": f"b{i}", "text": (" " if lang == "en" else "").join(sents), "lang": lang, "cluster": i}
        )
    for j in range(n_dups):
        base = docs[rng.randrange(n_base // 4)]  # a quarter of the bases get all copies: clusters of 1-9
        strength = rng.choice([0.02, 0.05, 0.1, 0.2])
        docs.append(
            {
                "id": f"d{j}",
                "text": _edit(base["text"], base["lang"], rng, strength),
                "lang": base["lang"],
                "cluster": base["cluster"],
            }
        )
    rng.shuffle(docs)
    with open(path, "w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps(d, ensure_ascii=False) + "\n")
    print(
        f"corpus: {len(docs)} docs ({len(pools['en'])} English / {len(pools['zh'])} Chinese "
        f"source sentences) -> {path}",
        file=sys.stderr,
    )


# ------------------------------------------------------------------------------------------------ tools
def _ours(corpus: Path, out: Path, config, in_memory: bool = False) -> list[str]:
    from openseek_hal.data.dedup_minhash import dedup_minhash
    from openseek_hal.data.runner import OutputOptions

    dedup_minhash([str(corpus)], OutputOptions(out, quiet=True), config, workers=1, in_memory=in_memory)
    return [json.loads(line)["id"] for f in sorted(out.glob("part-*")) for line in open(f)]


def run_ours(corpus: Path, work: Path) -> list[str]:
    """The defaults, as ``openseek-hal data dedup-minhash IN -o OUT --workers 1`` runs them."""
    from openseek_hal.data.minhash import MinHashConfig

    return _ours(corpus, work / "ours", MinHashConfig())


def run_ours_noverify(corpus: Path, work: Path) -> list[str]:
    from openseek_hal.data.minhash import MinHashConfig

    return _ours(corpus, work / "ours-noverify", MinHashConfig(verify_threshold=None))


def run_ours_14x8(corpus: Path, work: Path) -> list[str]:
    """The first recorded run's configuration: 14 x 8 (datatrove's layout), unverified, one process."""
    from openseek_hal.data.minhash import MinHashConfig

    config = MinHashConfig(num_bands=14, rows_per_band=8, verify_threshold=None)
    return _ours(corpus, work / "ours-14x8", config, in_memory=True)


def run_datasketch(corpus: Path, work: Path) -> list[str]:
    import re as _re

    from datasketch import MinHash, MinHashLSH

    # The same shingles as the other tools would see: lowercase words, Han characters as words.
    token = _re.compile(r"[\u4e00-\u9fff]|[^\W\u4e00-\u9fff]+")
    lsh = MinHashLSH(num_perm=112, params=(14, 8))
    kept = []
    out = open(work / "datasketch.jsonl", "w", encoding="utf-8")
    for line in open(corpus, encoding="utf-8"):
        doc = json.loads(line)
        toks = token.findall(doc["text"].lower())
        grams = {" ".join(toks[i : i + 5]).encode("utf-8") for i in range(max(1, len(toks) - 4))}
        m = MinHash(num_perm=112, seed=1)
        m.update_batch(list(grams))
        if not lsh.query(m):
            kept.append(doc["id"])
            out.write(line)
        lsh.insert(doc["id"], m)
    out.close()
    return kept


def run_datatrove(corpus: Path, work: Path) -> list[str]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    cfg = MinhashConfig()
    d = work / "datatrove"
    inp = work / "dt_input"
    inp.mkdir(exist_ok=True)
    target = inp / corpus.name
    if not target.exists():
        target.symlink_to(corpus.resolve())
    reader = lambda: JsonlReader(str(inp), compression=None)  # noqa: E731
    stages = [
        [reader(), MinhashDedupSignature(output_folder=str(d / "sigs"), config=cfg)],
        [MinhashDedupBuckets(input_folder=str(d / "sigs"), output_folder=str(d / "buckets"), config=cfg)],
        [MinhashDedupCluster(input_folder=str(d / "buckets"), output_folder=str(d / "remove"), config=cfg)],
        [
            reader(),
            MinhashDedupFilter(input_folder=str(d / "remove")),
            JsonlWriter(str(d / "out"), compression=None),
        ],
    ]
    tasks = [1, cfg.num_buckets, 1, 1]
    for i, (pipeline, n_tasks) in enumerate(zip(stages, tasks)):
        LocalPipelineExecutor(
            pipeline=pipeline, tasks=n_tasks, workers=1, logging_dir=str(d / f"logs{i}"), skip_completed=False
        ).run()
    return [json.loads(line)["id"] for f in sorted((d / "out").rglob("*.jsonl")) for line in open(f)]


TOOLS = {
    "ours": run_ours,
    "ours-noverify": run_ours_noverify,
    "ours-14x8": run_ours_14x8,
    "datatrove": run_datatrove,
    "datasketch": run_datasketch,
}


# Imported before the clock starts: the timing is the work, not the interpreter loading libraries
# (importing openseek_hal loads torch, about 2-5 s on this machine).
PRELOAD = {
    "ours": ["openseek_hal.data.dedup_minhash"],
    "ours-noverify": ["openseek_hal.data.dedup_minhash"],
    "ours-14x8": ["openseek_hal.data.dedup_minhash"],
    "datasketch": ["datasketch"],
    "datatrove": ["datatrove.pipeline.dedup.minhash", "datatrove.executor", "spacy"],
}


def child(tool: str, corpus: Path, work: Path) -> None:
    import importlib

    for module in PRELOAD[tool]:
        importlib.import_module(module)

    def cpu() -> float:
        return sum(
            r.ru_utime + r.ru_stime
            for r in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
        )

    start, cpu_start = time.perf_counter(), cpu()
    kept = TOOLS[tool](corpus, work)
    seconds, cpu_seconds = time.perf_counter() - start, cpu() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (work / f"{tool}.kept.json").write_text(json.dumps(kept))
    (work / f"{tool}.time.json").write_text(
        json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_rss_mb": peak})
    )


# --------------------------------------------------------------------------------------------- scoring
def score(corpus: Path, kept: set[str]) -> dict[str, float]:
    from openseek_hal.data.text import normalize, tokens

    docs = [json.loads(line) for line in open(corpus, encoding="utf-8")]
    by_cluster: dict[int, list[dict]] = {}
    for d in docs:
        by_cluster.setdefault(d["cluster"], []).append(d)
    removed = [d for d in docs if d["id"] not in kept]
    good = sum(1 for d in removed if any(o["id"] in kept for o in by_cluster[d["cluster"]] if o is not d))
    near = {}  # id -> ids of its cluster at Jaccard >= 0.8 (the stricter precision below)
    pairs = {"all": [0, 0], "en": [0, 0], "zh": [0, 0]}
    ideal = 0.0  # what a perfect MinHash with 14x8 LSH would find, pair by pair, without transitivity
    for members in by_cluster.values():
        if len(members) < 2:
            continue
        grams = []
        for m in members:
            t = tokens(normalize(m["text"]))
            grams.append({tuple(t[i : i + 5]) for i in range(max(1, len(t) - 4))})
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                jac = len(grams[a] & grams[b]) / max(1, len(grams[a] | grams[b]))
                if jac >= 0.8:
                    near.setdefault(members[a]["id"], set()).add(members[b]["id"])
                    near.setdefault(members[b]["id"], set()).add(members[a]["id"])
                    ideal += 1 - (1 - jac**8) ** 14
                    hit = not (members[a]["id"] in kept and members[b]["id"] in kept)
                    for key in ("all", members[a]["lang"]):
                        pairs[key][0] += hit
                        pairs[key][1] += 1
    strict = sum(1 for d in removed if near.get(d["id"], set()) & kept)
    return {
        "removed": len(removed),
        "precision": good / max(1, len(removed)),
        # Removed documents with a kept document at Jaccard >= 0.8: a removal justified by the threshold.
        "precision_j08": strict / max(1, len(removed)),
        **{f"recall_{k}": v[0] / max(1, v[1]) for k, v in pairs.items()},
        **{f"pairs_{k}": v[1] for k, v in pairs.items()},
        "ideal_lsh_recall": ideal / max(1, pairs["all"][1]),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["build", "child", "all"])
    ap.add_argument("--docs", type=int, default=50_000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mhbench"))
    ap.add_argument("--tool", choices=list(TOOLS))
    ap.add_argument("--tools", default="ours,datasketch,datatrove")
    ap.add_argument("--record", type=Path, help="also write the rows with provenance to this JSON file")
    ap.add_argument(
        "--repeat", type=int, default=1,
        help="runs per tool (median time reported; a tool whose first run takes over 30 s runs once)",
    )
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    corpus = args.work / f"corpus_{args.docs}.jsonl"
    if args.cmd == "child":
        return child(args.tool, corpus, args.work)
    if not corpus.exists():
        build_corpus(args.docs, corpus)
    if args.cmd == "build":
        return
    rows = {}
    for tool in args.tools.split(","):
        runs = []
        while len(runs) < args.repeat and (not runs or runs[0]["seconds"] <= 30):
            subprocess.run(
                [sys.executable, __file__, "child", "--tool", tool, "--docs", str(args.docs), "--work", str(args.work)],
                check=True,
            )
            runs.append(json.loads((args.work / f"{tool}.time.json").read_text()))
        timing = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}  # medians
        timing["runs"] = runs
        kept = set(json.loads((args.work / f"{tool}.kept.json").read_text()))
        rows[tool] = {
            **timing,
            "docs_per_s": args.docs / timing["seconds"],
            "docs_per_cpu_s": args.docs / timing["cpu_seconds"],
            **score(corpus, kept),
        }
        print(tool, json.dumps(rows[tool]), file=sys.stderr)
    if "ours" in rows and "datatrove" in rows:
        rows["ratio_ours_vs_datatrove"] = {
            "docs_per_s": rows["ours"]["docs_per_s"] / rows["datatrove"]["docs_per_s"],
            "docs_per_cpu_s": rows["ours"]["docs_per_cpu_s"] / rows["datatrove"]["docs_per_cpu_s"],
        }
    (args.work / "results.json").write_text(json.dumps(rows, indent=2))
    print(json.dumps(rows, indent=2))
    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps({"provenance": provenance([corpus], ("numpy", "datatrove", "datasketch")),
                                           "docs": args.docs, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
