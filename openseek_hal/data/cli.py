"""`openseek-hal data`: the data pipeline stages as click subcommands.

Each subcommand only parses flags and calls its stage module; stage modules import their optional
dependencies (OpenCC, pydivsufsort, Ray) when they run, so ``--help`` works without them.
"""

from __future__ import annotations

from pathlib import Path

import click

from .executor import EXECUTORS
from .io import COMPRESSIONS
from .runner import OutputOptions


def _common(f):
    """Options every stage that reads documents and writes shards shares."""
    for deco in reversed([
        click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=str)),
        click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path),
                     help="Output folder (sharded JSONL + stats.json)."),
        click.option("--text-key", default="text", show_default=True, help="Field holding the document text."),
        click.option("--shard-docs", default=100_000, show_default=True, help="Documents per output shard."),
        click.option("--compression", type=click.Choice(COMPRESSIONS), default="none", show_default=True),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary."),
    ]):
        f = deco(f)
    return f


def _parallel(f):
    f = click.option("--executor", type=click.Choice(EXECUTORS), default="local", show_default=True,
                     help="local: process pool on this machine; ray: Ray actors (needs ray installed).")(f)
    return click.option("--workers", default=1, show_default=True, help="Worker processes.")(f)


def _out(out_dir: Path, shard_docs: int, compression: str, quiet: bool) -> OutputOptions:
    return OutputOptions(out_dir, shard_docs, compression, quiet)


@click.group("data")
def data() -> None:
    """Data pipeline: filter, dedup, classify, decontaminate, tokenize, synthesize JSONL/Parquet corpora."""


@data.command("filter")
@_common
@_parallel
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file of thresholds.")
@click.option("--min-chars", type=int)
@click.option("--max-chars", type=int)
@click.option("--min-avg-sentence-chars", type=float, help="Minimum mean characters per sentence.")
@click.option("--max-avg-sentence-chars", type=float, help="Maximum mean characters per sentence.")
@click.option("--max-flagged-ratio", type=float, help="Maximum share of tokens that are flagged words.")
@click.option("--t2s/--no-t2s", default=None, help="Convert traditional to simplified Chinese (OpenCC t2s).")
@click.option("--flagged-words", "flagged_words_files", multiple=True, type=click.Path(dir_okay=False),
              help="Extra flagged-word list (one per line); repeatable.")
@click.option("--no-default-flagged-words", is_flag=True, help="Do not use the shipped English/Chinese lists.")
def filter_cmd(inputs, out_dir, text_key, shard_docs, compression, quiet, workers, executor, config_path,
               flagged_words_files, no_default_flagged_words, **thresholds) -> None:
    """Drop documents by length, sentence length and flagged words; optionally convert to simplified."""
    from dataclasses import asdict

    from .filters import FilterConfig, FilterStage
    from .runner import run_doc_stage

    config = FilterConfig.from_yaml(config_path) if config_path else FilterConfig()
    config = config.override(**thresholds,
                             flagged_words_files=list(flagged_words_files) or None,
                             default_flagged_words=False if no_default_flagged_words else None)
    run_doc_stage(FilterStage(config, text_key), list(inputs), _out(out_dir, shard_docs, compression, quiet),
                  text_key, workers, executor, config=asdict(config))


@data.command("dedup-minhash")
@_common
@_parallel
@click.option("--ngrams", default=5, show_default=True, help="Tokens per shingle (words; Han characters).")
@click.option("--bands", default=14, show_default=True, help="LSH bands.")
@click.option("--rows", default=8, show_default=True, help="Rows (hashes) per band.")
@click.option("--seed", default=1, show_default=True)
@click.option("--id-key", default=None, help="Field naming documents in clusters.jsonl (default file:line).")
def dedup_minhash_cmd(inputs, out_dir, text_key, shard_docs, compression, quiet, workers, executor, ngrams,
                      bands, rows, seed, id_key) -> None:
    """Fuzzy deduplication: MinHash + LSH, keeping the first document of each near-duplicate cluster."""
    from .dedup_minhash import dedup_minhash
    from .minhash import MinHashConfig

    if min(ngrams, bands, rows) < 1:
        raise click.BadParameter("--ngrams, --bands and --rows must be at least 1")
    dedup_minhash(list(inputs), _out(out_dir, shard_docs, compression, quiet),
                  MinHashConfig(ngrams, bands, rows, seed), text_key, id_key, workers, executor)


@data.command("dedup-exact")
@_common
@click.option("--min-bytes", default=100, show_default=True,
              help="Remove repeated spans of at least this many bytes (Lee et al. use 50 tokens ~ 100 bytes).")
@click.option("--shard-bytes", default=1 << 30, show_default=True,
              help="Text bytes per suffix-array shard; repeats are found within a shard.")
def dedup_exact_cmd(inputs, out_dir, text_key, shard_docs, compression, quiet, min_bytes, shard_bytes) -> None:
    """Exact substring deduplication with a suffix array: later copies of long repeated spans are cut."""
    from .dedup_exact import dedup_exact

    dedup_exact(list(inputs), _out(out_dir, shard_docs, compression, quiet), min_bytes, text_key, shard_bytes)
