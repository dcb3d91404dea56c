"""Choosing a collective's algorithm and chunk size: a short measured table, cached on disk.

A table holds, per adaptor and topology (``hier/kind-a:2+kind-b:2``: the kinds in order and their
sizes; ``host/cpu:2``) and per collective, rows ``{"max_bytes": B, "algo": ..., "chunk_bytes": ...}``
sorted by ``max_bytes``: a call of ``nbytes`` (the larger buffer, as the benchmark counts) takes the
first row with ``nbytes <= max_bytes``, and the last row above the largest. ``all_to_all_single``
always takes its last row: its ranks move different sizes but must make the same choice. ``openseek-hal bench comm
--tune`` (``python -m openseek_hal.comm.bench --tune``) measures it and writes it to
``<cache>/comm_tune/<host fingerprint>.json`` (cache: ``$OPENSEEK_HAL_CACHE``, else
``$XDG_CACHE_HOME/openseek-hal``, else ``~/.cache/openseek-hal``), keeping the other topologies'
tables of the file.

At creation a ``hier`` or ``host`` communicator resolves its `Policy` on rank 0 of its group (the
table file, ``$OPENSEEK_HAL_COMM_TUNE``, ``$OPENSEEK_HAL_COMM_ALGO``) and broadcasts it, so every
rank makes the same choice for every call (ranks choosing differently would run mismatched
collectives). Without a table the fixed `DEFAULT_ALGORITHMS` apply and the transport's own chunk
size. A table that cannot be read or is malformed gives a warning and the defaults, never an error.

Environment:

- ``OPENSEEK_HAL_COMM_ALGO``: ``parallel`` (every collective that has it), or
  ``all_reduce:leader,all_to_all_single:staged,...``; overrides the table. Unknown names are one
  clear error at creation, on every rank.
- ``OPENSEEK_HAL_COMM_TUNE``: ``off`` (ignore any table) or the path of a table file to use instead
  of the cached one.
- ``OPENSEEK_HAL_HOST_CHUNK_BYTES`` (and ``create(..., chunk_bytes=N)``): one chunk size for every
  call, overriding the table's chunk sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..provenance import cpu_model

ENV_ALGO = "OPENSEEK_HAL_COMM_ALGO"
ENV_TUNE = "OPENSEEK_HAL_COMM_TUNE"
FORMAT = "openseek-hal comm tune 1"
# the algorithms of each collective that has a choice (the first is the adaptor's historical one)
ALGORITHMS: dict[str, tuple[str, ...]] = {
    "all_reduce": ("leader", "parallel"),
    "all_gather": ("leader", "parallel"),
    "reduce_scatter": ("leader", "parallel"),
    "all_to_all_single": ("staged", "parallel"),
}
# Without a table: the parallel-shard algorithms (between kinds each rank moves 1/n_k of the bytes a leader
# moves), except `GLOO_KIND_DEFAULTS` when a kind of two or more ranks reduces over gloo (see `defaults`).
DEFAULT_ALGORITHMS: dict[str, str] = {op: "parallel" for op in ALGORITHMS}
# Measured on the 2-core CPU box, 4 ranks as kinds [a, a, b, b] (docs/comm.md, "hier on the CPU"): gloo's
# reduce-scatter + all-gather inside a kind cost more than its all-reduce + broadcast, and its all-to-all
# more than the shared-memory one, so on such kinds these stay on the leader/staged path up to 64 MiB.
GLOO_KIND_DEFAULTS: dict[str, str] = {"all_reduce": "leader", "reduce_scatter": "leader",
                                      "all_to_all_single": "staged"}


def defaults(kinds: list[str], backends: dict[str, str]) -> dict[str, str]:
    """The fixed default algorithm of each collective for a ``hier`` group: `DEFAULT_ALGORITHMS`, with
    `GLOO_KIND_DEFAULTS` where some kind has two or more ranks and its native library is gloo."""
    gloo_kind = any(kinds.count(k) > 1 and backends.get(k) in ("gloo", "cpu:gloo") for k in set(kinds))
    return {**DEFAULT_ALGORITHMS, **(GLOO_KIND_DEFAULTS if gloo_kind else {})}


def cache_root() -> Path:
    """``$OPENSEEK_HAL_CACHE``, else ``$XDG_CACHE_HOME/openseek-hal``, else ``~/.cache/openseek-hal``."""
    if os.environ.get("OPENSEEK_HAL_CACHE"):
        return Path(os.environ["OPENSEEK_HAL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "openseek-hal"


def host_fingerprint() -> str:
    """A short hash of what the measurements depend on: host name, architecture, CPU model and count."""
    text = "|".join([platform.node(), platform.machine(), cpu_model(), str(os.cpu_count())])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def table_path() -> Path:
    """Where this host's table is read and written (``$OPENSEEK_HAL_COMM_TUNE`` names another file)."""
    override = os.environ.get(ENV_TUNE, "")
    if override and override != "off":
        return Path(override)
    return cache_root() / "comm_tune" / f"{host_fingerprint()}.json"


def topology(adaptor: str, kinds: list[str]) -> str:
    """The table key: the adaptor and the kinds in order of their first rank with their sizes."""
    order = list(dict.fromkeys(kinds))
    return f"{adaptor}/" + "+".join(f"{k}:{kinds.count(k)}" for k in order)


def parse_algo_env(text: str) -> dict[str, str]:
    """``parallel`` or ``op:algo,...`` -> {op: algo}; ValueError naming what is wrong."""
    text = text.strip()
    if not text:
        return {}
    out: dict[str, str] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        if ":" not in item:
            ops = [op for op, algos in ALGORITHMS.items() if item in algos]
            if not ops:
                known = sorted({a for algos in ALGORITHMS.values() for a in algos})
                raise ValueError(f"${ENV_ALGO}={text!r}: unknown algorithm {item!r} (choose from {', '.join(known)},"
                                 " or op:algorithm)")
            out.update({op: item for op in ops})
            continue
        op, algo = (p.strip() for p in item.split(":", 1))
        if op not in ALGORITHMS:
            raise ValueError(f"${ENV_ALGO}={text!r}: unknown collective {op!r} (choose from {', '.join(ALGORITHMS)})")
        if algo not in ALGORITHMS[op]:
            raise ValueError(f"${ENV_ALGO}={text!r}: {op} has no algorithm {algo!r} "
                             f"(choose from {', '.join(ALGORITHMS[op])})")
        out[op] = algo
    return out


def validate_rows(rows: Any, where: str) -> dict[str, list[dict]]:
    """A topology's table checked: {op: rows sorted by max_bytes}; ValueError naming the first problem."""
    if not isinstance(rows, dict):
        raise ValueError(f"{where} is not an object")
    out: dict[str, list[dict]] = {}
    for op, entries in rows.items():
        if op not in ALGORITHMS:
            raise ValueError(f"{where}: unknown collective {op!r}")
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{where}.{op} is not a non-empty list")
        clean = []
        for e in entries:
            if not isinstance(e, dict) or not isinstance(e.get("max_bytes"), int) or e["max_bytes"] < 0:
                raise ValueError(f"{where}.{op}: each row needs an integer max_bytes >= 0, got {e!r}")
            algo, chunk = e.get("algo"), e.get("chunk_bytes")
            if algo is not None and algo not in ALGORITHMS[op]:
                raise ValueError(f"{where}.{op}: unknown algorithm {algo!r}")
            if chunk is not None and (not isinstance(chunk, int) or chunk < 4096):
                raise ValueError(f"{where}.{op}: chunk_bytes must be an integer >= 4096, got {chunk!r}")
            clean.append({"max_bytes": e["max_bytes"], "algo": algo, "chunk_bytes": chunk})
        out[op] = sorted(clean, key=lambda e: e["max_bytes"])
    return out


def read_table(path: Path) -> dict:
    """The whole file, checked (ValueError when it is not a table; OSError when it cannot be read)."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("tables"), dict):
        raise ValueError(f"not a comm tuning table (format {FORMAT!r} with 'tables')")
    for key, rows in data["tables"].items():
        validate_rows(rows, f"tables[{key!r}]")
    return data


def write_table(path: Path, key: str, rows: dict[str, list[dict]], meta: dict[str, Any]) -> dict:
    """Store ``rows`` under ``key`` in the file at ``path`` (other keys kept; a bad file is replaced)."""
    from ..fileio import atomic_write_text

    validate_rows(rows, key)
    try:
        data = read_table(path)
    except (OSError, ValueError):
        data = {"format": FORMAT, "tables": {}}
    data["fingerprint"] = host_fingerprint()
    data["tables"][key] = rows
    data.setdefault("meta", {})[key] = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")
    return data


@dataclass
class Policy:
    """The choices of one communicator (the same on every rank of its group)."""

    rows: dict[str, list[dict]] = field(default_factory=dict)  # op -> table rows (empty: no table)
    forced: dict[str, str] = field(default_factory=dict)  # op -> algorithm from $OPENSEEK_HAL_COMM_ALGO
    fixed_chunk: bool = False  # a chunk size was given (option or env): the table's chunk sizes are ignored
    source: str = "default"
    default: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ALGORITHMS))  # without a table row

    def _row(self, op: str, nbytes: int) -> dict | None:
        rows = self.rows.get(op)
        if not rows:
            return None
        if op == "all_to_all_single":
            # the ranks of an uneven all-to-all move different sizes, but must choose alike: the largest row
            return rows[-1]
        return next((r for r in rows if nbytes <= r["max_bytes"]), rows[-1])

    def algorithm(self, op: str, nbytes: int) -> str:
        if op in self.forced:
            return self.forced[op]
        row = self._row(op, nbytes)
        if row is not None and row["algo"]:
            return row["algo"]
        return self.default[op]

    def chunk_bytes(self, op: str, nbytes: int) -> int | None:
        """The table's chunk size for this call, or None (the transport's own)."""
        if self.fixed_chunk:
            return None
        row = self._row(op, nbytes)
        return row["chunk_bytes"] if row is not None else None

    def largest_chunk(self) -> int | None:
        chunks = [r["chunk_bytes"] for rows in self.rows.values() for r in rows if r["chunk_bytes"]]
        return max(chunks) if chunks and not self.fixed_chunk else None

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "forced": dict(self.forced), "rows": self.rows, "default": dict(self.default)}


def local_policy(key: str, *, fixed_chunk: bool) -> tuple[Policy | None, str, str]:
    """(policy, warning, error) as this process sees it: the table file and the environment."""
    try:
        forced = parse_algo_env(os.environ.get(ENV_ALGO, ""))
    except ValueError as e:
        return None, "", str(e)
    warning = ""
    rows: dict[str, list[dict]] = {}
    source = "default"
    if os.environ.get(ENV_TUNE, "") != "off":
        path = table_path()
        if path.exists():
            try:
                data = read_table(path)
                if key in data["tables"]:
                    rows = validate_rows(data["tables"][key], key)
                    source = f"table {path} [{key}]"
            except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
                warning = (f"openseek-hal: ignoring the comm tuning table {path} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); using the default algorithms")
        elif os.environ.get(ENV_TUNE):
            warning = f"openseek-hal: ${ENV_TUNE}={os.environ[ENV_TUNE]!r} does not exist; using the default algorithms"
    if forced:
        source += f" + ${ENV_ALGO}"
    return Policy(rows=rows, forced=forced, fixed_chunk=fixed_chunk, source=source), warning, ""


def shared_policy(cpu: Any, key: str, *, fixed_chunk: bool) -> Policy:
    """Rank 0's policy on every rank of the gloo `TorchCommunicator` ``cpu`` (a collective call).

    Raises ValueError (the same on every rank) when rank 0's ``$OPENSEEK_HAL_COMM_ALGO`` is bad.
    """
    import torch.distributed as dist

    payload: list[Any] = [None]
    if cpu.rank == 0:
        policy, warning, error = local_policy(key, fixed_chunk=fixed_chunk)
        if warning:
            warnings.warn(warning, RuntimeWarning, stacklevel=3)
        payload = [(policy, error)]
    if cpu.world_size > 1:
        dist.broadcast_object_list(payload, src=cpu.global_ranks[0], group=cpu.pg)
    policy, error = payload[0]
    if error:
        raise ValueError(error)
    return policy
