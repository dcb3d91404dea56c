"""Jobs whose ranks use different backends (chip kinds): which backend each rank takes, which adaptor
and which precision regime the job runs with.

A user names one backend per local rank: ``--backend cuda,cpu`` (or ``cuda=1,cpu=1``, a count per
name) with ``-n 2`` / ``torchrun --nproc-per-node 2`` runs local rank 0 on ``cuda`` and local rank 1
on ``cpu``; the same text in ``$OPENSEEK_HAL_BACKEND`` does it when ``--backend`` is not given; and
different nodes may be started with different ``--backend`` (the start-of-job config check allows
that one field to differ). Such a job:

- starts its default process group as gloo when the ranks' collective libraries differ (a GPU rank
  and a CPU rank cannot share an NCCL group; `openseek_hal.comm.rendezvous.init_distributed`);
- runs every collective through an adaptor that spans kinds (``hier``; the default adaptor becomes
  ``hier``, one that cannot span kinds is refused with one line);
- trains in one precision regime on every rank: ``dtype: auto`` means fp32 when the ranks' device
  types differ (an explicit ``dtype`` is used as given on every rank);
- starts from rank 0's initial weights on every rank (each device type's random generator draws
  other numbers from the same seed): the trainer broadcasts them before the first step.
"""

from __future__ import annotations

import os
import re

from ..errors import ConfigError

ENV_BACKEND = "OPENSEEK_HAL_BACKEND"
_ITEM = re.compile(r"([A-Za-z0-9_.\-]+)(?:=(\d+))?")


def parse_backends(text: str, where: str = "backend") -> list[str]:
    """One backend name per rank: ``"cuda,cpu"`` -> ``["cuda", "cpu"]``; ``"cuda=2,cpu"`` ->
    ``["cuda", "cuda", "cpu"]``; ``"cuda"`` -> ``["cuda"]``."""
    names: list[str] = []
    for item in text.split(","):
        m = _ITEM.fullmatch(item.strip())
        if m is None or (m.group(2) is not None and int(m.group(2)) < 1):
            raise ConfigError(f"{where}: cannot read {item.strip()!r} in {text!r}: give a backend name, or one per "
                              "local rank separated by commas (cuda,cpu), or name=count (cuda=1,cpu=1)")
        names += [m.group(1)] * int(m.group(2) or 1)
    return names


def backend_spec(configured: str | None) -> tuple[str | None, str]:
    """The per-rank backend text in force, and where it came from: the config, else ``$OPENSEEK_HAL_BACKEND``."""
    if configured:
        return configured, "backend"
    env = os.environ.get(ENV_BACKEND) or None
    return env, f"${ENV_BACKEND}"


def is_per_rank(configured: str | None) -> bool:
    """Whether the backend text in force names more than one rank's backend."""
    spec, where = backend_spec(configured)
    return spec is not None and len(parse_backends(spec, where)) > 1


def rank_backend(configured: str | None, local_rank: int, local_world_size: int) -> tuple[str | None, int]:
    """``(backend name or None for the default, device index)`` of local rank ``local_rank``.

    One name: every rank takes it, on device ``local_rank``. One name per local rank: rank ``i`` takes
    name ``i``, on the next device of its device type (``cpu,cuda,cuda`` puts the two cuda ranks on
    cuda:0 and cuda:1). The list must have exactly one name per local rank.
    """
    spec, where = backend_spec(configured)
    if spec is None:
        return None, local_rank
    names = parse_backends(spec, where)
    if len(names) == 1:
        return names[0], local_rank
    if len(names) != local_world_size:
        raise ConfigError(f"{where} {spec!r} names {len(names)} per-rank backends, but this node runs "
                          f"{local_world_size} rank(s): start it with -n {len(names)} (or torchrun "
                          f"--nproc-per-node {len(names)}), or give one backend")
    types = [device_type_of(n) for n in names]
    mine = names[local_rank]
    return mine, sum(1 for t in types[:local_rank] if t == types[local_rank])


def device_type_of(name: str) -> str:
    """The torch device type of backend ``name`` (its class attribute; it need not be available here)."""
    from ..backend import discover

    found, _ = discover()
    cls = found.get(name)
    return cls.device_type if cls is not None else name


def job_adaptor(requested: str, kinds: list[str]) -> str:
    """The adaptor a job whose ranks use backends ``kinds`` runs with ("" is the backend's own).

    A mixed job needs an adaptor that spans kinds: "" becomes ``hier``; any other is refused unless
    it declares ``spans_kinds``.
    """
    if len(set(kinds)) == 1:
        return requested
    if not requested:
        return "hier"
    from ..comm.adaptors import get_adaptor

    if not getattr(get_adaptor(requested), "spans_kinds", False):
        raise ConfigError(f"comm_adaptor '{requested}' cannot span chip kinds, but the ranks use different backends "
                          f"({describe_kinds(kinds)}): use comm_adaptor hier (the default for such a job)")
    return requested


def describe_kinds(kinds: list[str]) -> str:
    """``rank 0: cuda, rank 1: cpu`` (runs of ranks of one kind folded: ``ranks 0-7: cuda, ...``)."""
    from ..comm.rendezvous import ranks_text

    order = list(dict.fromkeys(kinds))
    return ", ".join(f"{ranks_text([r for r, k in enumerate(kinds) if k == kind])}: {kind}" for kind in order)


def job_weight_mode(dtype: str, device_types: set[str]) -> str:
    """The precision mode of a job (`TrainConfig.dtype` resolved): ``auto`` is bf16 on accelerators and fp32
    on the CPU when every rank has one device type, and fp32 on every rank when they differ."""
    if dtype != "auto":
        return dtype
    if len(device_types) > 1:
        return "fp32"
    return "fp32" if device_types == {"cpu"} else "bf16"
