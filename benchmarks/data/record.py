"""What every data benchmark record carries: the input corpus's hash, the commit, the command, the machine.

Used by `minhash_bench.py`, `minhash_scale.py` and `exact_bench.py` (run as scripts: this folder is on
``sys.path``).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def corpus_sha256(paths: Iterable[Path]) -> str:
    """SHA-256 over the input files' bytes, in name order (a folder: its files), so a record names its data."""
    files: list[Path] = []
    for p in paths:
        files += sorted(f for f in Path(p).rglob("*") if f.is_file()) if Path(p).is_dir() else [Path(p)]
    digest = hashlib.sha256()
    for f in sorted(files):
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def provenance(corpus: Iterable[Path], versions: Iterable[str] = ("numpy",)) -> dict[str, object]:
    """Commit (and whether the tree had changes outside the results), command, machine, load, versions and
    the corpus hash."""
    from importlib.metadata import PackageNotFoundError, version

    from openseek_hal.provenance import cpu_model, git_state

    found = {}
    for pkg in versions:
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    state = git_state(ROOT, ignore=("benchmarks/data/results",))
    return {
        "commit": state["commit"],
        "dirty": state["dirty"],
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{cpu_model() or '?'}, {os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(),
        "versions": found,
        "load_average_at_end": os.getloadavg(),
        "corpus_sha256": corpus_sha256(corpus),
    }
