"""The training loop, one code path for one rank and for many.

Under torchrun, SLURM or ``openseek-hal train --nproc-per-node G`` every rank runs `train`: it
joins the job's communicator, builds the same model from the same seed, applies expert
parallelism, and trains with the ZeRO-1 `DistributedOptimizer` (bf16 weights, fp32 masters and bf16
moments sharded over the replicas on accelerators, gradients reduce-scattered in buckets during backward).
Batches are a pure function of ``(seed, step)`` and a rank reads only its own rows of each, so a
resumed run replays exactly the batches an uninterrupted run would have seen, at any world size.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from tokenizers import Tokenizer

from ..backend import Backend, get_backend
from ..comm import Communicator
from ..errors import ConfigError, RunError, UserError
from ..fileio import FolderLock, atomic_write_text
from ..models import DeepseekV3, build_model
from ..models.deepseek_v3 import enable_fp8, require_fp8
from ..ops.attention import eos_boundaries
from .checkpoint import (
    CheckpointReader,
    ExpertSlice,
    list_checkpoints,
    load_optimizer,
    load_weights,
    remove_partials,
    save_checkpoint,
)
from .config import GRAPH_EXCLUDES, TrainConfig, check_resumable, check_world, model_config, to_dict
from .corpus import TokenSequence, iter_windows, load_training_tokens
from .graphs import CapturedMarks, GraphedStep, phase_ms
from .kinds import describe_kinds, device_type_of, job_adaptor, job_weight_mode, rank_backend
from .metrics import MetricsLogger
from .parallel import ParallelLayout
from .profile import StepProfiler
from .schedule import lr_at
from .zero import DeviceSchedule, DistributedOptimizer, master_dtype, named_spaces

__all__ = ["TrainResult", "batch_at", "lr_at", "train"]


@dataclass
class TrainResult:
    losses: list[float]
    val_loss: float
    tokens_per_second: float
    checkpoint: Path | None
    sample: str
    backend: str
    parameters: int
    mfu: float | None = None  # per device
    extra: dict[str, Any] = field(default_factory=dict)


def _windows(tokens: TokenSequence, starts: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    chunk = torch.from_numpy(np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts]))
    return chunk[:, :-1], chunk[:, 1:]


def batch_starts(n_tokens: int, step: int, cfg: TrainConfig) -> list[int]:
    """Where the ``global_batch_size`` windows of ``step`` start: drawn from a generator seeded by (seed, step)."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    return torch.randint(0, n_tokens - cfg.seq_len - 1, (cfg.global_batch_size,), generator=gen).tolist()


def batch_at(tokens: TokenSequence, step: int, cfg: TrainConfig,
             rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels of ``rows`` of the global batch of ``step`` (only those windows are read)."""
    return _windows(tokens, batch_starts(len(tokens), step, cfg)[rows], cfg.seq_len)


def weight_dtype(cfg: TrainConfig, backend: Backend, device_types: set[str] | None = None) -> torch.dtype:
    """The weights' dtype on ``backend``; ``device_types``: those of every rank of the job (default: this
    rank's), so that a job whose ranks sit on different device types takes one regime (`job_weight_mode`)."""
    mode = job_weight_mode(cfg.dtype, device_types or {backend.device_type})
    return {"bf16": torch.bfloat16, "fp64": torch.float64}.get(mode, torch.float32)


def moment_dtype(cfg: TrainConfig, weights: torch.dtype) -> torch.dtype:
    """The AdamW moments' dtype for weights of dtype ``weights`` (`weight_dtype`): ``moment_dtype: auto`` gives
    bf16 moments in the accelerator regime (``dtype: auto`` resolved to bf16 weights), the master's dtype
    anywhere else; ``master`` the master's; ``bf16`` bf16."""
    if cfg.moment_dtype == "bf16" or (cfg.moment_dtype == "auto" and cfg.dtype == "auto"
                                      and weights == torch.bfloat16):
        return torch.bfloat16
    return master_dtype(weights)


def _autocast(backend: Backend, cfg: TrainConfig) -> contextlib.AbstractContextManager:
    if cfg.dtype != "autocast":
        return contextlib.nullcontext()
    return torch.autocast(device_type=backend.device_type, dtype=torch.bfloat16)


@torch.no_grad()
def greedy_sample(model: DeepseekV3, tok: Tokenizer, prompt: str, n_tokens: int, seq_len: int,
                  device: torch.device, autocast: contextlib.AbstractContextManager) -> str:
    ids = tok.encode(prompt).ids or [0]
    for _ in range(n_tokens):
        context = torch.tensor([ids[-seq_len:]], device=device)
        with autocast:
            logits = model(context)
        ids.append(int(logits[0, -1].argmax()))
    return tok.decode(ids)


def documents(input_ids: torch.Tensor, cfg: TrainConfig, eos_id: int) -> torch.Tensor | None:
    """The document boundaries attention keeps to (``cu_seqlens``) with ``document_mask``, else None."""
    return eos_boundaries(input_ids, eos_id) if cfg.document_mask else None


@torch.no_grad()
def evaluate(model: DeepseekV3, tokens: TokenSequence, cfg: TrainConfig, batch: int, device: torch.device,
             autocast: contextlib.AbstractContextManager, eos_id: int) -> float:
    """Mean loss over consecutive held-out windows (up to ``eval_batches`` batches of ``batch``), with the
    training's document masking (``eos_id``: the data's document separator)."""
    starts = list(iter_windows(len(tokens), cfg.seq_len))[: cfg.eval_batches * batch]
    if not starts:
        return float("nan")
    losses = []
    for i in range(0, len(starts), batch):
        x, y = _windows(tokens, starts[i:i + batch], cfg.seq_len)
        x = x.to(device)
        with autocast:
            losses.append(float(model.loss(x, y.to(device), cu_seqlens=documents(x, cfg, eos_id)).main))
    return float(np.mean(losses))


def _backend_for(cfg: TrainConfig, local_rank: int, local_world_size: int) -> Backend:
    name, index = rank_backend(cfg.backend, local_rank, local_world_size)
    backend = get_backend(name)
    return backend if backend.device_type == "cpu" else get_backend(name, device_index=index)


def join_world(cfg: TrainConfig) -> tuple[Communicator | None, Backend]:
    """This rank's backend, and the job's world communicator when this process is one rank of several
    (torchrun, SLURM, ``--nproc-per-node``; else None).

    Each rank takes its own backend (`rank_backend`: ``backend`` may name one per local rank) on the
    next device of its type. Ranks check in with their backend's name; when they differ, the job must
    use an adaptor that spans chip kinds (`job_adaptor`: ``hier`` by default).
    """
    from .launch import world_from_env

    world = world_from_env()
    backend = _backend_for(cfg, world.local_rank, world.local_world_size)
    if world.world_size == 1:
        return None, backend
    from ..comm import create
    from ..comm.rendezvous import init_distributed, world_kinds

    init_distributed(backend.device_type, backend.dist_backend, timeout=cfg.comm_timeout, kind=backend.name)
    adaptor = job_adaptor(cfg.comm_adaptor, world_kinds() or [backend.name])
    return create(adaptor or None, backend, timeout=cfg.comm_timeout), backend


def train(cfg: TrainConfig, *, resume: str | Path | None = None, console: Console | None = None,
          comm: Communicator | None = None) -> TrainResult:
    """Run a training job as configured; every rank of a job calls it. Rank 0 reports and returns the results.

    ``comm``: the world communicator (from `openseek_hal.comm.launch` in tests); by default the
    job's own when started by torchrun / SLURM / ``--nproc-per-node``, else one process.
    """
    joined = comm is None
    if joined:
        comm, backend = join_world(cfg)
    else:  # ranks of `openseek_hal.comm.launch`: one host, the local rank is the rank
        from .launch import world_from_env

        world = world_from_env()
        local = (world.local_rank, world.local_world_size) if world.world_size > 1 else \
            (comm.rank, comm.world_size)
        backend = _backend_for(cfg, *local)
    check_world(cfg, comm.world_size if comm is not None else 1)  # one clear error before any group is made
    kinds = [backend.name]
    if comm is not None:
        kinds = _check_same_config(cfg, comm, backend.name)
        if len(set(kinds)) > 1:
            job_adaptor(getattr(comm, "adaptor", None) or "torch", kinds)  # refuses one that cannot span kinds
    layout = ParallelLayout(comm, cfg.expert_parallel) if comm is not None else ParallelLayout(None)
    if not layout.is_main:
        console = Console(file=io.StringIO())
    elif console is None:
        console = Console()
    lock = FolderLock(Path(cfg.out), what="run folder") if layout.is_main else contextlib.nullcontext()
    with lock:
        result = _Run(cfg, layout, console, resume, backend, kinds).train()
    if joined and comm is not None:  # on an error the process exits, and the launcher ends the others
        from ..comm import shutdown

        shutdown()
    return result


_NAME_BYTES = 64  # a backend name, UTF-8, padded: exchanged with the config digest


def _check_same_config(cfg: TrainConfig, comm: Communicator, backend_name: str) -> list[str]:
    """Every rank must run the same configuration (ranks started with other flags would train other
    models, or deadlock): compare a digest of it across the ranks, at start. The one field that may
    differ is ``backend`` (nodes of different chips started with their own ``--backend``); each rank's
    resolved backend name travels with the digest. Returns every rank's backend name."""
    fields = {k: v for k, v in to_dict(cfg).items() if k != "backend"}
    text = json.dumps(fields, sort_keys=True, default=str).encode()
    digest = int.from_bytes(hashlib.sha256(text).digest()[:7], "big")
    name = backend_name.encode()[:_NAME_BYTES].ljust(_NAME_BYTES, b"\0")
    row = torch.cat([torch.tensor([digest], dtype=torch.int64),
                     torch.frombuffer(bytearray(name), dtype=torch.int64)])
    device = getattr(comm, "device", torch.device("cpu"))
    mine = row.to(device)
    every = torch.empty(comm.world_size * row.numel(), dtype=torch.int64, device=device)
    comm.all_gather(every, mine)
    rows = every.cpu().view(comm.world_size, -1)
    digests = rows[:, 0].tolist()
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        from ..comm.rendezvous import ranks_text

        raise ConfigError(f"{ranks_text(differ)} started with another configuration than rank 0; every rank of a "
                          "job must get the same options (only backend may differ between ranks)")
    return [bytes(r[1:].contiguous().view(torch.uint8).tolist()).rstrip(b"\0").decode(errors="replace")
            for r in rows]


def share_op_choices(backend: Backend, comm: Communicator) -> None:
    """Give every rank rank 0's kernel choices (`Backend.op_choices`, e.g. cuda's timed attention and FP8
    GEMM picks). Called after the first step, when each rank has timed its shapes on its own: from then on
    all ranks compute with the same kernels, as a resume (which presets rank 0's saved choices) does."""
    device = getattr(comm, "device", torch.device("cpu"))
    payload = json.dumps(backend.op_choices(), sort_keys=True).encode() if comm.rank == 0 else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    comm.broadcast(size, src=0)
    n = int(size.item())
    if n == 0:
        return
    buf = (torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device) if comm.rank == 0
           else torch.empty(n, dtype=torch.uint8, device=device))
    comm.broadcast(buf, src=0)
    if comm.rank != 0:
        backend.preset_op_choices(json.loads(bytes(buf.cpu().tolist())))


@torch.no_grad()
def broadcast_weights(model: torch.nn.Module, comm: Communicator, chunk_bytes: int = 64 * 2**20) -> None:
    """Copy rank 0's parameters and buffers to every rank (a job whose ranks draw their initial weights
    on different device types), through ``comm`` in flat chunks of one dtype."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.numel()]
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        group: list[torch.Tensor] = []
        size = 0
        for t in [t for t in tensors if t.dtype == dtype] + [None]:
            if t is not None:
                group.append(t)
                size += t.numel() * t.element_size()
            if group and (t is None or size >= chunk_bytes):
                flat = torch.cat([g.detach().reshape(-1) for g in group])
                comm.broadcast(flat, src=0)
                offset = 0
                for g in group:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()
                group, size = [], 0


class _Run:
    """One rank's training job."""

    def __init__(self, cfg: TrainConfig, layout: ParallelLayout, console: Console, resume: str | Path | None,
                 backend: Backend, kinds: list[str]):
        self.cfg, self.layout, self.console = cfg, layout, console
        self.dp, self.micro, self.accum = check_world(cfg, layout.world_size)
        self.backend = backend
        self.kinds = kinds  # every rank's backend name
        self.mixed = len(set(kinds)) > 1
        self.device_types = {device_type_of(k) for k in kinds} | {backend.device_type}
        if cfg.fp8:
            require_fp8(backend)  # before any data is read: one line, exit 2
        self.device = backend.device.torch_device
        self.out = Path(cfg.out)
        self.reader = CheckpointReader(resume) if resume is not None else None
        if self.reader is not None:
            check_resumable(self.reader.state["config"], self.reader.step, cfg, str(self.reader.path))
        self.start_step = self.reader.step if self.reader is not None else 0

    # -- setup -----------------------------------------------------------------------------------
    def _prepare_folder(self) -> None:
        """Rank 0: refuse to clobber another run's checkpoints; remove leftovers of an interrupted save."""
        existing = [s for s in list_checkpoints(self.out) if s > self.start_step]
        if existing:
            what = "resuming from step " + str(self.start_step) if self.reader is not None else "a new run"
            raise UserError(f"{self.out} already holds checkpoint step_{existing[0]:06d}; {what} would replace it "
                            "(resume from the latest checkpoint, or choose another --out)")
        self.out.mkdir(parents=True, exist_ok=True)
        remove_partials(self.out)

    def _load_data(self) -> None:
        cfg = self.cfg
        # rank 0 trains (and caches) the tokenizer first; the others then read it from the cache
        if not self.layout.is_main:
            self.layout.barrier()
        data = load_training_tokens(cfg.data, cfg.tokenizer_vocab_size, self.console)
        if self.layout.is_main:
            self.layout.barrier()
        self.tok, self.tok_path = data.tokenizer, data.tokenizer_path
        self.eos_id = data.eos_id
        split = int(len(data.tokens) * 0.95)
        self.train_tokens, self.val_tokens = data.tokens[:split], data.tokens[split:]
        if len(self.train_tokens) <= cfg.seq_len + 1:
            raise UserError(f"data has {len(self.train_tokens)} training tokens; "
                            f"need more than seq_len + 1 = {cfg.seq_len + 1}")

    def _build(self) -> None:
        cfg, layout = self.cfg, self.layout
        self.dtype = weight_dtype(cfg, self.backend, self.device_types)
        model = build_model(model_config(cfg, vocab_size=self.tok.get_vocab_size()), self.backend, seed=cfg.seed,
                            dtype=self.dtype)
        if self.mixed and layout.world is not None:  # other device types draw other initial weights
            broadcast_weights(model, layout.world)
        self.n_params = model.num_parameters()  # before expert parallelism: the model's whole size
        if cfg.fp8:  # before expert parallelism, whose shards take the experts' grouped op
            enable_fp8(model, self.backend, exclude=[g.strip() for g in cfg.fp8_exclude.split(",") if g.strip()])
        self.flops_per_token = model.flops_per_token(cfg.seq_len)
        self.expert_of = lambda p: None
        if layout.ep_comm is not None:
            from .expert_parallel import apply_expert_parallel, expert_shard

            apply_expert_parallel(model, layout.ep_comm, overlap=cfg.expert_overlap, timing=True,
                                  dispatch=cfg.expert_dispatch)
            self.expert_of = lambda p: ExpertSlice(*expert_shard(p)) if expert_shard(p) is not None else None
        if cfg.recompute or cfg.compile:
            from .recompute import wrap_blocks

            wrap_blocks(model, recompute=cfg.recompute, compile=cfg.compile, backend=self.backend,
                        console=self.console)
        self.model = model
        master = master_dtype(self.dtype)
        reduce = torch.bfloat16 if cfg.reduce_dtype == "bf16" else master
        moments = moment_dtype(cfg, self.dtype)
        spaces = named_spaces(model, layout.world, layout.expert_dp_comm, lambda p: self.expert_of(p) is not None)
        self.optimizer = DistributedOptimizer(spaces, self.backend, world=layout.world, lr=cfg.lr,
                                              betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                              weight_decay=cfg.weight_decay, bucket_mb=cfg.bucket_mb,
                                              master_dtype=master, reduce_dtype=reduce, moment_dtype=moments,
                                              # one micro-batch: the gradient autograd made, in its own dtype
                                              grad_dtype=self.dtype if self.accum == 1 else None,
                                              overlap_update=cfg.optimizer_overlap, exchange=cfg.grad_exchange,
                                              master_remainder=cfg.master_remainder)
        # each block, MTP module and the final norm waits for its weights when the forward reaches it;
        # the embedding's bucket (gathered first) is waited for before the forward
        self.optimizer.gather_before_use([*model.layers, *model.mtp, model.norm])
        if self.reader is not None:
            load_weights(self.reader, model, self.expert_of)  # the buffers too (the routing bias)
            load_optimizer(self.reader, self.optimizer, self.expert_of)
        peak = self.backend.capabilities().peak_flops
        # a job over different chips has no one peak to measure against: no MFU
        self.peak = None if self.mixed else peak.get(torch.float32 if self.backend.device_type == "cpu"
                                                     else torch.bfloat16)

    # -- the loop --------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        cfg, layout, console = self.cfg, self.layout, self.console
        if layout.is_main:
            self._prepare_folder()
        layout.barrier()
        self.backend.device.manual_seed(cfg.seed)
        console.print(f"[bold]openseek-hal train[/] backend={self.backend.name} device={self.backend.device.name()}"
                      + (f" ranks={layout.world_size} (expert parallel {cfg.expert_parallel})"
                         if layout.world_size > 1 else "")
                      + (f" backends {describe_kinds(self.kinds)} through {getattr(layout.world, 'adaptor', '?')}"
                         if self.mixed else ""))
        self._load_data()
        self._build()
        losses = list(self.reader.state.get("losses", []))[:self.start_step] if self.reader is not None else []
        if self.reader is not None:
            self.backend.preset_op_choices(self.reader.state.get("op_choices", {}))
            console.print(f"resumed from {self.reader.path} at step {self.start_step}")
        if layout.is_main:
            atomic_write_text(self.out / "tokenizer.json", Path(self.tok_path).read_text(encoding="utf-8"))
            atomic_write_text(self.out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        mem = self.optimizer.memory_bytes()
        console.print(f"model: {self.n_params / 1e6:.2f}M parameters, {cfg.steps} steps of "
                      f"{cfg.global_batch_size}x{cfg.seq_len} tokens; {self.dp} data-parallel ranks x "
                      f"{self.accum} micro-batch(es) of {self.micro}; weights {str(self.dtype)[6:]}, "
                      f"moments {str(self.optimizer.moment_dtype)[6:]}, "
                      f"optimizer state {mem['optimizer'] / 2**20:,.1f} MiB per rank")
        self.backend.device.reset_peak_memory()
        autocast = _autocast(self.backend, cfg)
        tokens_per_step = cfg.global_batch_size * cfg.seq_len
        timed_tokens, timed_seconds = 0, 0.0
        graphed = self._graphed_step(autocast)
        phases = _PhaseTimer(self.backend, graphed)
        profiler = StepProfiler(self.out, layout.rank, self.backend.device, cfg.profile_step) \
            if cfg.profile_step else None
        self.model.train()
        columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
        metrics = MetricsLogger(self.out, use_wandb=cfg.wandb, run_name=self.out.name, config=to_dict(cfg),
                                resume_step=self.start_step if self.reader is not None else None,
                                enabled=layout.is_main)
        # the steps since the last read: this rank's reduced losses and the gradient norms, on the device
        pending: list[torch.Tensor] = []
        pending_norms: list[torch.Tensor] = []
        grad_norm = float("nan")
        per_rank = cfg.global_batch_size // self.dp
        first = layout.rank * per_rank
        ckpt_path = self.out / "checkpoints" / f"step_{cfg.steps:06d}"
        # the first step pays for warm-up (allocator, kernel compilation, timed op choices); a graphed run's
        # second step for the capture
        timed_from = self.start_step + (2 if graphed is not None else 1)
        with metrics, Progress(*columns, console=console, transient=True, disable=not layout.is_main) as progress, \
                (graphed.stream() if graphed is not None else contextlib.nullcontext()):
            task = progress.add_task("training", total=cfg.steps, completed=self.start_step)
            t_timed = None
            for step in range(self.start_step, cfg.steps):
                if step == self.start_step + 1 and layout.world is not None and layout.world_size > 1 \
                        and not self.mixed:
                    share_op_choices(self.backend, layout.world)
                if step == timed_from:
                    self.backend.device.synchronize()
                    t_timed = time.perf_counter()
                lr = lr_at(step, cfg)
                if profiler is not None:
                    profiler.before(step + 1)
                phases.mark("start")
                batches = [batch_at(self.train_tokens, step, cfg, slice(lo, lo + self.micro))
                           for lo in range(first, first + self.accum * self.micro, self.micro)]
                if graphed is None:
                    inputs = [tuple(t.to(self.device, non_blocking=True) for t in b) for b in batches]
                    loss_mean, norm, aux_sum, mtp_sum = self._step(inputs, lr, autocast, phases)
                else:
                    loss_mean, norm, aux_sum, mtp_sum = graphed(batches, lr)
                    phases.mark("step")
                # The loss and the gradient norm stay on the device until they are read (to log, or before a
                # checkpoint is written), so the host queues the next steps while the device works.
                pending.append(loss_mean)
                pending_norms.append(norm.detach().reshape(()).to(torch.float64))
                phases.end_step(count=step >= timed_from)
                done = step + 1
                if profiler is not None and (folder := profiler.after(done)) is not None and layout.is_main:
                    progress.console.print(f"profile of steps {cfg.profile_step}-{done}: {folder}")
                progress.update(task, completed=done)
                if done % cfg.log_every == 0 or done == cfg.steps or (cfg.save and cfg.save_every
                                                                        and done % cfg.save_every == 0):
                    read = torch.stack(pending).tolist()  # waits for the device: the clock below is real
                    norms = torch.stack(pending_norms).tolist()
                    pending.clear()
                    pending_norms.clear()
                    for i, (loss_value, norm) in enumerate(zip(read, norms, strict=True)):
                        # a non-finite norm makes the next loss non-finite: the first bad value names the step
                        if not (math.isfinite(loss_value) and math.isfinite(norm)):
                            what = f"loss became {loss_value}" if not math.isfinite(loss_value) else \
                                f"the gradient norm became {norm}"
                            raise RunError(f"{what} at step {done - len(read) + i + 1}; lower lr or check the data")
                    losses.extend(read)
                    grad_norm = norms[-1]
                    if t_timed is not None:
                        timed_seconds = time.perf_counter() - t_timed
                        timed_tokens = (done - timed_from) * tokens_per_step
                if done % cfg.log_every == 0 or done == cfg.steps:
                    row = self._log_row(losses[-1], lr, grad_norm, timed_tokens, timed_seconds, phases)
                    extra = (("mtp_loss", mtp_sum), ("aux_loss", aux_sum))
                    row.update({k: layout.mean(v.detach() / self.accum) for k, v in extra if v is not None})
                    metrics.log(done, row)
                    progress.console.print(_log_line(done, cfg.steps, row))
                if cfg.save and cfg.save_every and done % cfg.save_every == 0 and done != cfg.steps:
                    self._save(done, losses)
            if not cfg.save:
                ckpt_path = None
            elif self.start_step < cfg.steps or self.reader is None:
                ckpt_path = self._save(cfg.steps, losses)
            else:  # resumed at its last step: nothing new to save
                ckpt_path = self.reader.path
            self.model.eval()
            eval_batch = max(1, min(self.micro, cfg.global_batch_size))
            val_loss = evaluate(self.model, self.val_tokens, cfg, eval_batch, self.device, autocast, self.eos_id)
            metrics.log(cfg.steps, {"val_loss": val_loss})
        sample = greedy_sample(self.model, self.tok, "The ", cfg.sample_tokens, cfg.seq_len, self.device, autocast)
        tps = timed_tokens / timed_seconds if timed_seconds else float("nan")
        mfu = tps / layout.world_size * self.flops_per_token / self.peak if self.peak and timed_seconds else None
        peak_mem = layout.max(float(self.backend.device.memory_stats()["peak_allocated"]))
        console.print(f"done: loss {losses[0]:.3f} -> {losses[-1]:.3f}, val loss {val_loss:.3f}, {tps:,.0f} tokens/s"
                      + (f" ({tps / layout.world_size:,.0f} per device)" if layout.world_size > 1 else "")
                      + (f", MFU {100 * mfu:.1f}% per device" if mfu is not None else "")
                      + f", peak memory {peak_mem / 2**20:,.0f} MiB per rank (max)")
        console.print(f"checkpoint: {ckpt_path}" if ckpt_path is not None else "checkpoint: none (save: false)")
        console.rule("greedy sample")
        console.print(sample, markup=False, highlight=False)
        self.optimizer.close()
        extra = {"peak_memory_bytes": peak_mem, "optimizer_bytes": mem["optimizer"], "world_size": layout.world_size,
                 "phases_ms": phases.totals_ms(), "accumulation": self.accum, "backends": self.kinds,
                 "weight_dtype": str(self.dtype).replace("torch.", "")}
        return TrainResult(losses=losses, val_loss=val_loss, tokens_per_second=tps, checkpoint=ckpt_path,
                           sample=sample, backend=self.backend.name, parameters=self.n_params, mfu=mfu, extra=extra)

    def _step(self, inputs: list[tuple[torch.Tensor, ...]], lr: float, autocast: Any,
              phases: _PhaseTimer | CapturedMarks | None, schedule: DeviceSchedule | None = None
              ) -> tuple[torch.Tensor, ...]:
        """One optimizer step over the micro-batches ``inputs`` (device tensors): forward and backward of each,
        the gradient exchange, the expert-bias update and the optimizer's. Returns the step's mean loss, the
        gradient norm, and the aux and MTP loss sums (device tensors; None where the model has none)."""
        cfg, layout = self.cfg, self.layout
        mark = phases.mark if phases is not None else (lambda phase: None)
        self.optimizer.start_step(self.accum)
        loss_sum = aux_sum = mtp_sum = None
        for x, y in inputs:
            with autocast:
                loss = self.model.loss(x, y, cu_seqlens=documents(x, cfg, self.eos_id))
            mark("forward")
            loss.total.backward()
            mark("backward")
            self.optimizer.next_micro_batch()
            loss_sum = _add(loss_sum, loss.main.detach())
            aux_sum, mtp_sum = _add(aux_sum, loss.aux), _add(mtp_sum, loss.mtp)
        self.optimizer.finish_gradients()  # every rank has now issued every reduce-scatter, in order
        # the step's small all-reduces (expert loads, loss) go before the weight all-gathers are
        # queued: on the same communicator they would wait for all of them
        self.model.update_expert_bias(layout.world)  # aux-loss-free balancing, loads summed over all ranks
        loss_mean = layout.mean_tensor(loss_sum / self.accum)
        mark("grad_sync")
        stats = self.optimizer.update(lr, cfg.grad_clip, schedule)
        mark("optimizer")
        if isinstance(phases, _PhaseTimer) and self.optimizer.update_span is not None:  # beside the next forward
            phases.span("optimizer_overlapped", *self.optimizer.update_span)
        self.optimizer.wait_weights(lazy=True)  # each block waits for its own weights on first use
        mark("weight_sync")
        return loss_mean, stats.grad_norm, aux_sum, mtp_sum

    def _graphed_step(self, autocast: Any) -> GraphedStep | None:
        """`graph_step`: the step as a `GraphedStep` on this backend's device; None when not asked for, or
        (with a notice) when the backend has no device graphs. "auto" captures where "true" would run, on a
        backend with device graphs, unless a profile is asked for (it would see one launch a step)."""
        cfg = self.cfg
        if cfg.graph_step == "false":
            return None
        auto = cfg.graph_step == "auto"  # eager, without a word, wherever "true" would refuse or warn
        if self.layout.world_size > 1:
            if auto:
                return None
            raise ConfigError(f"graph_step runs on one rank; this job has {self.layout.world_size} (a step's "
                              "collectives are not captured yet)")
        if not self.backend.capabilities().graphs:
            if not auto:
                self.console.print(f"[yellow]graph_step: the {self.backend.name} backend has no device graphs; "
                                   "running eagerly[/]")
            return None
        if auto and (cfg.profile_step or any(getattr(cfg, k) for k in GRAPH_EXCLUDES)):
            return None
        self.console.print(f"graph_step={cfg.graph_step}: the step is captured as one device graph after one "
                           "eager step, then replayed (graph_step=false runs every step eagerly)")
        schedule = DeviceSchedule(self.device)
        # the update reads lr from `schedule` (GraphedStep fills it before each step), not the number passed
        return GraphedStep(self.backend.device.graph(),
                           lambda inputs, marks: self._step(inputs, 0.0, autocast, marks, schedule),
                           self.optimizer, schedule, self.device)

    def _log_row(self, loss: float, lr: float, grad_norm: float, tokens: int, seconds: float,
                 phases: _PhaseTimer) -> dict[str, float]:
        tps = tokens / seconds if seconds else float("nan")
        world = self.layout.world_size
        row = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps,
               "tokens_per_s_per_device": tps / world}
        if self.peak:
            row["mfu"] = tps / world * self.flops_per_token / self.peak
        row["peak_memory_mib"] = self.layout.max(self.backend.device.memory_stats()["peak_allocated"] / 2**20)
        row.update({f"{k}_ms": v for k, v in phases.mean_ms().items()})
        row.update(self._all_to_all_row())
        return row

    def _all_to_all_row(self) -> dict[str, float]:
        """Expert parallelism: dispatch + combine time per MoE layer and micro-batch, and the share hidden."""
        if self.layout.ep_comm is None:
            return {}
        from .expert_parallel import layer_timings

        times = list(layer_timings(self.model).values())
        forwards = sum(t.forwards for t in times)
        if not forwards:
            return {}
        total = sum(t.total_s + t.backward_s for t in times)
        exposed = sum(t.exposed_s + t.backward_s for t in times)
        return {"a2a_ms_per_layer": 1e3 * total / forwards, "a2a_exposed_ms_per_layer": 1e3 * exposed / forwards,
                "a2a_hidden_fraction": 1.0 - exposed / total if total else 0.0}

    def _save(self, step: int, losses: list[float]) -> Path:
        layout = self.layout
        self.optimizer.wait_weights()
        # the kernels the backend chose by timing (rank 0's): a resume presets them, so it computes the same way
        state = {"config": to_dict(self.cfg), "losses": losses, "tokenizer": str(self.tok_path),
                 "op_choices": self.backend.op_choices()}
        return save_checkpoint(self.out, step, self.model, self.optimizer, state, rank=layout.rank,
                               world_size=layout.world_size, barrier=layout.barrier, expert_of=self.expert_of,
                               expert_parallel=self.cfg.expert_parallel, writes_dense=layout.is_main,
                               writes_experts=layout.expert_replica == 0)


def _add(total: torch.Tensor | None, value: torch.Tensor | None) -> torch.Tensor | None:
    if value is None:
        return total
    value = value.detach()
    return value if total is None else total + value


def _log_line(done: int, steps: int, row: dict[str, float]) -> str:
    mfu = f"  mfu {100 * row['mfu']:.1f}%" if "mfu" in row else ""
    comm = row.get("grad_sync_ms", 0.0) + row.get("weight_sync_ms", 0.0)
    times = (f"fwd {row.get('forward_ms', 0):.0f} bwd {row.get('backward_ms', 0):.0f} "
             f"opt {row.get('optimizer_ms', 0):.0f} comm {comm:.0f} ms")
    if row.get("step_ms"):  # a captured step: its device time, and its phases where the graph could time them
        times = f"graph {row['step_ms']:.0f} ms" + (f" ({times})" if "forward_ms" in row else "")
    return (f"step {done:>5}/{steps}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  grad {row['grad_norm']:.3f}  "
            f"tok/s {row['tokens_per_s']:,.0f}{mfu}  {times}")


class _PhaseTimer:
    """Device-side time of each phase of a step (forward, backward, exposed communication, optimizer).

    Events are recorded on the compute stream without synchronizing and read at log time, so
    timing costs no host-device round trip.
    """

    # "step": a captured step (graph_step), timed from outside each replay; its phases are those of the
    # latest replay (`GraphedStep.last_replay_ms`: the capture's own timing events)
    PHASES = ("forward", "backward", "grad_sync", "optimizer", "weight_sync", "optimizer_overlapped", "step")

    def __init__(self, backend: Backend, graphed: GraphedStep | None = None):
        self._device = backend.device
        self._marks: list[tuple[str, Any]] = []
        self._spans: list[tuple[str, Any, Any]] = []
        self._steps_pending: list[tuple[list[tuple[str, Any]], list[tuple[str, Any, Any]]]] = []
        self._sums = dict.fromkeys(self.PHASES, 0.0)
        self._steps = 0
        self._window = dict.fromkeys(self.PHASES, 0.0)
        self._window_steps = 0
        self._graphed = graphed
        # marked here: the eager phases, or (``graphed``) the captured step as a whole
        self._reported = {"step"} if graphed is not None else set(self.PHASES) - {"step"}

    def mark(self, phase: str) -> None:
        event = self._device.event(enable_timing=True)
        event.record()
        self._marks.append((phase, event))

    def span(self, phase: str, start: Any, end: Any) -> None:
        """Add ``phase``'s time between two timing events recorded elsewhere (another stream's work,
        which runs beside the marked phases and so is not part of their sum)."""
        self._spans.append((phase, start, end))

    def end_step(self, count: bool = True) -> None:
        """Close the step; ``count=False`` drops it (the first step, which pays for warm-up)."""
        if count:
            self._steps_pending.append((self._marks, self._spans))
        self._marks, self._spans = [], []

    def _flush(self) -> None:
        if not self._steps_pending:
            return
        self._device.synchronize()
        for marks, spans in self._steps_pending:
            times = phase_ms(marks)
            for phase, start, end in spans:
                times[phase] = times.get(phase, 0.0) + start.elapsed_time(end)
            for phase, ms in times.items():
                self._sums[phase] += ms
                self._window[phase] += ms
            self._steps += 1
            self._window_steps += 1
        self._steps_pending.clear()

    def mean_ms(self) -> dict[str, float]:
        """Mean per step since the last call (synchronizes with the device)."""
        self._flush()
        out = {k: v / max(1, self._window_steps) for k, v in self._window.items() if k in self._reported}
        self._window = dict.fromkeys(self.PHASES, 0.0)
        self._window_steps = 0
        return out | self._replayed()

    def totals_ms(self) -> dict[str, float]:
        self._flush()
        return {k: v / max(1, self._steps) for k, v in self._sums.items() if k in self._reported} | self._replayed()

    def _replayed(self) -> dict[str, float]:
        """A captured step's phases, from its latest replay."""
        return self._graphed.last_replay_ms() if self._graphed is not None else {}
