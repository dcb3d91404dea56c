"""The terminal report: a rich summary table per op / collective / model, then the failures with replay commands."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..records import SuiteResult
from .summary import failing_checks, fmt_err, replay_commands, summary_rows

_STYLE = {"pass": "green", "fail": "red", "error": "red", "xfail": "yellow", "xpass": "magenta", "skip": "dim"}
MAX_FAILURE_ROWS = 40
NARROW = 120  # columns below which failures print one per line


def print_report(result: SuiteResult, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"conformance: {result.backend} on {result.device_name}, seed {result.seed}")
    table.add_column("op", no_wrap=True)
    table.add_column("impl", no_wrap=True)
    table.add_column("checks")
    table.add_column("err/tol", justify="right", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    for row in summary_rows(result):
        style = _STYLE[row.verdict]
        name = row.op if row.level in ("ops", "model") else f"{row.level}:{row.op}"
        counts = ", ".join(f"[{_STYLE[s]}]{n} {s}[/]" for s, n in row.counts.items() if n)
        table.add_row(name, row.impl, counts, fmt_err(row.worst_ratio), f"[{style}]{row.verdict}[/]")
    console.print(table)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    shown = failing_checks(result)
    if shown and console.width < NARROW:
        # a table's cells would wrap over many lines: one line per check instead (the full table is in
        # the HTML and Markdown reports)
        console.print("[bold]checks that did not simply pass:[/]")
        for c in shown[:MAX_FAILURE_ROWS]:
            ratio = f" err/tol {fmt_err(c.err_ratio)}" if c.err_ratio is not None else ""
            console.print(f"[{_STYLE[c.status]}]{c.status}[/] "
                          + escape(f"{c.op} {c.check} {c.dtype} {c.sample}{ratio}: {c.message}"),
                          soft_wrap=True, highlight=False)
    elif shown:
        failures = Table(title="checks that did not simply pass", show_lines=False)
        for col in ("status", "op", "check", "dtype", "sample", "max abs err", "max rel err", "message"):
            failures.add_column(col, overflow="fold")
        for c in shown[:MAX_FAILURE_ROWS]:
            failures.add_row(f"[{_STYLE[c.status]}]{c.status}[/]", c.op, c.check, c.dtype, c.sample,
                             fmt_err(c.max_abs_err), fmt_err(c.max_rel_err), c.message)
        console.print(failures)
    if len(shown) > MAX_FAILURE_ROWS:
        console.print(f"... and {len(shown) - MAX_FAILURE_ROWS} more (see the JSON/HTML report)")
    commands = replay_commands(result)
    if commands:
        console.print("[bold]replay a failure:[/]")
        for cmd in commands[:MAX_FAILURE_ROWS]:
            console.print(f"  {cmd}", soft_wrap=True, highlight=False, markup=False)
    counts = result.counts()
    verdict = "[green]PASS[/]" if result.ok else "[red]FAIL[/]"
    console.print(f"{verdict}  " + ", ".join(f"{counts[s]} {s}" for s in counts if counts[s])
                  + f"  in {result.duration_s:.1f}s")
