"""`openseek-hal train`: train on the built-in corpus (or ``--data``) with the chosen backend."""

from __future__ import annotations

import sys

import click
import yaml

from .config import check_world, load_config, resumed_config


def _parse_value(text: str) -> object:
    """``--set`` values are YAML scalars: 256 -> int, 1e-3 -> float, true -> bool, null -> None."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


@click.command()
@click.option("--backend", "-b", default=None,
              help="Backend name (default: $OPENSEEK_HAL_BACKEND or the best available), or one per local rank "
                   "(cuda,cpu or cuda=1,cpu=1 with -n 2): a job mixing chip kinds, through the hier adaptor.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimizer steps.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML file of TrainConfig fields (see docs/train.md); options given here override it.")
@click.option("--data", type=click.Path(), default=None,
              help="A .txt/.md/.jsonl(.gz/.zst) file, a folder of them, a data-stage output, or a token-shard "
                   "folder from `openseek-hal data tokenize` (default: Python's bundled documentation).")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run folder (default: runs/default).")
@click.option("--resume", type=click.Path(), default=None,
              help="Continue from a checkpoint or run folder, with its settings (options may change only those "
                   "that keep the run exact: steps, out, logging, parallel layout).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Sequences per optimizer step over all ranks (global_batch_size, default 16).")
@click.option("--seq-len", type=click.IntRange(min=2), default=None, help="Tokens per sequence (default 128).")
@click.option("--lr", type=float, default=None, help="Peak learning rate (default 3e-3).")
@click.option("--seed", type=int, default=None, help="Seed of the weights and the batches (default 0).")
@click.option("--nproc-per-node", "-n", "nproc_per_node", type=click.IntRange(min=1), default=None,
              help="Ranks to start on this host, one device each, as torchrun does (default 1). Under torchrun "
                   "or srun the launcher has started the ranks already.")
@click.option("--model", "model_preset", default=None,
              help="DeepSeek-V3 preset (tiny, openseek-small, deepseek-v3) or a YAML file of config fields.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override any config field; model fields are dotted (e.g. --set model.num_hidden_layers=2).")
def train(backend, steps, config_path, data, out, resume, batch_size, seq_len, lr, seed, nproc_per_node,
          model_preset, sets) -> None:
    """Train a model through the HAL on one device or many; saves sharded checkpoints and prints a greedy sample.

    Many devices: -n G on one host, or run this command under torchrun or srun. Data parallelism is
    ZeRO-1; --set expert_parallel=E spreads the routed experts over E ranks; --set micro_batch_size=M
    accumulates gradients. One rank on a GPU captures the step as a device graph after one eager step
    (--set graph_step=false runs every step eagerly). Every config field is in docs/train.md.
    """
    from .launch import die_with_parent, spawn_local, world_from_env

    die_with_parent()  # a rank of `train -n G` or torchrun: go when the launcher goes
    overrides = {k: v for k, v in dict(backend=backend, steps=steps, data=data, out=out,
                                       global_batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed,
                                       model_preset=model_preset).items()
                 if v is not None}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        overrides[key] = _parse_value(value)
    if resume is None:
        cfg = load_config(config_path, overrides)  # here too under -n: a bad config is one error, not one per rank
    else:  # the checkpoint's settings, with only the overrides that keep the run exact
        from ..fileio import read_yaml_mapping
        from .checkpoint import CheckpointReader

        reader = CheckpointReader(resume)
        given = {**(read_yaml_mapping(config_path, "config file") if config_path else {}), **overrides}
        cfg = resumed_config(reader.state["config"], reader.step, given, str(reader.path))
    world = world_from_env()
    if nproc_per_node is not None and world.world_size > 1 and nproc_per_node != world.local_world_size:
        raise click.BadParameter(f"{nproc_per_node} ranks asked for, but this process is rank {world.rank} of a "
                                 f"{world.source} job with {world.local_world_size} rank(s) per node",
                                 param_hint="--nproc-per-node")
    if nproc_per_node is not None and nproc_per_node > 1 and world.world_size == 1:
        check_world(cfg, nproc_per_node)  # a batch or expert layout that does not fit: one error, before any rank
        from .kinds import rank_backend

        rank_backend(cfg.backend, 0, nproc_per_node)  # per-rank backends that do not fit -n: the same
        argv = _forward_args(click.get_current_context().params)
        sys.exit(spawn_local(argv, nproc_per_node, timeout=cfg.comm_timeout))

    from .trainer import train as run_training

    run_training(cfg, resume=resume)


def _forward_args(params: dict) -> list[str]:
    """This command's options, as given, for the ranks: everything but ``--nproc-per-node``."""
    args: list[str] = []
    for name, value in params.items():
        if name == "nproc_per_node" or value is None:
            continue
        flag = "--config" if name == "config_path" else "--model" if name == "model_preset" else \
            "--" + name.replace("_", "-")
        if name == "sets":
            for item in value:
                args += ["--set", item]
        else:
            args += [flag, str(value)]
    return args
