"""`openseek-hal data`: the data pipeline stages as click subcommands.

Each subcommand only parses flags and calls its stage module; stage modules import their optional
dependencies (OpenCC, pydivsufsort, Ray) when they run, so ``--help`` works without them.
"""

from __future__ import annotations

from pathlib import Path

import click

from .executor import EXECUTORS, stop_on_sigterm
from .io import COMPRESSIONS
from .runner import OutputOptions


def _common(f):
    """Options every stage that reads documents and writes shards shares."""
    for deco in reversed(
        [
            click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=str)),
            click.option(
                "-o",
                "--output",
                "out_dir",
                required=True,
                type=click.Path(path_type=Path),
                help="Output folder (sharded JSONL + stats.json).",
            ),
            click.option(
                "--text-key", default="text", show_default=True, help="Field holding the document text."
            ),
            click.option(
                "--shard-docs", default=100_000, show_default=True, help="Documents per output shard."
            ),
            click.option("--compression", type=click.Choice(COMPRESSIONS), default="none", show_default=True),
            click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary."),
        ]
    ):
        f = deco(f)
    return f


def _parallel(f):
    f = click.option(
        "--executor",
        type=click.Choice(EXECUTORS),
        default="local",
        show_default=True,
        help="local: process pool on this machine; ray: Ray actors (needs ray installed).",
    )(f)
    return click.option("--workers", default=1, show_default=True, help="Worker processes.")(f)


def _out(out_dir: Path, shard_docs: int, compression: str, quiet: bool) -> OutputOptions:
    return OutputOptions(out_dir, shard_docs, compression, quiet)


@click.group("data")
def data() -> None:
    """Data pipeline: filter, dedup, classify, decontaminate, tokenize, synthesize JSONL/Parquet corpora."""
    stop_on_sigterm()


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
@click.option(
    "--flagged-words",
    "flagged_words_files",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="Extra flagged-word list (one per line); repeatable.",
)
@click.option(
    "--no-default-flagged-words", is_flag=True, help="Do not use the shipped English/Chinese lists."
)
def filter_cmd(
    inputs,
    out_dir,
    text_key,
    shard_docs,
    compression,
    quiet,
    workers,
    executor,
    config_path,
    flagged_words_files,
    no_default_flagged_words,
    **thresholds,
) -> None:
    """Drop documents by length, sentence length and flagged words; optionally convert to simplified."""
    from dataclasses import asdict

    from .filters import FilterConfig, FilterStage
    from .runner import run_doc_stage

    config = FilterConfig.from_yaml(config_path) if config_path else FilterConfig()
    config = config.override(
        **thresholds,
        flagged_words_files=list(flagged_words_files) or None,
        default_flagged_words=False if no_default_flagged_words else None,
    )
    run_doc_stage(
        FilterStage(config, text_key),
        list(inputs),
        _out(out_dir, shard_docs, compression, quiet),
        text_key,
        workers,
        executor,
        config=asdict(config),
    )


@data.command("dedup-minhash")
@_common
@_parallel
@click.option("--ngrams", default=5, show_default=True, help="Tokens per shingle (words; Han characters).")
@click.option(
    "--threshold", default=0.8, show_default=True, help="Jaccard similarity from which documents are duplicates."
)
@click.option(
    "--num-perm", default=112, show_default=True, help="Permutations available; bands x rows is chosen within it."
)
@click.option(
    "--min-recall",
    default=0.99,
    show_default=True,
    help="Least probability that a pair at the threshold becomes a candidate (0: weights alone decide).",
)
@click.option("--fp-weight", default=0.5, show_default=True, help="Weight of the false-positive area.")
@click.option("--fn-weight", default=0.5, show_default=True, help="Weight of the false-negative area.")
@click.option("--bands", type=int, default=None, help="LSH bands (with --rows: used as given, nothing chosen).")
@click.option("--rows", type=int, default=None, help="Rows (hashes) per band (with --bands).")
@click.option("--seed", default=1, show_default=True)
@click.option("--id-key", default=None, help="Field naming documents in clusters.jsonl (default file:line).")
@click.option(
    "--stage",
    type=click.Choice(["all", "signatures", "buckets", "clusters", "filter"]),
    default="all",
    show_default=True,
    help="Run one stage of the staged path (needs --work-dir); 'all' runs them in turn.",
)
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the stages' intermediate files (default: inside -o, removed at the end).",
)
@click.option(
    "--max-memory",
    default="1G",
    show_default=True,
    help="Memory for bucket partitions and pair chunks (512M, 4G, ...); the label file is 8 bytes per document.",
)
@click.option("--in-memory", is_flag=True, help="One-process path: all band keys sorted at once (the reference).")
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Keep an LSH candidate pair only if its sketch Jaccard reaches the verify threshold.",
)
@click.option(
    "--verify-threshold",
    type=float,
    default=None,
    help="Jaccard a candidate pair needs to be linked (default: --threshold).",
)
@click.option(
    "--sketch-size",
    default=256,
    show_default=True,
    help="Bottom-k sketch per document for verification (k shingle hashes, 4 bytes each; exact below k).",
)
def dedup_minhash_cmd(
    inputs,
    out_dir,
    text_key,
    shard_docs,
    compression,
    quiet,
    workers,
    executor,
    ngrams,
    threshold,
    num_perm,
    min_recall,
    fp_weight,
    fn_weight,
    bands,
    rows,
    seed,
    id_key,
    stage,
    work_dir,
    max_memory,
    in_memory,
    verify,
    verify_threshold,
    sketch_size,
) -> None:
    """Fuzzy deduplication: MinHash + LSH, keeping the first document of each near-duplicate cluster."""
    from .dedup_minhash import dedup_minhash, parse_size
    from .minhash import MinHashConfig, lsh_params, optimal_lsh_params, verify_margin

    if (bands is None) != (rows is None):
        raise click.BadParameter("give --bands and --rows together (or neither, to have them chosen)")
    if ngrams < 1 or (bands is not None and min(bands, rows) < 1):
        raise click.BadParameter("--ngrams, --bands and --rows must be at least 1")
    if bands is None:
        lsh = optimal_lsh_params(threshold, num_perm, fp_weight, fn_weight, min_recall)
    else:
        if not 0.0 < threshold < 1.0:
            raise click.BadParameter("--threshold must be between 0 and 1 (exclusive)")
        lsh = lsh_params(threshold, bands, rows)
    vt = threshold if verify_threshold is None else verify_threshold
    if not 0.0 < vt <= 1.0:
        raise click.BadParameter(f"--verify-threshold must be in (0, 1], got {vt}")
    if not 1 <= sketch_size <= 16384:
        raise click.BadParameter(f"--sketch-size must be between 1 and 16384, got {sketch_size}")
    margin = round(verify_margin(vt, sketch_size, max(min_recall, 0.99)), 5)
    dedup_minhash(
        list(inputs),
        _out(out_dir, shard_docs, compression, quiet),
        MinHashConfig(ngrams, lsh.bands, lsh.rows, seed, vt if verify else None, sketch_size, margin),
        text_key,
        id_key,
        workers,
        executor,
        lsh=lsh,
        stage=stage,
        work_dir=work_dir,
        max_memory=parse_size(max_memory),
        in_memory=in_memory,
    )


@data.command("dedup-exact")
@_common
@click.option(
    "--min-bytes",
    default=100,
    show_default=True,
    help="Remove repeated spans of at least this many bytes (Lee et al. use 50 tokens ~ 100 bytes).",
)
@click.option(
    "--shard-bytes",
    default=1 << 30,
    show_default=True,
    help="Text bytes per suffix-array shard; repeats are found within a shard.",
)
@click.option(
    "--low-memory",
    is_flag=True,
    help="No LCP array: about 10 instead of 13 bytes of RAM per text byte, slower (bytes only).",
)
@click.option(
    "--tokenizer",
    type=click.Path(exists=True, dir_okay=False),
    help="Work on token ids of this tokenizers JSON file instead of bytes.",
)
@click.option(
    "--min-tokens", default=50, show_default=True, help="With --tokenizer: minimum repeated span in tokens."
)
def dedup_exact_cmd(
    inputs,
    out_dir,
    text_key,
    shard_docs,
    compression,
    quiet,
    min_bytes,
    shard_bytes,
    low_memory,
    tokenizer,
    min_tokens,
) -> None:
    """Exact substring deduplication with a suffix array: later copies of long repeated spans are cut."""
    from .dedup_exact import dedup_exact

    out = _out(out_dir, shard_docs, compression, quiet)
    dedup_exact(list(inputs), out, min_bytes, text_key, shard_bytes, low_memory, tokenizer, min_tokens)


@data.command("decontaminate")
@_common
@_parallel
@click.option(
    "--benchmark",
    "benchmarks",
    multiple=True,
    required=True,
    type=click.Path(path_type=str),
    help="Benchmark file (JSONL: all string fields; text: one item per line). Repeatable.",
)
@click.option(
    "--ngram", default=13, show_default=True, help="Shared n-gram length (tokens) that contaminates."
)
def decontaminate_cmd(
    inputs, out_dir, text_key, shard_docs, compression, quiet, workers, executor, benchmarks, ngram
) -> None:
    """Drop documents sharing an n-gram with any benchmark file."""
    from .decontaminate import DecontaminateStage
    from .runner import run_doc_stage

    stage = DecontaminateStage(list(benchmarks), ngram, text_key)
    stats = run_doc_stage(
        stage,
        list(inputs),
        _out(out_dir, shard_docs, compression, quiet),
        text_key,
        workers,
        executor,
        config={
            "benchmarks": list(benchmarks),
            "ngram": ngram,
            "short_benchmark_items_skipped": stage.short_items,
        },
    )
    if stage.short_items and not quiet:
        click.echo(
            f"note: {stage.short_items} benchmark items shorter than {ngram} tokens were skipped "
            f"({stats.docs_out} docs kept)",
            err=True,
        )


@data.command("classify-train")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option(
    "-m",
    "--model",
    "model_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Where to save the model (.npz).",
)
@click.option("--text-key", default="text", show_default=True)
@click.option(
    "--label-key", default="label", show_default=True, help="Integer score (e.g. 0-5) or string label."
)
@click.option("--word-ngrams", default=2, show_default=True)
@click.option("--buckets", default=1 << 18, show_default=True, help="Hashed feature rows.")
@click.option("--epochs", default=5, show_default=True)
@click.option("--lr", default=0.5, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--valid-fraction", default=0.1, show_default=True, help="Held out to report accuracy.")
def classify_train_cmd(
    inputs, model_path, text_key, label_key, word_ngrams, buckets, epochs, lr, seed, valid_fraction
) -> None:
    """Train a fastText-style quality classifier on labelled JSONL and save it."""
    import json

    from .classifier import ClassifierConfig, train_from_files

    if not 0 <= valid_fraction < 1:
        raise click.BadParameter("--valid-fraction must be in [0, 1)")
    config = ClassifierConfig(word_ngrams=word_ngrams, buckets=buckets, epochs=epochs, lr=lr, seed=seed)
    metrics = train_from_files(list(inputs), model_path, config, text_key, label_key, valid_fraction)
    click.echo(json.dumps({k: v for k, v in metrics.items() if k != "malformed_first"}, ensure_ascii=False))
    for m in metrics["malformed_first"][:5]:
        click.echo(f"warning: skipped malformed record {m['file']}:{m['line']}: {m['error']}", err=True)


@data.command("classify")
@_common
@_parallel
@click.option("-m", "--model", "model_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--score-key", default="quality_score", show_default=True, help="Field the score is written to."
)
@click.option(
    "--label-key",
    default="quality_label",
    show_default=True,
    help="Field for the predicted label (string-label models only).",
)
@click.option("--min-score", type=float, help="Drop documents scoring below this.")
def classify_cmd(
    inputs,
    out_dir,
    text_key,
    shard_docs,
    compression,
    quiet,
    workers,
    executor,
    model_path,
    score_key,
    label_key,
    min_score,
) -> None:
    """Score documents with a trained classifier (adds a score field); optionally filter by score."""
    from .classifier import ClassifyStage
    from .runner import run_doc_stage

    stage = ClassifyStage(model_path, text_key, score_key, label_key, min_score)
    run_doc_stage(
        stage,
        list(inputs),
        _out(out_dir, shard_docs, compression, quiet),
        text_key,
        workers,
        executor,
        config={"model": str(model_path), "score_key": score_key, "min_score": min_score},
    )


@data.command("tokenize")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option(
    "-o",
    "--output",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Output folder: tokens-*.bin/.idx, index.json, tokenizer.json, stats.json.",
)
@click.option("--text-key", default="text", show_default=True)
@click.option(
    "--tokenizer",
    "tokenizer_path",
    type=click.Path(exists=True, dir_okay=False),
    help="A tokenizers JSON file to use.",
)
@click.option(
    "--vocab-size", type=int, help="Instead of --tokenizer: train a byte-level BPE of this size here."
)
@click.option(
    "--eos-token", help="Document separator token (default: the first of <|endoftext|>, </s>, ...)."
)
@click.option("--shard-tokens", default=100_000_000, show_default=True, help="Tokens per .bin shard.")
@click.option("-q", "--quiet", is_flag=True)
@_parallel
def tokenize_cmd(
    inputs, out_dir, text_key, tokenizer_path, vocab_size, eos_token, shard_tokens, quiet, workers, executor
) -> None:
    """Tokenize documents into memory-mappable training shards (read with openseek_hal.data.shards)."""
    from .tokenize import tokenize

    tokenize(
        list(inputs),
        OutputOptions(out_dir, quiet=quiet),
        tokenizer_path,
        vocab_size,
        eos_token,
        text_key,
        shard_tokens,
        workers,
        executor,
    )


@data.command("synthesize")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option(
    "-o",
    "--output",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Output folder: synth.jsonl (appended, resumable) + stats.json.",
)
@click.option(
    "--mode",
    type=click.Choice(["qa", "cot", "tag", "cot-forward", "rag-cot", "rl-sample", "score"]),
    default="qa",
    show_default=True,
    help="qa: question/answer pairs; cot: backward Long-CoT (summaries -> CoT -> query); tag: knowledge-point "
    "tags from --tags; cot-forward: Long-CoT refined --refine-rounds times; rag-cot: Long-CoT over passages "
    "retrieved from --index; rl-sample: pass rate of --samples answers against --answer-key, selected by "
    "difficulty; score: rules plus a reward-model judge.",
)
@click.option("--endpoint", required=True, help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1.")
@click.option("--model", required=True, help="Model name sent to the endpoint.")
@click.option(
    "--api-key-env",
    default="OPENAI_API_KEY",
    show_default=True,
    help="Environment variable holding the API key (unset: no Authorization header).",
)
@click.option("--text-key", default="text", show_default=True)
@click.option("--id-key", default=None, help="Field identifying documents for resuming (default file:line).")
@click.option("--concurrency", default=4, show_default=True, help="Documents in flight at once.")
@click.option("--retries", default=5, show_default=True)
@click.option("--retry-wait", default=1.0, show_default=True, help="First backoff in seconds (doubles).")
@click.option("--timeout", default=120.0, show_default=True, help="Seconds per HTTP request.")
@click.option("--temperature", default=0.7, show_default=True)
@click.option("--max-tokens", type=int, default=None)
@click.option("--segment-chars", default=2000, show_default=True, help="cot mode: characters per segment.")
@click.option(
    "--prompts",
    "prompt_dir",
    type=click.Path(file_okay=False, exists=True),
    help="Folder with replacement templates (qa.txt, cot_*.txt, tag.txt, rl_solve.txt, reward.txt).",
)
@click.option("--limit", type=int, default=None, help="Stop after this many new documents.")
@click.option("--tags", "tags_file", type=click.Path(dir_okay=False), help="tag: the taxonomy (lines, YAML or JSON).")
@click.option("--refine-rounds", default=1, show_default=True, help="cot-forward: refinement passes.")
@click.option(
    "--index", "index_paths", multiple=True, type=click.Path(path_type=str), help="rag-cot: corpus to retrieve from."
)
@click.option("--top-k", default=3, show_default=True, help="rag-cot: passages per question.")
@click.option("--passage-chars", default=1000, show_default=True, help="rag-cot: characters per passage.")
@click.option("--answer-key", default="answer", show_default=True, help="rl-sample: field of the reference answer.")
@click.option("--samples", default=8, show_default=True, help="rl-sample: answers sampled per problem.")
@click.option("--min-pass", default=0.125, show_default=True, help="rl-sample: lowest pass rate selected.")
@click.option("--max-pass", default=0.875, show_default=True, help="rl-sample: highest pass rate selected.")
@click.option("--min-score", default=0.5, show_default=True, help="score: lowest score selected (0-1).")
@click.option("--rules-only", is_flag=True, help="score: rules alone, no reward-model request.")
@click.option("--rule-min-chars", default=20, show_default=True, help="score: shorter samples fail.")
@click.option("--max-repetition", default=0.3, show_default=True, help="score: share of repeated 5-grams.")
@click.option(
    "--max-language-gap", default=0.5, show_default=True, help="score: Han-share difference to the source."
)
@click.option("-q", "--quiet", is_flag=True)
def synthesize_cmd(
    inputs,
    out_dir,
    mode,
    endpoint,
    model,
    api_key_env,
    text_key,
    id_key,
    concurrency,
    retries,
    retry_wait,
    timeout,
    temperature,
    max_tokens,
    segment_chars,
    prompt_dir,
    limit,
    tags_file,
    refine_rounds,
    index_paths,
    top_k,
    passage_chars,
    answer_key,
    samples,
    min_pass,
    max_pass,
    min_score,
    rules_only,
    rule_min_chars,
    max_repetition,
    max_language_gap,
    quiet,
) -> None:
    """Generate QA pairs, Long-CoT samples, tags, RL difficulty samples or scores with an OpenAI-compatible API."""
    import os

    from .synth import ChatClient, Synthesizer, load_prompts, synth_options, synthesize

    client = ChatClient(
        endpoint,
        model,
        os.environ.get(api_key_env) or None,
        timeout,
        retries,
        retry_wait,
        temperature,
        max_tokens,
    )
    options = synth_options(
        mode, text_key, id_key, tags_file=tags_file, refine_rounds=refine_rounds, index_paths=list(index_paths),
        top_k=top_k, passage_chars=passage_chars, answer_key=answer_key, samples=samples, min_pass=min_pass,
        max_pass=max_pass, min_score=min_score, rules_only=rules_only, rule_min_chars=rule_min_chars,
        max_repetition=max_repetition, max_language_gap=max_language_gap,
    )
    synthesizer = Synthesizer(client, mode, load_prompts(mode, prompt_dir), segment_chars, options)
    synthesize(list(inputs), out_dir, synthesizer, text_key, id_key, concurrency, limit, quiet)


@data.command("run")
@click.argument("pipeline_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--executor",
    type=click.Choice(EXECUTORS),
    default=None,
    help="Override the executor of every stage that has one (default: local).",
)
@click.option("--dry-run", is_flag=True, help="Print the stage commands without running them.")
@click.option("-q", "--quiet", is_flag=True)
def run_cmd(pipeline_file, executor, dry_run, quiet) -> None:
    """Run a YAML pipeline of stages, each reading the previous stage's output."""
    import shlex

    from .pipeline import load, plan

    runs = plan(load(pipeline_file), pipeline_file.parent, data, executor, quiet)
    for argv in runs:
        click.echo("openseek-hal data " + shlex.join(argv), err=True)
        if not dry_run:
            data.main(args=argv, prog_name="openseek-hal data", standalone_mode=False)
