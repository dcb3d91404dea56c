"""Small file helpers shared by every part: atomic text writes, and YAML config files read into a mapping."""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, UserError


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping at the top of YAML file ``path`` ({} for an empty file); ``what`` names it in errors."""
    p = Path(path)
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {what} {p}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} {p} must hold a mapping at the top level")
    return loaded


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a unique temporary file and a rename: readers see old or new, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class FolderLock:
    """An exclusive lock on a folder that one job writes (``<folder>/.lock``), held while in the ``with`` block.

    A second job asking for it fails at once with one line naming the holder (pid and host). The
    lock is an ``flock`` on an open file, so the kernel releases it when the holder dies, however
    it dies: a stale lock file never blocks the next run.
    """

    def __init__(self, folder: str | Path, *, what: str = "folder", holder: str = "",
                 hint: str = "choose another folder"):
        """``what`` names the folder in the error, ``holder`` prefixes the holder's pid (a stage name)."""
        self.folder, self.what, self.holder, self.hint = Path(folder), what, holder, hint
        self._fd: int | None = None

    def __enter__(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{self.what} {self.folder} is in use by {holder} (lock {path}); wait for it to end or "
                            f"stop it, or {self.hint}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.holder + ' ' if self.holder else ''}pid {os.getpid()} on {socket.gethostname()}\n"
                  .encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None
