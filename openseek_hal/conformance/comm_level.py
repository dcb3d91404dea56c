"""Collective level: turns the collective checks' rows into check results.

The checks themselves (start N local ranks of the backend per communicator adaptor, run every
collective against exact expected values) live in ``conformance/collectives.py`` beside the comm
adaptors; this module imports them lazily, so the op and model levels work without them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..backend import Backend
from .manifest import Manifest
from .records import CheckResult

CollectiveChecks = Callable[..., list[dict[str, Any]]]

# used when neither the collectives module nor the comm package names the adaptors
FALLBACK_ADAPTORS = ("torch",)


class CommUnavailable(RuntimeError):
    """The collective checks are not installed in this build."""


def load_collective_checks() -> CollectiveChecks:
    """``run_collective_checks`` of the collectives module, or CommUnavailable saying why not."""
    try:
        from .collectives import run_collective_checks
    except ImportError as e:
        raise CommUnavailable(f"the collective checks are not available ({e})") from e
    return run_collective_checks


def default_adaptors(backend: Backend, quick: bool) -> tuple[str, ...]:
    """Every installed adaptor usable here on the backend's device type, vendor plugins included; the
    backend's own (``comm_adaptor``) first, and only it with --quick (each adaptor is a launch)."""
    from .. import comm

    own = comm.default_adaptor(backend)
    names = [own, *(n for n in comm.adaptor_names() if n != own)]
    usable = tuple(n for n in names if comm.adaptor_available(n, backend.device_type)[0])
    usable = usable or FALLBACK_ADAPTORS
    return usable[:1] if quick else usable


def default_world_sizes(backend: Backend, quick: bool) -> list[int]:
    """2 and 4 local ranks (2 with --quick), as many as the backend has devices (the CPU has any)."""
    sizes = [2] if quick else [2, 4]
    if backend.device_type == "cpu":
        return sizes
    return [n for n in sizes if n <= backend.device.count()]


def _shape_text(shape: Any) -> str:
    if isinstance(shape, (list, tuple)):
        return "x".join(map(str, shape)) or "scalar"
    return str(shape)


def to_check_result(row: dict[str, Any], backend: str, seed: int) -> CheckResult:
    status = row.get("status", "error")
    if status not in ("pass", "fail", "error"):
        status = "error"
    adaptor, world = row.get("adaptor", ""), row.get("world_size", "")
    return CheckResult(
        level="comm", op=str(row.get("op", row.get("name", "?"))), check="collective",
        dtype=str(row.get("dtype", "")).removeprefix("torch."),
        sample=str(row.get("name", "")), shape=_shape_text(row.get("shape", "")),
        status=status, max_abs_err=row.get("max_abs_err"), message=str(row.get("message", "")), seed=seed,
        impl=str(adaptor),
        replay=f"openseek-hal conform --backend {backend} --level comm --adaptor {adaptor} --world-size {world}")


def run_comm_checks(backend: Backend, manifest: Manifest, seed: int, *, adaptors: Sequence[str] | None,
                    world_sizes: Sequence[int] | None, quick: bool,
                    checks: CollectiveChecks | None = None) -> list[CheckResult]:
    """Run the collective checks (``checks`` replaces the installed ones, for tests) and convert them."""
    if checks is None:
        checks = load_collective_checks()
    sizes = list(world_sizes) if world_sizes else default_world_sizes(backend, quick)
    if not sizes:
        return [CheckResult(level="comm", op="collectives", check="collective", status="skip", seed=seed,
                            message=f"backend {backend.name} has fewer than 2 devices here")]
    rows = checks(backend.name, list(adaptors or default_adaptors(backend, quick)), sizes, quick=quick)
    return [manifest.apply(to_check_result(row, backend.name, seed)) for row in rows]
