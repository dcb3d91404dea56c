"""Fixtures for the data-tool tests: writing JSONL inputs, running the CLI, reading stage output."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest


def write_jsonl(path: Path, rows: list, raw_lines: tuple[str, ...] = ()) -> Path:
    """Write ``rows`` as JSONL (dicts are dumped, strings written as-is), then ``raw_lines``."""
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows] + list(raw_lines)
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def read_output(out_dir: Path) -> list[dict]:
    from openseek_hal.data.io import open_text

    docs = []
    for shard in sorted(out_dir.glob("part-*.jsonl*")):
        with open_text(shard, "rt") as fh:
            docs.extend(json.loads(line) for line in fh)
    return docs


@pytest.fixture
def cli(capsys):
    """Run ``openseek-hal ARGS`` in-process; returns (exit code, stdout, stderr)."""
    from openseek_hal.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in args])
        out = capsys.readouterr()
        return exc.value.code, out.out, out.err

    return run
