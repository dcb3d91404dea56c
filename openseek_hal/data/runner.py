"""Running a stage: batches of records through an executor into sharded output, with stats and progress.

A per-document stage (filter, classify, decontaminate) is a ``DocStage``: ``process(doc)`` returns the
document to keep (possibly changed) or ``None`` with the reason it was removed. ``run_doc_stage`` does
everything around that: discovery, parsing in the workers, ordered writing, malformed-line accounting,
``stats.json``. Byte counts are UTF-8 bytes of the text field.
"""

from __future__ import annotations

import itertools
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .executor import ordered_map
from .io import (
    Malformed,
    RawLine,
    ShardWriter,
    check_output_dir,
    check_shard_options,
    discover,
    dumps,
    iter_raw,
    parse,
)
from .outdir import StageOutput


@dataclass
class Stats:
    """What a stage did; written as ``stats.json`` beside its output."""

    stage: str
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    removed: Counter = field(default_factory=Counter)
    malformed: Malformed = field(default_factory=Malformed)
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "removed": dict(sorted(self.removed.items())),
            "malformed": {"count": self.malformed.count, "first": self.malformed.first},
            "seconds": round(self.seconds, 3),
            **self.extra,
            "config": self.config,
        }


class DocStage(ABC):
    """One document in, the document (maybe changed) or a removal reason out. Must be picklable."""

    name: str = "stage"

    def setup(self) -> None:  # noqa: B027 - optional hook, most stages need nothing
        """Load what the stage needs (models, converters) once per worker process."""

    @abstractmethod
    def process(self, doc: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]: ...


@dataclass
class BatchResult:
    lines: list[str]
    malformed: Malformed
    removed: Counter
    docs_in: int
    bytes_in: int
    bytes_out: int


class _DocBatch:
    """Adapts a ``DocStage`` to the executor's batch protocol: parse, process, serialize."""

    def __init__(self, stage: DocStage, text_key: str):
        self.stage, self.text_key = stage, text_key

    def setup(self) -> None:
        self.stage.setup()

    def __call__(self, batch: list[RawLine]) -> BatchResult:
        out = BatchResult([], Malformed(), Counter(), 0, 0, 0)
        for raw in batch:
            doc = parse(raw, self.text_key, out.malformed)
            if doc is None:
                continue
            out.docs_in += 1
            out.bytes_in += len(doc[self.text_key].encode("utf-8"))
            kept, reason = self.stage.process(doc)
            if kept is None:
                out.removed[reason or self.stage.name] += 1
                continue
            out.bytes_out += len(kept[self.text_key].encode("utf-8"))
            out.lines.append(dumps(kept))
        return out


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


@contextmanager
def progress(description: str, quiet: bool = False, total: int | None = None, unit: str = "docs"):
    """A rich progress bar on stderr; yields ``advance(n)``."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = [
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=Console(stderr=True), disable=quiet, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def report(stats: Stats, out_dir: Path, quiet: bool = False) -> None:
    """Print a one-line summary plus the first malformed lines (``StageOutput.commit`` wrote stats.json)."""
    import click

    for m in stats.malformed.first[:5]:
        click.echo(f"warning: skipped malformed record {m['file']}:{m['line']}: {m['error']}", err=True)
    if stats.malformed.count > 5:
        click.echo(f"warning: {stats.malformed.count} malformed records in all (see stats.json)", err=True)
    if not quiet:
        removed = ", ".join(f"{k}={v}" for k, v in sorted(stats.removed.items())) or "none"
        click.echo(
            f"{stats.stage}: {stats.docs_in} docs in, {stats.docs_out} out "
            f"(removed: {removed}; malformed: {stats.malformed.count}) in {stats.seconds:.1f}s -> {out_dir}",
            err=True,
        )


@dataclass
class OutputOptions:
    """Where and how a stage writes: folder, shard size, compression, progress."""

    out_dir: Path
    shard_docs: int = 100_000
    compression: str = "none"
    quiet: bool = False


def run_doc_stage(
    stage: DocStage,
    inputs: list[str],
    out: OutputOptions,
    text_key: str = "text",
    workers: int = 1,
    executor: str = "local",
    batch_size: int = 256,
    config: dict[str, Any] | None = None,
) -> Stats:
    """Stream every input document through ``stage`` and write the kept ones; returns the stats."""
    check_shard_options(out.shard_docs, out.compression)
    files = discover(inputs)
    check_output_dir(out.out_dir, files)
    stats = Stats(stage.name, config=config or {})
    start = time.perf_counter()
    with StageOutput(out.out_dir, stage.name) as output:
        writer = ShardWriter(output.dir, out.shard_docs, out.compression)
        try:
            with (
                progress(stage.name, out.quiet) as advance,
                closing(
                    ordered_map(_DocBatch(stage, text_key), batched(iter_raw(files), batch_size), workers, executor)
                ) as results,
            ):
                for res in results:
                    for line in res.lines:
                        writer.write(line)
                    stats.docs_in += res.docs_in
                    stats.bytes_in += res.bytes_in
                    stats.bytes_out += res.bytes_out
                    stats.removed.update(res.removed)
                    stats.malformed.merge(res.malformed)
                    advance(res.docs_in + res.malformed.count)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        stats.docs_out = writer.docs
        stats.seconds = time.perf_counter() - start
        output.commit(stats.to_dict(), writer.documents)
    report(stats, out.out_dir, out.quiet)
    return stats
