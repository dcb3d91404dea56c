"""The training loop: data windows, AdamW with warmup + cosine decay, logging, checkpoints, a sample.

Batches are a pure function of ``(seed, step)``, so resuming from a checkpoint replays exactly the
batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import io
import math
import shutil
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

from ..backend import Backend, default_backend_name, get_backend
from ..comm import Communicator
from ..errors import RunError, UserError
from ..models import DeepseekV3, build_model
from .checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from .config import TrainConfig, model_config, to_dict
from .corpus import TokenSequence, iter_windows, load_training_tokens
from .metrics import MetricsLogger
from .optim import AdamW
from .parallel import DataParallel


@dataclass
class TrainResult:
    losses: list[float]
    val_loss: float
    tokens_per_second: float
    checkpoint: Path
    sample: str
    backend: str
    parameters: int
    mfu: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def _windows(tokens: TokenSequence, starts: list[int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    chunk = torch.from_numpy(np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts]))
    return chunk[:, :-1], chunk[:, 1:]


def batch_at(tokens: TokenSequence, step: int, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``step``: random windows drawn from a generator seeded by (seed, step)."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    starts = torch.randint(0, len(tokens) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
    return _windows(tokens, starts.tolist(), cfg.seq_len)


def _autocast(backend: Backend, cfg: TrainConfig) -> contextlib.AbstractContextManager:
    use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and backend.device_type != "cpu")
    if not use_bf16:
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


@torch.no_grad()
def evaluate(model: DeepseekV3, tokens: TokenSequence, cfg: TrainConfig, device: torch.device,
             autocast: contextlib.AbstractContextManager) -> float:
    """Mean loss over consecutive held-out windows (up to ``eval_batches`` batches)."""
    starts = list(iter_windows(len(tokens), cfg.seq_len))[: cfg.eval_batches * cfg.batch_size]
    if not starts:
        return float("nan")
    losses = []
    for i in range(0, len(starts), cfg.batch_size):
        x, y = _windows(tokens, starts[i:i + cfg.batch_size], cfg.seq_len)
        with autocast:
            losses.append(float(model.loss(x.to(device), y.to(device)).main))
    return float(np.mean(losses))


def train(cfg: TrainConfig, *, resume: str | Path | None = None, console: Console | None = None) -> TrainResult:
    """Run a training job as configured; returns the losses, throughput, checkpoint and sample.

    With ``cfg.data_parallel`` > 1, that many local ranks train one replica each (`parallel.DataParallel`)
    through ``cfg.comm_adaptor``; rank 0 reports, saves and returns.
    """
    if cfg.data_parallel == 1:
        return _train(cfg, resume, console or Console(), DataParallel(None))
    from ..comm import launch

    backend = cfg.backend or default_backend_name()
    return launch(_train_rank, cfg.data_parallel, backend=backend, adaptor=cfg.comm_adaptor, check=False,
                  timeout=600.0, args=(cfg, resume))[0]


def _train_rank(comm: Communicator, cfg: TrainConfig, resume: str | Path | None) -> TrainResult:
    console = Console() if comm.rank == 0 else Console(file=io.StringIO())
    return _train(cfg, resume, console, DataParallel(comm))


def _train(cfg: TrainConfig, resume: str | Path | None, console: Console, dp: DataParallel) -> TrainResult:
    backend = get_backend(cfg.backend)
    if dp.comm is not None and backend.device_type != "cpu":  # one device per rank
        backend = get_backend(cfg.backend, device_index=dp.rank)
    device = backend.device.torch_device
    backend.device.manual_seed(cfg.seed)
    console.print(f"[bold]openseek-hal train[/] backend={backend.name} device={backend.device.name()}")

    data = load_training_tokens(cfg.data, cfg.tokenizer_vocab_size, console)
    tok, tok_path = data.tokenizer, data.tokenizer_path
    split = int(len(data.tokens) * 0.95)
    train_tokens, val_tokens = data.tokens[:split], data.tokens[split:]
    if len(train_tokens) <= cfg.seq_len + 1:
        raise UserError(f"data has {len(train_tokens)} training tokens; need more than seq_len + 1 = {cfg.seq_len + 1}")

    model = build_model(model_config(cfg, vocab_size=tok.get_vocab_size()), backend, seed=cfg.seed,
                        dtype=torch.float64 if cfg.dtype == "fp64" else None)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                       {"params": no_decay, "weight_decay": 0.0}], backend, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    out = Path(cfg.out)
    if dp.is_main:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tok_path, out / "tokenizer.json")
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    start_step, losses = 0, []
    if resume is not None:
        state = load_checkpoint(resume, model, optimizer)
        start_step, losses = int(state["step"]), list(state.get("losses", []))
        console.print(f"resumed from {resolve_checkpoint(resume)} at step {start_step}")

    n_params = model.num_parameters()
    flops_per_token = model.flops_per_token(cfg.seq_len)
    peak = backend.capabilities().peak_flops.get(torch.bfloat16 if backend.device_type != "cpu" else torch.float32)
    console.print(f"model: {n_params / 1e6:.2f}M parameters, "
                  f"{cfg.steps} steps of {cfg.batch_size}x{cfg.seq_len} tokens"
                  + (f" over {dp.world_size} data-parallel ranks" if dp.world_size > 1 else ""))

    autocast = _autocast(backend, cfg)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    timed_tokens, timed_seconds = 0, 0.0
    model.train()
    columns = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    metrics = MetricsLogger(out, use_wandb=cfg.wandb, run_name=out.name, config=to_dict(cfg),
                            append=resume is not None, enabled=dp.is_main)
    with metrics, Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("training", total=cfg.steps, completed=start_step)
        for step in range(start_step, cfg.steps):
            t_step = time.perf_counter()
            x, y = (dp.shard(t).to(device, non_blocking=True) for t in batch_at(train_tokens, step, cfg))
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            with autocast:
                loss = model.loss(x, y)
            loss.total.backward()
            dp.average_gradients(model)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.update_expert_bias(dp.comm)  # aux-loss-free balancing, loads summed over the ranks
            loss_value = dp.mean(loss.main)  # synchronizes, so the step time below is real
            if not math.isfinite(loss_value):
                raise RunError(f"loss became {loss_value} at step {step + 1}; lower lr or check the data")
            losses.append(loss_value)
            if step > start_step:  # the first step pays for warm-up (allocator, kernel compilation)
                timed_seconds += time.perf_counter() - t_step
                timed_tokens += tokens_per_step
            done = step + 1
            progress.update(task, completed=done)
            if done % cfg.log_every == 0 or done == cfg.steps:
                tps = timed_tokens / timed_seconds if timed_seconds else float("nan")
                row = {"loss": loss_value, "lr": lr_at(step, cfg), "grad_norm": float(grad_norm),
                       "tokens_per_s": tps}
                extra = (("mtp_loss", loss.mtp), ("aux_loss", loss.aux))
                row.update({k: dp.mean(v) for k, v in extra if v is not None})
                if peak:
                    row["mfu"] = tps * flops_per_token / peak
                metrics.log(done, row)
                mfu = f"  mfu {100 * row['mfu']:.1f}%" if peak else ""
                progress.console.print(f"step {done:>5}/{cfg.steps}  loss {loss_value:.4f}  lr {row['lr']:.2e}  "
                                       f"grad {row['grad_norm']:.3f}  tok/s {tps:,.0f}{mfu}")
            if cfg.save_every and done % cfg.save_every == 0 and done != cfg.steps and dp.is_main:
                save_checkpoint(out, done, model, optimizer, _state(cfg, losses, tok_path))
        ckpt_path = out / "checkpoints" / f"step_{cfg.steps:06d}"  # the replicas are identical: rank 0 saves
        if dp.is_main:
            ckpt_path = save_checkpoint(out, cfg.steps, model, optimizer, _state(cfg, losses, tok_path))
        model.eval()
        val_loss = evaluate(model, val_tokens, cfg, device, autocast)
        metrics.log(cfg.steps, {"val_loss": val_loss})
    sample = greedy_sample(model, tok, "The ", cfg.sample_tokens, cfg.seq_len, device, autocast)
    tps = timed_tokens / timed_seconds if timed_seconds else float("nan")
    mfu = tps * flops_per_token / peak if peak and timed_seconds else None
    mem = backend.device.memory_stats()["peak_allocated"]
    console.print(f"done: loss {losses[0]:.3f} -> {losses[-1]:.3f}, val loss {val_loss:.3f}, {tps:,.0f} tokens/s"
                  + (f", MFU {100 * mfu:.1f}%" if mfu is not None else "")
                  + f", peak memory {mem / 2**20:,.0f} MiB")
    console.print(f"checkpoint: {ckpt_path}")
    console.rule("greedy sample")
    console.print(sample, markup=False, highlight=False)
    return TrainResult(losses=losses, val_loss=val_loss, tokens_per_second=tps, checkpoint=ckpt_path,
                       sample=sample, backend=backend.name, parameters=n_params, mfu=mfu)


def _state(cfg: TrainConfig, losses: list[float], tok_path: Path) -> dict[str, Any]:
    return {"config": to_dict(cfg), "losses": losses, "tokenizer": str(tok_path)}
