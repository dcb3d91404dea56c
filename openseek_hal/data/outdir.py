"""A stage's output folder is valid only as a whole: one writer at a time, staged writes, a checked manifest.

Every stage writes through ``StageOutput`` (a context manager):

- it takes an exclusive ``fcntl.flock`` on ``DIR/.lock`` for the whole run; the kernel releases it when
  the process dies, however it dies. A second run into the same folder fails at once, naming the holder;
- holding the lock, it removes what a crashed run left (``.staging/``, ``.*.tmp*`` files, ``.minhash-*``);
- new files are written into ``DIR/.staging/`` (``StageOutput.dir``). The folder's previous output stays
  untouched, and valid, until ``commit``. On any failure the staging folder is removed, so a full disk is
  freed again, and a full disk (or a read-only folder) is one ``UserError`` line;
- ``commit`` marks the folder incomplete (``DIR/.incomplete``), removes the previous output, moves the new
  files in, writes ``stats.json`` with a manifest (every file, its size, the documents of each data file)
  and then removes the mark. A folder that never completed keeps the mark from its first byte on.
- a stage that resumes its own output in place (``synthesize``) passes ``staged=False``: the mark is set
  before the first byte changes and removed by ``commit``.

Every reader calls ``verify`` (through ``io.discover``, ``shards.TokenShards`` and the trainer's corpus
reader): a marked folder, a missing or changed file, or an unlisted output file is one ``UserError``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
from fnmatch import fnmatch
from pathlib import Path
from types import TracebackType
from typing import Any

from ..errors import UserError
from ..fileio import FolderLock, atomic_write_text, fsync_path

LOCK = ".lock"
MARK = ".incomplete"
STAGING = ".staging"
STATS = "stats.json"
# Files a stage writes. Whatever matches is the folder's output: replaced as a whole by the next run,
# and an error for readers when the manifest does not list it.
OUTPUT_PATTERNS = (
    "part-*.jsonl",
    "part-*.jsonl.gz",
    "part-*.jsonl.zst",
    "synth.jsonl",
    "clusters.jsonl",
    "tokens-*.bin",
    "tokens-*.idx",
    "index.json",
    "tokenizer.json",
    STATS,
)
# Data files: the documents the next stage reads, in manifest order.
DATA_PATTERNS = ("part-*.jsonl", "part-*.jsonl.gz", "part-*.jsonl.zst", "synth.jsonl")
# Temporaries of a run; any found while holding the lock belong to a run that crashed.
STALE_PATTERNS = (STAGING, ".*.tmp*", ".minhash-*")
DISK_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
WRITE_ERRORS = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch(name, p) for p in patterns)


def is_stage_output(path: Path) -> bool:
    """Whether ``path`` is (or was meant to become) a stage's output folder."""
    return (path / STATS).is_file() or (path / MARK).exists()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class StageOutput:
    """Owns ``out_dir`` for one run of ``stage``; see the module docstring. Use as ``with StageOutput(...) as o``."""

    def __init__(self, out_dir: str | os.PathLike, stage: str, staged: bool = True):
        self.root = Path(out_dir)
        self.stage, self.staged = stage, staged
        self.dir = self.root / STAGING if staged else self.root
        self._lock: FolderLock | None = None
        self.committed = False

    # -- lifetime -------------------------------------------------------------------------------------

    def __enter__(self) -> StageOutput:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._acquire()
            try:
                self.remove_stale()
                if not self.staged or not (self.root / STATS).is_file():
                    self._mark()  # a folder that holds no complete output is marked before it changes
                if self.staged:
                    self.dir.mkdir()
            except BaseException:
                self._release()
                raise
        except OSError as e:
            err = _user_error(e, self.root)
            if err is None:
                raise
            raise err from None
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        try:
            if self.staged:
                _remove(self.dir)  # the new files, if the run failed before commit
            if exc is not None and not self.committed:
                self.remove_stale()
        finally:
            self._release()
        if isinstance(exc, OSError) and (err := _user_error(exc, self.root, self.staged)) is not None:
            raise err from None
        return False

    def _acquire(self) -> None:
        lock = FolderLock(self.root, what="output folder", holder=self.stage, hint="choose another -o")
        self._lock = lock.__enter__()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.__exit__(None, None, None)  # closing the descriptor drops the flock
            self._lock = None

    def remove_stale(self) -> None:
        """Remove temporaries a crashed run left in the folder (only ever called while holding the lock)."""
        for p in self.root.iterdir():
            if _matches(p.name, STALE_PATTERNS):
                _remove(p)

    def _mark(self) -> None:
        atomic_write_text(
            self.root / MARK,
            json.dumps({"stage": self.stage, "pid": os.getpid(), "host": socket.gethostname(),
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n",
        )
        fsync_path(self.root)

    # -- commit ---------------------------------------------------------------------------------------

    def commit(self, stats: dict[str, Any], documents: dict[str, int] | None = None) -> None:
        """Make the new output the folder's content, with ``stats`` (plus the manifest) as ``stats.json``.

        ``documents`` gives the document count of each data file (``part-*``, ``synth.jsonl``).
        """
        documents = documents or {}
        self._mark()
        if self.staged:
            new = {p.name for p in self.dir.iterdir()}
            for p in self.root.iterdir():
                if _matches(p.name, OUTPUT_PATTERNS) and p.name not in new:
                    _remove(p)
            for name in sorted(new):
                os.replace(self.dir / name, self.root / name)
        files = []
        names = sorted(p.name for p in self.root.iterdir() if _matches(p.name, OUTPUT_PATTERNS) and p.name != STATS)
        data = [n for n in names if _matches(n, DATA_PATTERNS)]
        for name in data + [n for n in names if n not in data]:
            entry: dict[str, Any] = {"name": name, "bytes": (self.root / name).stat().st_size}
            if name in documents:
                entry["documents"] = documents[name]
            files.append(entry)
        atomic_write_text(
            self.root / STATS, json.dumps({**stats, "files": files}, indent=2, ensure_ascii=False) + "\n"
        )
        fsync_path(self.root)
        (self.root / MARK).unlink()
        fsync_path(self.root)
        self.committed = True


def _user_error(e: OSError, where: Path, staged: bool = True) -> UserError | None:
    """A full disk or an unwritable folder as one line; None for other errors."""
    if e.errno in DISK_ERRORS:
        kept = (
            "the partial output was removed (the folder holds what it held before)"
            if staged
            else "the folder is marked incomplete and a rerun resumes it"
        )
        return UserError(f"{DISK_ERRORS[e.errno]} while writing {where}; {kept}, free some space and rerun")
    if e.errno in WRITE_ERRORS:
        return UserError(f"cannot write {where}: {WRITE_ERRORS[e.errno]} ({e.filename or where})")
    return None


def verify(path: str | os.PathLike) -> dict[str, Any]:
    """Check a stage output folder against its ``stats.json`` and return that; ``UserError`` if not whole.

    Refused: a folder marked incomplete, a ``stats.json`` without a manifest, a listed file missing or of
    another size, and an output file the manifest does not list.
    """
    root = Path(path)
    mark = root / MARK
    if mark.exists():
        try:
            info = json.loads(mark.read_text(encoding="utf-8"))
            who = f"{info['stage']} (pid {info['pid']} on {info['host']}, started {info['started']})"
        except (OSError, ValueError, KeyError, TypeError):
            who = "a stage"
        raise UserError(
            f"{root} is an incomplete stage output: a run of {who} into it was interrupted or is still "
            "running; rerun that stage"
        )
    stats_path = root / STATS
    try:
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{root} is not a stage output folder (no {STATS})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {stats_path}: {e}") from None
    files = stats.get("files") if isinstance(stats, dict) else None
    if not isinstance(files, list):
        raise UserError(
            f"{stats_path} lists no files (written by an older openseek-hal, or not by a stage); rerun the stage"
        )
    listed = set()
    for entry in files:
        name, size = entry.get("name"), entry.get("bytes")
        listed.add(name)
        f = root / str(name)
        actual = f.stat().st_size if f.is_file() else None
        if actual != size:
            found = "is missing" if actual is None else f"has {actual} bytes"
            raise UserError(
                f"{f} {found} but {stats_path} records {size} bytes: the folder changed after its stage "
                "finished; rerun the stage"
            )
    extra = sorted(p.name for p in root.iterdir() if _matches(p.name, OUTPUT_PATTERNS) and p.name not in listed)
    extra = [n for n in extra if n != STATS]
    if extra:
        raise UserError(
            f"{root} holds {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''} which {stats_path} does "
            "not list: files of another run; rerun the stage"
        )
    return stats


def data_files(path: str | os.PathLike) -> list[Path]:
    """The verified data files (documents) of a stage output folder, in order."""
    root = Path(path)
    stats = verify(root)
    return [root / e["name"] for e in stats["files"] if _matches(e["name"], DATA_PATTERNS)]
