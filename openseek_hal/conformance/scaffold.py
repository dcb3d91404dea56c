"""`openseek-hal new-backend NAME DIR`: scaffold an out-of-tree backend plugin package.

The package installs with pip, registers its backend through the ``openseek_hal.backends`` entry
point and its communicator adaptor (delegating to torch.distributed until the vendor's CCL is wired
in) through ``openseek_hal.comm_adaptors``, and passes `openseek-hal conform` as generated (every
op through the reference fallback, every collective through the adaptor);
TODO markers show where the chip's device type, kernels, manifest and datasheet numbers go.
"""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path
from string import Template

import click

from ..errors import UserError

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

# template file -> path in the generated package ("{package}" is replaced)
LAYOUT = {
    "pyproject.toml.txt": "pyproject.toml",
    "README.md.txt": "README.md",
    "__init__.py.txt": "{package}/__init__.py",
    "backend.py.txt": "{package}/backend.py",
    "adaptor.py.txt": "{package}/adaptor.py",
    "test_conformance.py.txt": "tests/test_conformance.py",
}


def render_package(name: str, device_type: str = "cpu") -> dict[str, str]:
    """``{relative path: file text}`` of the plugin package for backend ``name``."""
    if not NAME_RE.match(name):
        raise UserError(f"backend name {name!r} must be lowercase letters, digits and '_', starting with a letter")
    if not re.match(r"^[a-z][a-z0-9_]*$", device_type):
        raise UserError(f"device type {device_type!r} is not a torch device type name")
    package = f"openseek_hal_{name}"
    values = {"name": name, "package": package, "dist_name": f"openseek-hal-{name.replace('_', '-')}",
              "class_name": "".join(part.capitalize() for part in name.split("_")) + "Backend",
              "adaptor_class": "".join(part.capitalize() for part in name.split("_")) + "Adaptor",
              "comm_class": "".join(part.capitalize() for part in name.split("_")) + "Communicator",
              "device_type": device_type}
    templates = files("openseek_hal.conformance") / "scaffold_templates"
    return {target.format(package=package): Template((templates / source).read_text(encoding="utf-8"))
            .substitute(values) for source, target in LAYOUT.items()}


@click.command("new-backend")
@click.argument("name")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--device-type", default="cpu", show_default=True,
              help="The torch device type of the chip; 'cpu' runs (and passes conform) before any kernel exists.")
def new_backend(name: str, directory: Path, device_type: str) -> None:
    """Scaffold a backend plugin package NAME in DIRECTORY (which must be new or empty)."""
    from ..backend import backend_names
    from ..comm.adaptors import adaptor_names

    if name in backend_names():
        raise UserError(f"a backend named '{name}' is already installed; choose another name")
    if name in adaptor_names():
        raise UserError(f"a communicator adaptor named '{name}' is already installed; choose another name")
    if directory.exists() and any(directory.iterdir()):
        raise UserError(f"{directory} is not empty; new-backend never overwrites files")
    rendered = render_package(name, device_type)
    for relative, text in rendered.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    click.echo(f"created backend plugin '{name}' in {directory}:")
    for relative in rendered:
        click.echo(f"  {relative}")
    click.echo(f"next: pip install -e {directory} && openseek-hal conform --backend {name} --quick")
