"""`openseek-hal conform`: run the conformance suite against a backend and write its reports.

Exit status: 0 when every required check passes, 1 when one fails (or, with ``--strict``, when an
expected failure passes), 2 for a usage error.
"""

from __future__ import annotations

import click
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

from ..errors import UserError
from .suite import LEVELS, Progress, SuiteConfig, check_config, run_suite

DTYPES = {"float64": torch.float64, "fp64": torch.float64, "float32": torch.float32, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _split(values: tuple[str, ...]) -> list[str]:
    """``--op a --op b,c`` -> ["a", "b", "c"]."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _dtypes(values: tuple[str, ...]) -> list[torch.dtype] | None:
    names = _split(values)
    unknown = [n for n in names if n not in DTYPES]
    if unknown:
        raise UserError(f"unknown dtype(s): {', '.join(unknown)} (choose from: {', '.join(DTYPES)})")
    return [DTYPES[n] for n in names] or None


class _RichProgress(Progress):
    def __init__(self, progress: RichProgress):
        self.progress, self.task = progress, None

    def start(self, level: str, total: int) -> None:
        if self.task is not None:
            self.progress.update(self.task, visible=False)
        self.task = self.progress.add_task(level, total=total)

    def advance(self, description: str) -> None:
        self.progress.update(self.task, advance=1, description=description)


@click.command("conform")
@click.option("--backend", "-b", "backend_name", default=None,
              help="Backend to check (default: the default backend, see `openseek-hal backends`).")
@click.option("--level", "levels", multiple=True, metavar="LEVELS",
              help=f"Levels to run, comma-separated or repeated: {', '.join(LEVELS)} (default: all).")
@click.option("--op", "op_names", multiple=True, metavar="NAME", help="Only these ops (comma-separated or repeated).")
@click.option("--dtype", "dtype_names", multiple=True, metavar="DTYPE",
              help="Only these dtypes: float32, bfloat16, float64, float16 (or fp32, bf16, ...).")
@click.option("--sample", default="", metavar="LABEL", help="Only op samples whose label starts with LABEL (replay).")
@click.option("--seed", type=int, default=None,
              help="Seed of the random inputs (default 0: every run gives the same verdict and numbers).")
@click.option("--fuzz", type=click.IntRange(0, 10_000), default=0, metavar="N",
              help="Also run the op level with N fresh seeds; failures only they find are listed as "
                   "seed-dependent, with their seed in the replay command.")
@click.option("--quick", is_flag=True, help="Fewer samples and dtypes, fewer model steps, 2 ranks only.")
@click.option("--strict", is_flag=True,
              help="Every op must be native (a fallback is an error), and an expected failure that passes fails.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None,
              help="Write conform-<backend>.{json,html,md,xml} into this directory.")
@click.option("--steps", "model_steps", type=click.IntRange(1, 1000), default=None,
              help="Model-level training steps (default 8, 4 with --quick).")
@click.option("--adaptor", "adaptors", multiple=True, help="Collective level: communicator adaptors to check.")
@click.option("--world-size", "world_sizes", multiple=True, type=click.IntRange(2, 64),
              help="Collective level: numbers of local ranks (default 2 and 4).")
@click.pass_context
def conform(ctx: click.Context, backend_name: str | None, levels: tuple[str, ...], op_names: tuple[str, ...],
            dtype_names: tuple[str, ...], sample: str, seed: int | None, fuzz: int, quick: bool, strict: bool,
            report_dir: str | None, model_steps: int | None, adaptors: tuple[str, ...],
            world_sizes: tuple[int, ...]) -> None:
    """Check that a backend computes what the reference computes: ops, collectives, a model's training."""
    from ..backend import default_backend_name
    from .reports import print_report, write_reports

    chosen = _split(levels)
    bad = [lv for lv in chosen if lv not in LEVELS]
    if bad:
        raise UserError(f"unknown level(s): {', '.join(bad)} (choose from: {', '.join(LEVELS)})")
    config = SuiteConfig(backend=backend_name or default_backend_name(),
                         levels=tuple(lv for lv in LEVELS if lv in chosen) if chosen else LEVELS,
                         levels_explicit=bool(chosen), ops=_split(op_names) or None, dtypes=_dtypes(dtype_names),
                         seed=seed, fuzz=fuzz, quick=quick, strict=strict, sample=sample, model_steps=model_steps,
                         adaptors=_split(adaptors) or None, world_sizes=list(world_sizes) or None)
    check_config(config)  # before the progress bar, so a usage error prints as one clean line
    console = Console()
    columns = (TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with RichProgress(*columns, console=Console(stderr=True), transient=True) as bar:
        result = run_suite(config, _RichProgress(bar))
    print_report(result, console)
    if report_dir:
        for path in write_reports(result, report_dir):
            console.print(f"wrote {path}", highlight=False)
    ctx.exit(0 if result.ok else 1)
