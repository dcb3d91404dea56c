"""The ``openseek-hal`` command line (click).

Each command lives beside the part of the system it drives and is imported only when it runs
(`LazyGroup`), so ``openseek-hal --help`` stays fast and a broken optional part cannot break the
others. Errors a user can cause print one line on stderr and exit 2, failures of a run (a
`RunError`, a collective that failed) one line and exit 1; nothing prints a traceback.
"""

from __future__ import annotations

import sys
import warnings
from importlib import import_module

import click

from . import __version__
from .errors import UserError

# command name -> "module:attribute" of its click command or group
COMMANDS: dict[str, str] = {
    "backends": "openseek_hal.cli:backends",
    "train": "openseek_hal.train.cli:train",
    "conform": "openseek_hal.conformance.cli:conform",
    "new-backend": "openseek_hal.conformance.scaffold:new_backend",
    "bench": "openseek_hal.ops.bench:bench",
    "convert": "openseek_hal.models.convert:convert",
    "data": "openseek_hal.data.cli:data",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use from ``lazy_commands``."""

    def __init__(self, *args, lazy_commands: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_commands:
            module, _, attr = self.lazy_commands[cmd_name].partition(":")
            return getattr(import_module(module), attr)
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, lazy_commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="openseek-hal")
def cli() -> None:
    """Train DeepSeek-V3-class models on any AI chip through one hardware-abstraction layer."""


@click.command()
@click.option("--ops", "show_ops", is_flag=True,
              help="Also list, per backend, which ops are native, and every op's typed schema.")
def backends(show_ops: bool) -> None:
    """List discovered backends: availability (with the reason when not), devices, op coverage."""
    from rich.console import Console
    from rich.table import Table

    from .backend import default_backend_name, list_backends

    try:
        default = default_backend_name()
    except UserError:
        default = None
    table = Table(title="openseek-hal backends")
    for col in ("backend", "available", "devices", "ops native / fallback", "note"):
        table.add_column(col)
    coverage_rows = []
    for info in list_backends():
        devices, ops_col, note = "-", "-", info.reason
        if info.available and info.cls is not None:
            try:
                be = info.cls()
                devices = str(be.device.count())
                cov = be.coverage()
                native = sorted(op for op, kind in cov.items() if kind == "native")
                ops_col = f"{len(native)} / {len(cov) - len(native)}"
                note = be.capabilities().device_name + ("  (default)" if info.name == default else "")
                coverage_rows.append((info.name, native, sorted(set(cov) - set(native)),
                                      be.op_origins()))
            except Exception as e:  # a backend that breaks on use is shown, not fatal
                note = f"error: {type(e).__name__}: {e}"
        table.add_row(info.name, "yes" if info.available else "no", devices, ops_col, note)
    console = Console()
    console.print(table)
    console.print(_adaptor_table(default))
    if show_ops:
        for name, native, fallback, origins in coverage_rows:
            console.print(f"[bold]{name}[/] native: {', '.join(native) or '-'}")
            console.print(f"[bold]{name}[/] fallback: {', '.join(fallback) or '-'}")
            for origin in sorted(set(origins.values())):  # backends that mix libraries say whose op is whose
                ops_from = sorted(op for op, o in origins.items() if o == origin)
                console.print(f"[bold]{name}[/] {origin}-native: {', '.join(ops_from)}")
        from . import ops

        click.echo("op schemas (the arguments a native op receives; shapes in openseek_hal/ops):")
        for op in ops.REGISTRY:
            click.echo(f"  {ops.get(op).schema_text()}")


def _adaptor_table(default_backend: str | None):
    """The communicator adaptors (entry-point group ``openseek_hal.comm_adaptors``): available or why not."""
    from rich.table import Table

    from .comm.adaptors import list_adaptors

    own = None
    if default_backend is not None:
        from .backend import discover

        own = getattr(discover()[0].get(default_backend), "comm_adaptor", None)
    table = Table(title="communicator adaptors")
    for col in ("adaptor", "available", "device types", "package", "note"):
        table.add_column(col)
    for info in list_adaptors():
        note = info.reason or getattr(info.cls, "description", "")
        if info.name == own:
            note += f"  (default of {default_backend})"
        table.add_row(info.name, "yes" if info.available else "no", ", ".join(info.device_types) or "any",
                      info.package, note)
    return table


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings meant for users (op fallbacks, ...) as one line, without source context."""
    click.echo(f"openseek-hal: warning: {message}", err=True)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the CLI, turning user errors into one line and exit 2."""
    warnings.showwarning = _show_warning
    try:
        rv = cli.main(args=argv, prog_name="openseek-hal", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("openseek-hal: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"openseek-hal: error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except UserError as e:
        click.echo(f"openseek-hal: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("openseek-hal: interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # torch.distributed's own errors (a store or a peer gone): one line, exit 1
        dist = sys.modules.get("torch.distributed")
        if dist is None or not isinstance(e, getattr(dist, "DistError", ())):
            raise
        lines = str(e).strip().splitlines()
        click.echo(f"openseek-hal: error: torch.distributed: {type(e).__name__}: {lines[0] if lines else ''}",
                   err=True)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
