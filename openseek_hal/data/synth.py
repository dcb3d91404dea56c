"""The `synthesize` stage: LLM-written QA pairs and Long-CoT samples through an OpenAI-compatible API.

Modes:
- ``qa``: one call per document with ``prompts/qa.txt``; the reply must hold a JSON array of
  ``{"question", "answer"}``; the output line is ``{source_id, source, qa: [...]}``.
- ``cot`` (Long-CoT backward synthesis): the document is cut into segments of about
  ``segment_chars`` at paragraph breaks, each segment is summarized (``cot_summary.txt``), a chain of
  thought is written from the summaries (``cot_chain.txt``), and a query from the chain
  (``cot_query.txt``); the output line is ``{source_id, source, summaries, cot, query}``.
- ``tag``: knowledge-point tags from a taxonomy (``--tags``), checked against it;
- ``cot-forward``: a chain of thought for a question, then ``refine_rounds`` check-and-rewrite passes;
- ``rag-cot``: a chain of thought over the top passages of a local BM25 index (``--index``);
- ``rl-sample``: ``samples`` answers per problem against its reference answer; pass rate, difficulty,
  and whether it falls in the selected band;
- ``score``: rules (length, repetition, language) and a reward judge; score and selection.
(The helpers of the last five are in ``synth_modes``.)

Calls go to ``{endpoint}/chat/completions`` with the API key from an environment variable. Transient
failures (connection errors, timeouts, HTTP 429 and 5xx, replies that cannot be parsed) are retried
with exponential backoff; an HTTP 401/403/404 stops the run with one clear error, and so do three
failed documents before any succeeded. Up to ``concurrency`` documents are in flight; lines are
appended in input order, one complete line per document, and a rerun skips every ``source_id``
already in the output, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import UserError
from .executor import windowed
from .io import Malformed, check_output_dir, discover, iter_raw, parse
from .outdir import StageOutput
from .runner import Stats, progress, report
from .synth_modes import (
    BM25Index,
    Rules,
    extract_answer,
    json_array,
    load_taxonomy,
    parse_reward,
    parse_tags,
    passages_of,
    same_answer,
)

PROMPTS = {
    "qa": ("qa.txt",),
    "cot": ("cot_summary.txt", "cot_chain.txt", "cot_query.txt"),
    "tag": ("tag.txt",),
    "cot-forward": ("cot_forward.txt", "cot_refine.txt"),
    "rag-cot": ("cot_rag.txt",),
    "rl-sample": ("rl_solve.txt",),
    "score": ("reward.txt",),
}
MODES = tuple(PROMPTS)
OUTPUT = "synth.jsonl"
GIVE_UP_AFTER = 3  # failed documents, with none succeeded, that stop the run


class TransientError(Exception):
    """A failure worth retrying (network, rate limit, server error, unparseable reply)."""


@dataclass
class ChatClient:
    endpoint: str
    model: str
    api_key: str | None = None
    timeout: float = 120.0
    retries: int = 5
    retry_wait: float = 1.0
    temperature: float = 0.7
    max_tokens: int | None = None

    @property
    def url(self) -> str:
        base = self.endpoint.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"

    def complete(self, prompt: str, seed: int | None = None) -> str:
        body: dict[str, Any] = {
            "model": self.model,
            "temperature": self.temperature,
            "messages": [{"role": "user", "content": prompt}],
        }
        if seed is not None:  # independent samples of one prompt (rl-sample)
            body["seed"] = seed
        if self.max_tokens:
            body["max_tokens"] = self.max_tokens
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode("utf-8"), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                reply = json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            if e.code in (401, 403, 404):
                raise UserError(
                    f"{self.url} answered HTTP {e.code} ({e.reason}); check --endpoint, --model and "
                    "the API key"
                ) from e
            raise TransientError(f"HTTP {e.code}") from e
        except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as e:
            raise TransientError(str(e)) from e
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as e:
            raise TransientError(f"reply without choices[0].message.content: {str(reply)[:200]}") from e
        if not isinstance(content, str):
            raise TransientError("reply content is not text")
        return content


def with_retries(client: ChatClient, fn, *args):
    """``fn(*args)`` retried on ``TransientError`` with exponential backoff; the last error is re-raised."""
    for attempt in range(client.retries + 1):
        try:
            return fn(*args)
        except TransientError:
            if attempt == client.retries:
                raise
            time.sleep(client.retry_wait * 2**attempt)
    raise AssertionError("unreachable")


def load_prompts(mode: str, prompt_dir: str | None) -> list[str]:
    out = []
    for name in PROMPTS[mode]:
        if prompt_dir is not None and (Path(prompt_dir) / name).is_file():
            out.append((Path(prompt_dir) / name).read_text(encoding="utf-8"))
        else:
            out.append(resources.files("openseek_hal.data").joinpath("prompts", name).read_text("utf-8"))
    return out


def segments(text: str, segment_chars: int) -> list[str]:
    """Paragraph-aligned pieces of about ``segment_chars`` characters (a longer paragraph stays whole)."""
    pieces: list[str] = []
    current = ""
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        if current and len(current) + 2 + len(para) > segment_chars:
            pieces.append(current)
            current = para
        else:
            current = f"{current}\n\n{para}" if current else para
    if current:
        pieces.append(current)
    return pieces


def parse_qa(reply: str) -> list[dict[str, str]]:
    items = json_array(reply)
    if items is None:
        raise TransientError("QA reply holds no JSON array")
    pairs = [
        {"question": str(i["question"]).strip(), "answer": str(i["answer"]).strip()}
        for i in items
        if isinstance(i, dict) and "question" in i and "answer" in i
    ]
    if not pairs:
        raise TransientError("QA reply holds no question/answer pairs")
    return pairs


@dataclass
class SynthOptions:
    """What the modes beyond ``qa`` and ``cot`` need; see ``synth_modes``."""

    taxonomy: list[str] = field(default_factory=list)  # tag
    refine_rounds: int = 1  # cot-forward
    index: BM25Index | None = None  # rag-cot
    top_k: int = 3
    answer_key: str = "answer"  # rl-sample
    samples: int = 8
    min_pass: float = 0.125
    max_pass: float = 0.875
    rules: Rules = field(default_factory=Rules)  # score
    use_reward: bool = True
    min_score: float = 0.5
    text_key: str = "text"


@dataclass
class Synthesizer:
    client: ChatClient
    mode: str
    prompts: list[str]
    segment_chars: int = 2000
    options: SynthOptions = field(default_factory=SynthOptions)

    def _ask(self, template: str, **fields: str) -> str:
        prompt = template
        for key, value in fields.items():
            prompt = prompt.replace("{" + key + "}", value)
        return with_retries(self.client, self.client.complete, prompt).strip()

    def _ask_cot(self, template: str, **fields: str) -> tuple[str, str]:
        """A chain of thought that ends in a final answer (a reply without one is retried)."""

        def once() -> tuple[str, str]:
            cot = self._ask(template, **fields)
            answer = extract_answer(cot)
            if answer is None:
                raise TransientError("chain of thought without a final answer")
            return cot, answer

        return with_retries(self.client, once)

    def run(self, text: str, doc: dict[str, Any] | None = None) -> dict[str, Any]:
        doc = doc or {}
        opt = self.options
        if self.mode == "qa":
            return {
                "qa": with_retries(self.client, lambda: parse_qa(self._ask(self.prompts[0], document=text)))
            }
        if self.mode == "cot":
            summary_t, chain_t, query_t = self.prompts
            summaries = [self._ask(summary_t, document=seg) for seg in segments(text, self.segment_chars)]
            numbered = "\n".join(f"{i + 1}. {s}" for i, s in enumerate(summaries))
            cot = self._ask(chain_t, summaries=numbered)
            return {"summaries": summaries, "cot": cot, "query": self._ask(query_t, cot=cot)}
        if self.mode == "tag":
            listing = "\n".join(f"{i + 1}. {t}" for i, t in enumerate(opt.taxonomy))

            def tag_once() -> tuple[list[str], list[str]]:
                try:
                    return parse_tags(self._ask(self.prompts[0], document=text, tags=listing), opt.taxonomy)
                except ValueError as e:
                    raise TransientError(str(e)) from e

            known, unknown = with_retries(self.client, tag_once)
            return {"tags": known, "unknown_tags": unknown}
        if self.mode == "cot-forward":
            forward_t, refine_t = self.prompts
            cot, answer = self._ask_cot(forward_t, question=text)
            drafts = []
            for _ in range(opt.refine_rounds):
                drafts.append(cot)
                cot, answer = self._ask_cot(refine_t, question=text, cot=cot)
            return {"cot": cot, "answer": answer, "drafts": drafts}
        if self.mode == "rag-cot":
            assert opt.index is not None
            hits = opt.index.search(text, opt.top_k)
            passages = "\n\n".join(
                f"[{k + 1}] {opt.index.passages[i]['text']}" for k, (i, _) in enumerate(hits)
            ) or "(no passage found)"
            cot, answer = self._ask_cot(self.prompts[0], question=text, passages=passages)
            retrieved = [{"id": opt.index.passages[i]["id"], "score": round(sc, 6)} for i, sc in hits]
            return {"retrieved": retrieved, "cot": cot, "answer": answer}
        if self.mode == "rl-sample":
            reference = doc.get(opt.answer_key)
            if reference is None or isinstance(reference, (dict, list)):
                raise TransientError(f"no reference answer in field '{opt.answer_key}'")
            prompt = self.prompts[0].replace("{question}", text)
            answers = [
                extract_answer(with_retries(self.client, self.client.complete, prompt, k))
                for k in range(opt.samples)
            ]
            correct = sum(same_answer(a, str(reference)) for a in answers)
            rate = correct / opt.samples
            return {
                "reference": reference,
                "answers": answers,
                "pass_rate": rate,
                "difficulty": round(1 - rate, 6),
                "selected": opt.min_pass <= rate <= opt.max_pass,
            }
        if self.mode == "score":
            source = doc.get("source") if isinstance(doc.get("source"), str) and doc.get("source") != text else None
            failures = opt.rules.failures(text, source)
            reward = None
            if opt.use_reward:

                def reward_once() -> float:
                    try:
                        return parse_reward(self._ask(self.prompts[0], document=text))
                    except ValueError as e:
                        raise TransientError(str(e)) from e

                reward = with_retries(self.client, reward_once)
            score = 0.0 if failures else (reward if reward is not None else 1.0)
            return {
                "score": score,
                "reward": reward,
                "rule_failures": failures,
                "selected": score >= opt.min_score,
                "record": {k: v for k, v in doc.items() if k != opt.text_key},
            }
        raise UserError(f"unknown synthesis mode '{self.mode}' (choose from: {', '.join(MODES)})")


def synth_options(
    mode: str,
    text_key: str = "text",
    id_key: str | None = None,
    *,
    tags_file: str | None = None,
    refine_rounds: int = 1,
    index_paths: list[str] | None = None,
    top_k: int = 3,
    passage_chars: int = 1000,
    answer_key: str = "answer",
    samples: int = 8,
    min_pass: float = 0.125,
    max_pass: float = 0.875,
    min_score: float = 0.5,
    rules_only: bool = False,
    rule_min_chars: int = 20,
    max_repetition: float = 0.3,
    max_language_gap: float = 0.5,
) -> SynthOptions:
    """Check the options a mode needs (``UserError`` naming the flag) and load its taxonomy or index."""
    opt = SynthOptions(
        refine_rounds=refine_rounds, top_k=top_k, answer_key=answer_key, samples=samples, min_pass=min_pass,
        max_pass=max_pass, rules=Rules(rule_min_chars, max_repetition, max_language_gap), use_reward=not rules_only,
        min_score=min_score, text_key=text_key,
    )
    if mode == "tag":
        if not tags_file:
            raise UserError("--mode tag needs --tags FILE (the knowledge-point taxonomy)")
        opt.taxonomy = load_taxonomy(tags_file)
    if mode == "cot-forward" and refine_rounds < 0:
        raise UserError("--refine-rounds must be at least 0")
    if mode == "rag-cot":
        if not index_paths:
            raise UserError("--mode rag-cot needs --index (files or folders of documents to retrieve from)")
        if top_k < 1 or passage_chars < 1:
            raise UserError("--top-k and --passage-chars must be at least 1")
        malformed = Malformed()
        docs = (
            (str(d[id_key]) if id_key and id_key in d else f"{Path(raw.file).name}:{raw.line}", d[text_key])
            for raw in iter_raw(discover(index_paths))
            if (d := parse(raw, text_key, malformed)) is not None
        )
        opt.index = BM25Index(passages_of(docs, passage_chars))
        if not opt.index.passages:
            raise UserError(f"--index {' '.join(index_paths)} holds no documents with a '{text_key}' field")
    if mode == "rl-sample" and (samples < 1 or not 0 <= min_pass <= max_pass <= 1):
        raise UserError("--samples must be at least 1 and 0 <= --min-pass <= --max-pass <= 1")
    if mode == "score" and not 0 <= min_score <= 1:
        raise UserError("--min-score must be in [0, 1]")
    return opt


def _done_ids(path: Path) -> set[str]:
    """``source_id``s already written; a torn last line (from an interrupted run) is cut off first."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(path, "r+b") as fh:
            fh.truncate(len(complete))
    return {json.loads(line)["source_id"] for line in complete.decode("utf-8").splitlines() if line.strip()}


def synthesize(
    inputs: list[str],
    out_dir: Path,
    synthesizer: Synthesizer,
    text_key: str = "text",
    id_key: str | None = None,
    concurrency: int = 4,
    limit: int | None = None,
    quiet: bool = False,
) -> Stats:
    if concurrency < 1:
        raise UserError("--concurrency must be at least 1")
    files = discover(inputs)
    check_output_dir(out_dir, files)
    # In place: an interrupted run is resumed, so the folder is marked incomplete instead of staged.
    with StageOutput(out_dir, "synthesize", staged=False) as output:
        stats = _synthesize(files, out_dir / OUTPUT, synthesizer, text_key, id_key, concurrency, limit, quiet)
        with open(out_dir / OUTPUT, "rb") as fh:
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
        output.commit(stats.to_dict(), {OUTPUT: lines})
    report(stats, out_dir, quiet)
    return stats


def _mode_config(synthesizer: Synthesizer) -> dict[str, Any]:
    opt, mode = synthesizer.options, synthesizer.mode
    if mode == "tag":
        return {"tags": len(opt.taxonomy)}
    if mode == "cot-forward":
        return {"refine_rounds": opt.refine_rounds}
    if mode == "rag-cot":
        return {"index_passages": len(opt.index.passages) if opt.index else 0, "top_k": opt.top_k}
    if mode == "rl-sample":
        return {"answer_key": opt.answer_key, "samples": opt.samples, "min_pass": opt.min_pass,
                "max_pass": opt.max_pass}
    if mode == "score":
        return {"rules": asdict(opt.rules), "reward_model": opt.use_reward, "min_score": opt.min_score}
    return {}


def _synthesize(
    files: list[Path],
    out_path: Path,
    synthesizer: Synthesizer,
    text_key: str,
    id_key: str | None,
    concurrency: int,
    limit: int | None,
    quiet: bool,
) -> Stats:
    done = _done_ids(out_path) if out_path.exists() else set()
    stats = Stats(
        "synthesize",
        config={
            **_mode_config(synthesizer),
            "mode": synthesizer.mode,
            "model": synthesizer.client.model,
            "endpoint": synthesizer.client.endpoint,
        },
    )
    stats.extra["skipped_already_done"] = 0
    start = time.perf_counter()

    def todo():
        submitted = 0
        for raw in iter_raw(files):
            doc = parse(raw, text_key, stats.malformed)
            if doc is None:
                continue
            stats.docs_in += 1
            source_id = str(doc[id_key]) if id_key and id_key in doc else f"{Path(raw.file).name}:{raw.line}"
            if source_id in done:
                stats.extra["skipped_already_done"] += 1
                continue
            if limit is not None and submitted >= limit:
                return
            submitted += 1
            yield source_id, doc[text_key], doc

    def work(item: tuple[str, str, dict[str, Any]]) -> tuple[str, str, dict[str, Any] | str]:
        source_id, text, doc = item
        try:
            return source_id, text, synthesizer.run(text, doc)
        except TransientError as e:
            return source_id, text, str(e)

    with (
        ThreadPoolExecutor(concurrency) as pool,
        open(out_path, "a", encoding="utf-8") as fh,
        progress(f"synthesize ({synthesizer.mode})", quiet) as advance,
    ):
        for source_id, text, result in windowed(
            lambda it: pool.submit(work, it), lambda f: f.result(), todo(), 2 * concurrency
        ):
            if isinstance(result, str):
                stats.removed["failed_after_retries"] += 1
                stats.extra.setdefault("failures", []).append({"source_id": source_id, "error": result})
                if stats.docs_out == 0 and stats.removed["failed_after_retries"] >= GIVE_UP_AFTER:
                    # Nothing has worked yet: a wrong endpoint, not a bad document. Stop instead of
                    # spending every document's retries.
                    raise UserError(
                        f"the first {GIVE_UP_AFTER} documents all failed ({result}); check --endpoint "
                        f"{synthesizer.client.url} and --model"
                    )
            else:
                line = {"source_id": source_id, "source": text, **result}
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
                fh.flush()
                stats.docs_out += 1
                if result.get("selected") is not None:
                    key = "selected" if result["selected"] else "not_selected"
                    stats.extra[key] = stats.extra.get(key, 0) + 1
            advance()
    stats.extra["failures"] = stats.extra.get("failures", [])[:20]
    stats.seconds = time.perf_counter() - start
    return stats
