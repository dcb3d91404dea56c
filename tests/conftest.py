"""Shared fixtures. ``backend`` runs a test once per available backend (``--backend`` picks one)."""

from __future__ import annotations

import pytest

from openseek_hal.backend import get_backend, list_backends


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--backend", action="append", default=None,
                     help="run backend-parametrized tests only on this backend (repeatable)")


def _selected_backends(config: pytest.Config) -> list[str]:
    infos = [info for info in list_backends() if info.available]
    available = [info.name for info in infos]
    chosen = config.getoption("--backend")
    if not chosen:
        # A backend marked `slow` (an interpreter) runs only where --backend names it.
        return [info.name for info in infos if not info.cls.slow]
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise pytest.UsageError(f"--backend {', '.join(unknown)}: not available here (available: {available})")
    return chosen


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend_name" in metafunc.fixturenames:
        metafunc.parametrize("backend_name", _selected_backends(metafunc.config))


@pytest.fixture
def backend(backend_name: str):
    """An instance of each selected backend in turn."""
    return get_backend(backend_name)


@pytest.fixture(autouse=True)
def _restore_environment():
    """Undo what a test (or the code it calls, like `world_from_env` under SLURM) wrote to ``os.environ``:
    a leaked WORLD_SIZE would make every later trainer test wait for ranks that never come."""
    import os

    saved = dict(os.environ)
    yield
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    os.environ.update(saved)
