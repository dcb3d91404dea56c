"""The vendor path: `new-backend` scaffolds a plugin that installs, is discovered and passes `conform`;
the example NumPy plugin in examples/ does the same with native kernels."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from openseek_hal.cli import cli
from openseek_hal.conformance.scaffold import render_package

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "numpy_backend"


def _hal(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "openseek_hal.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def pip_installed():
    """Installs a package directory editable into this venv; uninstalls it afterwards."""
    installed = []

    def install(directory: Path, dist_name: str) -> None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e",
                        str(directory)], check=True, capture_output=True, timeout=300)
        installed.append(dist_name)

    yield install
    for dist_name in installed:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", dist_name], capture_output=True,
                       timeout=300)


def test_scaffold_renders_a_complete_package():
    files = render_package("my_chip", device_type="npu")
    assert set(files) == {"pyproject.toml", "README.md", "openseek_hal_my_chip/__init__.py",
                          "openseek_hal_my_chip/backend.py", "openseek_hal_my_chip/adaptor.py",
                          "tests/test_conformance.py"}
    assert 'my_chip = "openseek_hal_my_chip.backend:MyChipBackend"' in files["pyproject.toml"]
    assert '[project.entry-points."openseek_hal.backends"]' in files["pyproject.toml"]
    assert '[project.entry-points."openseek_hal.comm_adaptors"]' in files["pyproject.toml"]
    assert 'my_chip = "openseek_hal_my_chip.adaptor:MyChipAdaptor"' in files["pyproject.toml"]
    backend = files["openseek_hal_my_chip/backend.py"]
    assert 'device_type = "npu"' in backend and backend.count("TODO") >= 5
    assert 'comm_adaptor = "my_chip"' in backend
    adaptor = files["openseek_hal_my_chip/adaptor.py"]
    assert 'device_types = ("npu",)' in adaptor and adaptor.count("TODO") >= 6
    assert "class MyChipCommunicator(BaseCommunicator)" in adaptor
    for path, text in files.items():
        if path.endswith(".py"):
            compile(text, path, "exec")


@pytest.mark.parametrize("argv, message", [
    (["Bad-Name"], "must be lowercase"),
    (["cpu"], "already installed"),
])
def test_new_backend_refuses_bad_names(argv, message, tmp_path):
    result = CliRunner().invoke(cli, ["new-backend", *argv, str(tmp_path / "pkg")])
    assert result.exit_code != 0 and message in str(result.exception or result.output)


def test_new_backend_never_overwrites(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["new-backend", "fresh_chip", str(tmp_path)])
    assert result.exit_code != 0 and "not empty" in str(result.exception)
    assert (tmp_path / "keep.txt").read_text() == "mine" and len(list(tmp_path.iterdir())) == 1


def test_scaffold_round_trip(tmp_path, pip_installed):
    target = tmp_path / "scaffoldchip"
    made = _hal("new-backend", "scaffoldchip", str(target))
    assert made.returncode == 0, made.stderr
    pip_installed(target, "openseek-hal-scaffoldchip")
    listed = _hal("backends", "--ops")
    assert listed.returncode == 0 and "scaffoldchip" in listed.stdout
    assert "scaffoldchip native: -" in listed.stdout  # every op falls back as generated
    run = _hal("conform", "--backend", "scaffoldchip", "--quick", "--seed", "0", "--report", str(tmp_path / "r"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "PASS" in run.stdout and (tmp_path / "r" / "conform-scaffoldchip.json").exists()
    assert "scaffoldchip" in listed.stdout.split("communicator adaptors", 1)[1]  # its adaptor is listed too
    report = json.loads((tmp_path / "r" / "conform-scaffoldchip.json").read_text())
    comm = [c for c in report["checks"] if c["level"] == "comm"]
    # --quick runs the backend's own adaptor: the scaffolded one, which passes as generated
    assert comm and {c["impl"] for c in comm} == {"scaffoldchip"} and all(c["status"] == "pass" for c in comm)


def test_example_numpy_plugin_round_trip(tmp_path, pip_installed):
    package = tmp_path / "numpy_backend"
    shutil.copytree(EXAMPLE, package, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "build"))
    pip_installed(package, "openseek-hal-numpy")
    listed = _hal("backends", "--ops")
    assert listed.returncode == 0 and "numpy" in listed.stdout
    native_line = next(line for line in listed.stdout.splitlines() if line.startswith("numpy native:"))
    assert all(op in native_line for op in ("rms_norm", "rope", "silu_and_mul"))
    run = _hal("conform", "--backend", "numpy", "--level", "ops,model", "--quick", "--seed", "0")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "PASS" in run.stdout
