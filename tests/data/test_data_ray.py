"""`--executor ray` against a real local Ray runtime: the whole pipeline gives the local executor's bytes."""

from __future__ import annotations

import json
import random
import sys

import pytest
from conftest import write_jsonl

from openseek_hal.data.executor import ordered_map
from openseek_hal.errors import UserError

ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[ray]')")

try:
    import opencc  # noqa: F401

    T2S = ", t2s: true"  # the data extra: OpenCC runs inside the actors too
except ImportError:
    T2S = ""
STAGES = (
    "stages:\n"
    f"  - filter: {{min_chars: 20{T2S}}}\n"
    "  - dedup-minhash: {id_key: id}\n"
    "  - dedup-exact: {min_bytes: 40}\n"
    "  - tokenize: {vocab_size: 300}\n"
)
WORDS = (
    "river mountain valley water stone forest village bridge harvest winter summer light shadow road "
    "market garden window letter morning evening story music field north south"
).split()
HAN = "漢語門開車書馬"  # traditional: t2s changes them
HAN += "春天来了山上的花都开了孩子们在田野里奔跑老人坐在门口晒太阳河水缓缓流过村庄"
HAN += "远处传来鸟儿的歌声人们开始新一年的耕种"


def _corpus(n: int = 600) -> list[dict]:
    """English and Chinese documents with near-duplicates, exact repeats, short ones and a shared span."""
    rng = random.Random(7)
    docs: list[dict] = []
    boiler = "This page is part of the shared footer that many crawled pages repeat verbatim."
    for i in range(n):
        kind = i % 6
        if kind == 5 and docs:
            text = docs[-2]["text"].replace(" ", "  ", 1) + " edited"  # a near-duplicate
        elif kind == 4:
            text = "too short"
        elif kind % 2:
            text = "".join(rng.choice(HAN) for _ in range(rng.randrange(60, 200)))
        else:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(30, 90)))
            if i % 12 == 0:
                text += " " + boiler
        docs.append({"id": i, "text": text, "src": "gen"})
    return docs


@pytest.fixture(scope="module")
def ray_runtime():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def _files(root):
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_pipeline_ray_equals_local(cli, tmp_path, ray_runtime):
    write_jsonl(tmp_path / "in.jsonl", _corpus())
    for name in ("local", "ray"):
        (tmp_path / f"{name}.yaml").write_text(f"input: [in.jsonl]\noutput: {name}\nworkers: 2\n{STAGES}")
        code, _, err = cli("data", "run", tmp_path / f"{name}.yaml", "--executor", name, "-q")
        assert code == 0, err
    local, remote = _files(tmp_path / "local"), _files(tmp_path / "ray")
    assert sorted(local) == sorted(remote)
    compared = 0
    for rel, path in local.items():
        if path.name == "stats.json":  # equal but for the timings
            a, b = (json.loads(p.read_text()) for p in (path, remote[rel]))
            for d in (a, b):
                for key in ("seconds", "docs_per_second", "mb_per_second", "tokens_per_second"):
                    d.pop(key, None)
            assert a == b, rel
        else:
            assert path.read_bytes() == remote[rel].read_bytes(), rel
            compared += 1
    stats = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "ray").glob("*/stats.json")}
    # The corpus exercises every stage: short documents filtered, near-duplicates clustered, spans cut.
    assert stats["1-filter"]["removed"] == {"min_chars": 100}
    assert stats["2-dedup-minhash"]["removed"]["minhash_duplicate"] >= 90
    assert stats["3-dedup-exact"]["docs_changed"] > 0
    assert stats["4-tokenize"]["docs_in"] == stats["3-dedup-exact"]["docs_out"] > 0
    assert compared >= 8  # shards, clusters.jsonl, tokens-*.bin/.idx, index.json, tokenizer.json
    if T2S:
        filtered = (tmp_path / "ray" / "1-filter" / "part-00000.jsonl").read_text()
        assert "漢" not in filtered and "汉" in filtered


class _Boom:
    """A batch worker that fails on the batch holding "boom" (pickled by value: Ray workers cannot import tests)."""

    def setup(self) -> None:
        self.seen = 0

    def __call__(self, batch: list[str]) -> list[str]:
        if "boom" in batch:
            raise UserError("bad batch")
        return [s.upper() for s in batch]


def test_ray_map_order_and_worker_errors(ray_runtime):
    """Results come back in input order across actors; a worker's UserError reaches the caller as one."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    batches = [[f"b{i}", f"c{i}"] for i in range(25)]
    assert list(ordered_map(_Boom(), iter(batches), workers=3, executor="ray")) == [
        [s.upper() for s in b] for b in batches
    ]
    with pytest.raises(UserError, match="bad batch"):
        list(ordered_map(_Boom(), iter([["a"], ["boom"], ["c"]]), workers=2, executor="ray"))


def test_staged_minhash_on_ray_equals_in_memory(cli, tmp_path, ray_runtime, monkeypatch):
    """The staged path's tasks (one per input file, one per bucket partition) on Ray actors, with paths
    relative to a folder the actors do not share."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "in"
    folder.mkdir()
    docs = _corpus(900)
    for k in range(3):
        write_jsonl(folder / f"f{k}.jsonl", docs[k * 300 : (k + 1) * 300], ("{broken",) if k == 1 else ())
    base = ("data", "dedup-minhash", "in", "--id-key", "id", "-q")
    assert cli(*base, "-o", "ref", "--in-memory")[0] == 0
    code, _, err = cli(*base, "-o", "ray", "--executor", "ray", "--workers", 2, "--max-memory", "1M",
                       "--work-dir", "work")
    assert code == 0, err
    assert json.loads((tmp_path / "work" / "buckets.json").read_text())["partitions_per_band"] >= 1
    for name in ("part-00000.jsonl", "clusters.jsonl"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    stats = json.loads((tmp_path / "ray" / "stats.json").read_text())
    assert stats["removed"]["minhash_duplicate"] >= 100
    assert stats["malformed"] == json.loads((tmp_path / "ref" / "stats.json").read_text())["malformed"]
    assert stats["malformed"]["first"][0]["file"] == "in/f1.jsonl"
