"""`openseek-hal convert`: DeepSeek-V3 checkpoints between the Hugging Face and native formats.

Streams one native tensor at a time from the source to size-bounded output shards, so a 671B
checkpoint converts on a machine with far less memory than the checkpoint. hf -> hf and
native -> native are allowed too: they reshard, change dtype or (from FP8) dequantize.
"""

from __future__ import annotations

import re

import click
import torch

_DTYPES = {"keep": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _parse_size(text: str) -> int:
    """``"4GB"`` / ``"500MiB"`` / ``"1024"`` -> bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not match or float(match.group(1)) <= 0:
        raise click.BadParameter(f"not a size: {text!r} (e.g. 4GB, 500MB)", param_hint="--shard-size")
    return int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2) or " "))


@click.command("convert")
@click.option("--from", "src_format", type=click.Choice(["hf", "native", "run"]), required=True,
              help="Format of SRC; run: a training run or checkpoint folder (sharded; expert shards are gathered).")
@click.option("--to", "dst_format", type=click.Choice(["hf", "native"]), required=True, help="Format to write.")
@click.option("--dtype", type=click.Choice(list(_DTYPES)), default="keep", show_default=True,
              help="Floating dtype of the output ('keep': as stored; FP8 weights become bfloat16).")
@click.option("--shard-size", default="4GB", show_default=True, help="Largest output shard.")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists and is not empty.")
@click.argument("src", type=click.Path(file_okay=False))
@click.argument("dst", type=click.Path(file_okay=False))
def convert(src_format: str, dst_format: str, dtype: str, shard_size: str, overwrite: bool, src: str, dst: str) -> None:
    """Convert the DeepSeek-V3 checkpoint directory SRC into DST, shard by shard.

    hf: a Hugging Face DeepseekV3ForCausalLM directory (config.json, safetensors, index; FP8 e4m3
    weights with weight_scale_inv block scales are dequantized). native: openseek-hal's format
    (see docs/model.md). run: a checkpoint of `openseek-hal train` (any world size; --from only).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .deepseek_v3.checkpoints import Sink, native_layout, open_source

    max_bytes = _parse_size(shard_size)
    out_dtype = _DTYPES[dtype]
    source = open_source(src_format, src)
    if out_dtype is not None and src_format == "hf":
        source.fp8_dtype = out_dtype
    layout = native_layout(source.config)
    columns = (TextColumn("[bold]convert[/]"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.description}"))
    with Sink(dst_format, dst, source.config, max_shard_bytes=max_bytes, overwrite=overwrite,
              dtype=out_dtype or source.dtype) as sink, Progress(*columns, transient=True) as progress:
        task = progress.add_task("", total=len(layout))
        for name in layout:
            progress.update(task, description=name)
            tensor = source.get(name)
            if out_dtype is not None and tensor.is_floating_point() and not name.endswith("e_score_correction_bias"):
                tensor = tensor.to(out_dtype)
            sink.put(name, tensor)
            progress.advance(task)
    unused = source.unused_keys(list(layout))
    if unused:
        click.echo(f"note: {len(unused)} source tensor(s) not part of the model were skipped, e.g. {unused[0]}",
                   err=True)
    click.echo(f"wrote {dst_format} checkpoint {dst} ({len(layout)} tensors)")
