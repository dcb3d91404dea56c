"""What produced a result: package and library versions, the git commit (and whether the tree was
dirty), the exact command line. Every conformance report and benchmark JSON carries it.

The commit is read from the checkout the package runs from. A copied tree (a remote machine that
received the working tree without its history) may carry stale git metadata: set
``OPENSEEK_HAL_COMMIT`` there and it is recorded instead, with ``commit_source`` saying so.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ENV_COMMIT = "OPENSEEK_HAL_COMMIT"


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"


def git_state(root: str | Path | None = None, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{"commit", "dirty", "commit_source"}`` of the checkout at ``root`` (default: this package's);
    changes under the ``ignore`` paths (relative to ``root``: e.g. the results a benchmark writes) do not
    count as dirty."""
    if os.environ.get(ENV_COMMIT):
        return {"commit": os.environ[ENV_COMMIT], "dirty": None, "commit_source": ENV_COMMIT}
    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "commit_source": "not a git checkout"}
    excluded = [f":!{path}" for path in ignore]
    status = git("status", "--porcelain", "--untracked-files=no", *(["--", ".", *excluded] if excluded else []))
    return {"commit": commit, "dirty": bool(status) if status is not None else None, "commit_source": "git"}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """Versions, platform, git state and the command line (``sys.argv`` unless given)."""
    if argv is None:
        program = Path(sys.argv[0]).name
        if program == "__main__.py":  # python -m openseek_hal ...
            program = f"python -m {Path(sys.argv[0]).parent.name}"
        argv = [program, *sys.argv[1:]]
    info: dict[str, Any] = {
        "openseek_hal": _package_version("openseek-hal"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": platform.node(),
        "command": " ".join([argv[0], *(shlex.quote(a) for a in argv[1:])]),
    }
    for name in ("torch", "triton"):
        module = sys.modules.get(name)
        info[name] = getattr(module, "__version__", None) or _package_version(name)
    info.update(git_state())
    return info


def cuda_devices() -> dict[str, Any]:
    """The first CUDA card's name and how many are visible ({} without CUDA): what a GPU benchmark ran on."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"card": torch.cuda.get_device_name(0), "gpus_visible": torch.cuda.device_count()}
