"""`openseek-hal data run pipeline.yaml`: chain stages, each reading the previous stage's output.

The YAML file::

    input: [raw/]                 # files or folders (relative to the YAML file)
    output: work/                 # stage k writes work/<k>-<stage>/
    text_key: text                # optional, passed to every stage
    workers: 2                    # optional, for stages that take --workers
    stages:
      - filter: {min_chars: 200, t2s: true}
      - dedup-minhash: {}
      - tokenize: {vocab_size: 32000}

Each stage's options are its command-line flags (``min_chars`` is ``--min-chars``; ``true`` is a bare
flag; a list repeats the flag), so a pipeline runs exactly what the same commands would run by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..errors import ConfigError
from ..fileio import read_yaml_mapping

PATH_OPTIONS = {"config", "benchmark", "model", "tokenizer", "flagged_words", "prompts"}


def load(path: Path) -> dict[str, Any]:
    spec = read_yaml_mapping(path, "pipeline")
    if not isinstance(spec.get("stages"), list) or not spec["stages"]:
        raise ConfigError(f"pipeline {path} needs a non-empty 'stages' list")
    for key in ("input", "output"):
        if key not in spec:
            raise ConfigError(f"pipeline {path} needs '{key}'")
    return spec


def _flags(options: dict[str, Any], base: Path) -> list[str]:
    args: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v is True:
                args.append(flag)
            elif v is False:
                args.append("--no-" + key.replace("_", "-"))
            elif v is not None:
                args += [flag, str(base / v) if key in PATH_OPTIONS else str(v)]
    return args


def plan(
    spec: dict[str, Any], base: Path, group: click.Group, executor: str | None, quiet: bool = False
) -> list[list[str]]:
    """The argv of every stage, in order."""
    inputs = spec["input"] if isinstance(spec["input"], list) else [spec["input"]]
    current = [str(base / p) for p in inputs]
    out_root = base / spec["output"]
    runs = []
    for k, entry in enumerate(spec["stages"]):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ConfigError(f"stage {k + 1} must be a one-key mapping like '- filter: {{...}}'")
        ((name, options),) = entry.items()
        chainable = sorted(
            c for c, cmd in group.commands.items() if "out_dir" in {p.name for p in cmd.params}
        )
        if name not in chainable:
            raise ConfigError(
                f"stage {k + 1}: '{name}' is not a pipeline stage (choose from: {', '.join(chainable)})"
            )
        params = {p.name for p in group.commands[name].params}
        out_dir = out_root / f"{k + 1}-{name}"
        argv = [name, *current, "-o", str(out_dir)]
        for key in ("text_key", "workers"):
            if key in spec and key in params:
                argv += [f"--{key.replace('_', '-')}", str(spec[key])]
        if executor is not None and "executor" in params:
            argv += ["--executor", executor]
        argv += _flags(options or {}, base) + (["-q"] if quiet else [])
        runs.append(argv)
        current = [str(out_dir)]
    return runs
