"""Conformance reports: terminal (rich), JSON (the schema of record), HTML, Markdown and JUnit XML."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from ..records import SuiteResult
from .html import render_html
from .junit import render_junit
from .markdown import render_markdown
from .terminal import print_report


def _finite(obj: Any) -> Any:
    """JSON has no NaN/Inf: such floats are written as the strings "nan", "inf", "-inf"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def render_json(result: SuiteResult) -> str:
    return json.dumps(_finite(result.to_dict()), indent=1, allow_nan=False) + "\n"


RENDERERS = {"json": render_json, "html": render_html, "md": render_markdown, "xml": render_junit}


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_reports(result: SuiteResult, directory: str | Path) -> list[Path]:
    """Write ``conform-<backend>.{json,html,md,xml}`` into ``directory``; returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext, render in RENDERERS.items():
        path = directory / f"conform-{result.backend}.{ext}"
        _write_atomic(path, render(result))
        paths.append(path)
    return paths


__all__ = ["print_report", "render_html", "render_json", "render_junit", "render_markdown", "write_reports"]
