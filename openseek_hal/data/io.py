"""Reading and writing documents: input discovery, streaming readers, atomic sharded JSONL output.

Inputs are JSONL files (plain, ``.gz`` or ``.zst``), Parquet files, or folders of them. Readers stream
one document at a time and never hold a whole file. A line that is not valid UTF-8 or not a JSON object
is recorded in ``Malformed`` (file, line number, reason) and skipped, so a bad line never stops a run and
is never dropped silently. Output goes to ``part-NNNNN.jsonl[.gz|.zst]`` shards written as temp files and
renamed into place, inside a ``StageOutput`` (``outdir.py``) that makes the folder valid only as a whole.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..errors import UserError
from .outdir import data_files, is_stage_output

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSIONS = ("none", "gz", "zst")


def is_input(path: Path, also: tuple[str, ...] = ()) -> bool:
    name = path.name.lower()
    return name.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES + also) and not name.startswith(".")


def _walk(folder: Path, also: tuple[str, ...]) -> list[Path]:
    """Input files under ``folder``, sorted; a stage output inside is read as its verified data files only,
    and hidden files and folders (a stage's temporaries) are never read."""
    if is_stage_output(folder):
        return data_files(folder)
    found: list[Path] = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            found.extend(_walk(p, also))
        elif p.is_file() and is_input(p, also):
            found.append(p)
    return found


def discover(paths: Sequence[str | os.PathLike], also: tuple[str, ...] = ()) -> list[Path]:
    """Expand files and folders into a de-duplicated list of readable input files.

    Folders are searched recursively for JSONL/Parquet files (and files ending in one of ``also``), except
    a stage's output folder (``outdir.is_stage_output``), which must be whole (``outdir.verify``) and of
    which only the data files its ``stats.json`` lists are read. A path that does not exist, is
    unreadable, or a folder with no inputs is one ``UserError``.
    """
    if not paths:
        raise UserError("no input given")
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise UserError(f"input not found: {p}")
        if p.is_dir():
            files = _walk(p, also)
            if not files:
                if is_stage_output(p):
                    raise UserError(f"stage output folder {p} holds no documents")
                raise UserError(f"no JSONL or Parquet files in folder: {p}")
            found.extend(files)
        else:
            found.append(p)
    for f in found:
        if not os.access(f, os.R_OK):
            raise UserError(f"input not readable: {f}")
    seen: set[Path] = set()
    return [f for f in found if not (f.resolve() in seen or seen.add(f.resolve()))]


def open_text(path: Path, mode: str = "rt", format_name: str | None = None) -> IO[Any]:
    """Open a possibly compressed file, text or binary; the compression follows the suffix of
    ``format_name`` (default: the file's own name, so a temp file can be written as its final name)."""
    name = (format_name or path.name).lower()
    if name.endswith(".gz"):
        return gzip.open(path, mode, encoding="utf-8" if "t" in mode else None)
    if name.endswith(".zst"):
        import zstandard

        if "r" in mode:
            # The zstd reader does not iterate lines itself; a BufferedReader on top does.
            raw = io.BufferedReader(
                zstandard.ZstdDecompressor().stream_reader(
                    open(path, "rb"), closefd=True, read_across_frames=True
                )
            )
        else:
            raw = zstandard.ZstdCompressor(level=3).stream_writer(open(path, "wb"), closefd=True)
        return io.TextIOWrapper(raw, encoding="utf-8") if "t" in mode else raw
    return open(path, mode, encoding="utf-8" if "t" in mode else None)


@dataclass
class Malformed:
    """Lines that could not be read as documents: a count and the first few locations."""

    count: int = 0
    first: list[dict[str, Any]] = field(default_factory=list)
    keep: int = 20

    def add(self, file: str, line: int, reason: str) -> None:
        self.count += 1
        if len(self.first) < self.keep:
            self.first.append({"file": file, "line": line, "error": reason})

    def merge(self, other: Malformed) -> None:
        self.count += other.count
        self.first.extend(other.first[: self.keep - len(self.first)])


@dataclass(frozen=True)
class RawLine:
    """One unparsed input record: where it came from and its JSON text (or a parsed Parquet row)."""

    file: str
    line: int
    text: str | None = None
    row: dict[str, Any] | None = None
    error: str | None = None  # why the record cannot be read at all (invalid UTF-8)


def iter_raw(files: Sequence[Path]) -> Iterator[RawLine]:
    """Yield every record of every file in order, unparsed so workers can do the JSON decoding."""
    for path in files:
        if path.name.lower().endswith(PARQUET_SUFFIXES):
            yield from _iter_parquet(path)
            continue
        try:
            with open_text(path, "rb") as fh:
                for lineno, line in enumerate(fh, 1):
                    if line.strip():
                        yield decode_line(str(path), lineno, line)
        except (OSError, EOFError) as e:  # truncated gzip/zstd stream, permission change mid-run
            raise UserError(f"cannot read {path}: {e}") from e


def decode_line(file: str, lineno: int, line: bytes) -> RawLine:
    """One input line as a ``RawLine``; a line that is not valid UTF-8 carries the reason instead of text
    (it is counted as malformed, never read with replacement characters)."""
    try:
        return RawLine(file, lineno, text=line.decode("utf-8"))
    except UnicodeDecodeError as e:
        return RawLine(file, lineno, error=f"invalid UTF-8 at byte {e.start} of the line")


def _iter_parquet(path: Path) -> Iterator[RawLine]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UserError("reading Parquet needs pyarrow: pip install 'openseek-hal[data]'") from e
    try:
        pf = pq.ParquetFile(path)
        row_no = 0
        for batch in pf.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                row_no += 1
                yield RawLine(str(path), row_no, row=row)
    except OSError as e:
        raise UserError(f"cannot read Parquet file {path}: {e}") from e


def parse(raw: RawLine, text_key: str, malformed: Malformed) -> dict[str, Any] | None:
    """Decode one record into a document dict with a string ``text_key``; record and skip otherwise."""
    if raw.error is not None:
        malformed.add(raw.file, raw.line, raw.error)
        return None
    if raw.row is not None:
        doc = raw.row
    else:
        try:
            doc = json.loads(raw.text)
        except json.JSONDecodeError as e:
            malformed.add(raw.file, raw.line, f"{e.msg} at column {e.colno} (invalid JSON)")
            return None
        if "\\u" in raw.text and _has_lone_surrogate(doc):
            # a "\ud800" escape decodes to a string that no UTF-8 writer accepts: malformed, like bad UTF-8
            malformed.add(raw.file, raw.line, "a \\uD800-\\uDFFF escape without its pair (invalid Unicode)")
            return None
    if not isinstance(doc, dict):
        malformed.add(raw.file, raw.line, "not a JSON object")
        return None
    if not isinstance(doc.get(text_key), str):
        malformed.add(raw.file, raw.line, f"missing or non-string field '{text_key}'")
        return None
    return doc


_SCAN = json.JSONDecoder().scan_once  # what json.loads runs, without its wrappers


def line_text(file: str, lineno: int, line: bytes, text_key: str, malformed: Malformed) -> str | None:
    """``parse(decode_line(file, lineno, line), ...)[text_key]`` (None for a malformed record, recorded),
    faster for the common case: a line that decodes and parses as a JSON object with a string
    ``text_key`` goes through the JSON scanner directly, without a ``RawLine``. Anything else takes the
    ``parse`` path, so what is accepted and the reasons recorded are the same."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        doc = parse(decode_line(file, lineno, line), text_key, malformed)
        return None if doc is None else doc[text_key]
    try:
        doc, end = _SCAN(text, 0)
    except (StopIteration, ValueError, RecursionError):
        doc = None
    else:
        if end != len(text) and text[end:].strip(" \t\n\r"):  # json.loads: only JSON whitespace may follow
            doc = None
    if type(doc) is dict and type(value := doc.get(text_key)) is str and (
        "\\u" not in text or not _has_lone_surrogate(doc)
    ):
        return value
    doc = parse(RawLine(file, lineno, text=text), text_key, malformed)
    return None if doc is None else doc[text_key]


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def dumps(doc: dict[str, Any]) -> str:
    """One output line; non-JSON Parquet values (dates, decimals) are written as strings."""
    return json.dumps(doc, ensure_ascii=False, default=str) + "\n"


def check_shard_options(shard_docs: int, compression: str) -> None:
    """``UserError`` for an unknown compression or a shard size below 1 (checked before any folder changes)."""
    if compression not in COMPRESSIONS:
        raise UserError(f"unknown compression '{compression}' (choose from: {', '.join(COMPRESSIONS)})")
    if shard_docs < 1:
        raise UserError("--shard-docs must be at least 1")


class ShardWriter:
    """Writes JSONL lines into ``part-NNNNN.jsonl[.gz|.zst]`` shards of at most ``shard_docs`` documents.

    Each shard is written to a hidden temp name and renamed when full, so a reader never sees a partial
    shard. ``close()`` finishes the last shard and deletes shards left over from an earlier run.
    """

    def __init__(
        self, out_dir: Path, shard_docs: int = 100_000, compression: str = "none", prefix: str = "part"
    ):
        check_shard_options(shard_docs, compression)
        self.out_dir, self.shard_docs, self.prefix = out_dir, shard_docs, prefix
        self.suffix = ".jsonl" + ("" if compression == "none" else "." + compression)
        self._plain = compression == "none"
        out_dir.mkdir(parents=True, exist_ok=True)
        self.written: list[Path] = []
        self.documents: dict[str, int] = {}  # documents per finished shard, by file name
        self.docs = self.bytes = 0
        self._fh: IO[Any] | None = None
        self._tmp: Path | None = None
        self._in_shard = 0

    def write(self, line: str) -> None:
        self.write_bytes(line.encode("utf-8"))

    def write_bytes(self, line: bytes) -> None:
        """``write`` of a line already encoded as UTF-8 (ending in a newline). Plain shards are written
        as bytes; compressed ones through a text layer as before (the compressed bytes depend on how the
        text reaches the compressor, and stay what they were)."""
        if self._fh is None:
            final = self.out_dir / f"{self.prefix}-{len(self.written):05d}{self.suffix}"
            self._tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
            self._fh = open_text(self._tmp, "wb" if self._plain else "wt", format_name=final.name)
            self.written.append(final)
        self._fh.write(line if self._plain else line.decode("utf-8"))
        self.docs += 1
        self.bytes += len(line)
        self._in_shard += 1
        if self._in_shard >= self.shard_docs:
            self._finish_shard()

    def _finish_shard(self) -> None:
        assert self._fh is not None and self._tmp is not None
        self._fh.close()
        os.replace(self._tmp, self.written[-1])
        self.documents[self.written[-1].name] = self._in_shard
        self._fh, self._tmp, self._in_shard = None, None, 0

    def close(self) -> None:
        if self._fh is not None:
            self._finish_shard()
        keep = set(self.written)
        for old in self.out_dir.glob(f"{self.prefix}-*.jsonl*"):
            if old not in keep:
                old.unlink()

    def abort(self) -> None:
        """Drop the shard being written (after an error) so no partial file is left behind.

        Closing flushes, which fails again on a full disk; the temp file is removed all the same.
        """
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()
            except OSError:
                pass
            finally:
                assert self._tmp is not None
                self._tmp.unlink(missing_ok=True)


def check_output_dir(out_dir: Path, inputs: Sequence[Path]) -> None:
    """Refuse an output folder that holds any of the inputs: a rerun would overwrite the data it reads."""
    out = out_dir.resolve()
    for f in inputs:
        if out in f.resolve().parents:
            raise UserError(f"output folder {out_dir} contains input {f}; choose another -o")
