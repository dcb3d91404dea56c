"""The staged, out-of-core MinHash path: same output as the one-process path, stages run apart, bad input."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from conftest import write_jsonl

from openseek_hal.data.dedup_minhash import dedup_minhash, flatten_labels, parse_size, union_pairs
from openseek_hal.data.minhash import MinHashConfig, components
from openseek_hal.data.runner import OutputOptions
from openseek_hal.errors import UserError

WORDS = (
    "river mountain valley water stone forest village bridge harvest winter summer light shadow road market "
    "garden window letter morning evening story music field north south paper bread"
).split()
HAN = "春天来了山上的花都开了孩子们在田野里奔跑老人坐在门口晒太阳河水缓缓流过村庄远处传来鸟儿的歌声"


def _corpus(rng: random.Random, n: int) -> list[dict]:
    """Random English/Chinese documents, a third of them edited copies of an earlier one (chains too)."""
    docs: list[dict] = []
    for i in range(n):
        if docs and rng.random() < 0.35:
            toks = list(rng.choice(docs[-50:])["toks"])
            for _ in range(rng.randrange(0, 4)):
                toks[rng.randrange(len(toks))] = rng.choice(WORDS if toks[0].isascii() else HAN)
        elif i % 2:
            toks = [rng.choice(HAN) for _ in range(rng.randrange(40, 120))]
        else:
            toks = [rng.choice(WORDS) for _ in range(rng.randrange(30, 80))]
        sep = " " if toks[0].isascii() else ""
        docs.append({"id": i, "toks": toks, "text": sep.join(toks)})
    return [{"id": d["id"], "text": d["text"]} for d in docs]


def _write_inputs(tmp_path, rng, files: int = 3, docs: int = 700):
    folder = tmp_path / "in"
    folder.mkdir()
    corpus = _corpus(rng, docs)
    step = len(corpus) // files + 1
    for k in range(files):
        extra = ("{broken", '{"text": 5}') if k == 1 else ()
        write_jsonl(folder / f"f{k}.jsonl", corpus[k * step : (k + 1) * step] + [{"id": f"e{k}", "text": "..."}], extra)
    return folder


def _same(a, b) -> None:
    names = sorted(p.name for p in a.iterdir() if not p.name.startswith("."))
    assert names == sorted(p.name for p in b.iterdir() if not p.name.startswith("."))
    for name in names:
        if name == "stats.json":
            x, y = (json.loads((d / name).read_text()) for d in (a, b))
            for d in (x, y):
                for key in ("seconds", "docs_per_second", "files", "pairs_verified", "pairs_accepted"):
                    d.pop(key, None)  # checks made depend on the path's order and chunks; the clusters do not
                for key in ("path", "max_memory"):
                    d["config"].pop(key)
            assert x == y
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_union_find_in_chunks_matches_components():
    rng = random.Random(3)
    for _ in range(40):
        n = rng.randrange(1, 300)
        m = rng.randrange(0, 400)
        u = np.array([rng.randrange(n) for _ in range(m)], dtype=np.int64)
        v = np.array([rng.randrange(n) for _ in range(m)], dtype=np.int64)
        labels = np.arange(n, dtype=np.int64)
        chunk = rng.randrange(1, 50)
        for lo in range(0, m, chunk):
            union_pairs(labels, u[lo : lo + chunk], v[lo : lo + chunk])
        flatten_labels(labels, rng.randrange(1, 64))
        assert labels.tolist() == components(n, u, v).tolist()


@pytest.mark.parametrize(
    "workers, max_memory, verify", [(1, 1 << 30, True), (1, 64 << 10, True), (2, 64 << 10, True), (2, 64 << 10, False)]
)
def test_staged_equals_in_memory(tmp_path, workers, max_memory, verify):
    inputs = _write_inputs(tmp_path, random.Random(workers + max_memory))
    config = MinHashConfig(num_bands=16, rows_per_band=6, verify_threshold=0.8 if verify else None)
    ref = dedup_minhash(
        [str(inputs)], OutputOptions(tmp_path / "ref", quiet=True), config, id_key="id", in_memory=True,
        max_memory=max_memory,
    )
    got = dedup_minhash(
        [str(inputs)], OutputOptions(tmp_path / "staged", shard_docs=300, quiet=True), config, id_key="id",
        workers=workers, max_memory=max_memory,
    )
    assert ref.removed["minhash_duplicate"] > (100 if verify else 150) and ref.malformed.count == 2
    if verify:  # candidates were checked, some failed (with 64K, 64 pairs per verification chunk)
        assert 0 < got.extra["pairs_accepted"] < got.extra["pairs_verified"]
        assert 0 < ref.extra["pairs_accepted"] < ref.extra["pairs_verified"]
    else:
        assert "pairs_verified" not in got.extra
    assert (got.docs_out, got.removed, got.extra["clusters"]) == (ref.docs_out, ref.removed, ref.extra["clusters"])
    assert not (tmp_path / "staged" / ".minhash-work").exists()
    # Shards of another size: compare the concatenated documents and the cluster report.
    text = lambda d: "".join(p.read_text() for p in sorted(d.glob("part-*.jsonl")))  # noqa: E731
    assert text(tmp_path / "staged") == text(tmp_path / "ref")
    assert (tmp_path / "staged" / "clusters.jsonl").read_bytes() == (tmp_path / "ref" / "clusters.jsonl").read_bytes()


def test_small_memory_makes_partitions_and_chunks(tmp_path, capsys):
    inputs = _write_inputs(tmp_path, random.Random(5))
    out, work = tmp_path / "o", tmp_path / "w"
    dedup_minhash([str(inputs)], OutputOptions(out, quiet=True), MinHashConfig(), work_dir=work, max_memory=32 << 10)
    record = json.loads((work / "buckets.json").read_text())
    assert record["partitions_per_band"] > 1 and record["pairs"] > 0
    assert len(record["files"]) == 16 * record["partitions_per_band"]


def test_stages_run_apart_equal_all(cli, tmp_path):
    inputs = _write_inputs(tmp_path, random.Random(9))
    assert cli("data", "dedup-minhash", inputs, "-o", tmp_path / "all", "--id-key", "id", "-q")[0] == 0
    work = tmp_path / "work"
    for stage in ("signatures", "buckets", "clusters", "filter"):
        code, _, err = cli(
            "data", "dedup-minhash", inputs, "-o", tmp_path / "apart", "--id-key", "id", "--stage", stage,
            "--work-dir", work, "--max-memory", "1M", "--workers", 2,
        )
        assert code == 0, err
        if stage != "filter":
            assert f"stage {stage} done" in err and "16 bands x 6 rows (chosen" in err
            assert not (tmp_path / "apart" / "stats.json").exists()
    _same(tmp_path / "all", tmp_path / "apart")
    assert {p.name for p in work.glob("*.json")} == {"plan.json", "signatures.json", "buckets.json", "clusters.json"}


def test_stage_errors(cli, tmp_path):
    inputs = _write_inputs(tmp_path, random.Random(11))
    work = tmp_path / "work"
    args = ("data", "dedup-minhash", inputs, "-o", tmp_path / "o", "--work-dir", work)
    code, _, err = cli(*args, "--stage", "buckets")
    assert code == 2 and "holds no signatures; run dedup-minhash --stage signatures first" in err
    code, _, err = cli("data", "dedup-minhash", inputs, "-o", tmp_path / "o", "--stage", "clusters")
    assert code == 2 and "needs --work-dir" in err
    assert cli(*args, "--stage", "signatures", "-q")[0] == 0
    code, _, err = cli(*args, "--stage", "clusters", "-q")
    assert code == 2 and "no finished 'buckets' stage" in err
    code, _, err = cli(*args, "--stage", "buckets", "-q", "--bands", 10, "--rows", 10)
    assert code == 2 and "made for other inputs or options" in err
    write_jsonl(inputs / "f0.jsonl", [{"text": "changed"}])
    code, _, err = cli(*args, "--stage", "buckets", "-q")
    assert code == 2 and "made for other inputs or options" in err
    assert not (tmp_path / "o" / "stats.json").exists()
    # A work folder holding anything else is refused and left as it was.
    for name in ("notes.txt", "data.json", "keys.bin"):
        other = tmp_path / f"mine-{name}"
        other.mkdir()
        (other / name).write_text("keep me")
        code, _, err = cli("data", "dedup-minhash", inputs, "-o", tmp_path / "o2", "--work-dir", other, "-q")
        assert code == 2 and "which dedup-minhash did not write" in err
        assert (other / name).read_text() == "keep me"
    code, _, err = cli("data", "dedup-minhash", inputs, "-o", tmp_path / "o3", "--max-memory", "lots")
    assert code == 2 and "--max-memory" in err
    code, _, err = cli("data", "dedup-minhash", inputs, "-o", tmp_path / "o3", "--bands", 4)
    assert code == 2 and "--bands and --rows together" in err


def test_parse_size():
    assert parse_size("512M") == 512 << 20 and parse_size("2G") == 2 << 30 and parse_size("1.5GB") == 3 << 29
    assert parse_size("3000000") == 3_000_000
    for bad in ("", "1X", "-1G", "10K"):
        with pytest.raises(UserError):
            parse_size(bad)


@pytest.mark.parametrize("piece", [1, 997, 5000])
def test_files_cut_into_pieces_read_every_line_once(tmp_path, monkeypatch, piece):
    """Plain JSONL cut at line starts: the same documents, malformed lines and line numbers as one read."""
    from openseek_hal.data import dedup_minhash as dm

    rng = random.Random(piece)
    rows = [json.dumps(d, ensure_ascii=False) for d in _corpus(rng, 400)]
    for k, line in zip((3, 50, 51, 200), ("", "   ", "{broken", '{"text": 1}')):  # blank and malformed lines
        rows.insert(k, line)
    path = tmp_path / "in.jsonl"
    path.write_bytes(("\n".join(rows) + "\n").encode() + b'{"text": "\xff"}\n{"text": "last line"}\n')
    monkeypatch.setattr(dm, "MIN_PIECE_BYTES", piece)
    tasks = dm.signature_tasks([path], workers=2)
    assert len(tasks) > (1 if piece == 5000 else 10)
    from openseek_hal.data.io import iter_raw

    pieces = [raw for t in tasks for raw in dm._iter_range(path, t[3], t[4], t[5])]
    assert pieces == list(iter_raw([path]))
    ref = dedup_minhash([str(path)], OutputOptions(tmp_path / "ref", quiet=True), in_memory=True)
    got = dedup_minhash([str(path)], OutputOptions(tmp_path / "got", quiet=True), workers=2)
    assert got.malformed.first == ref.malformed.first and got.malformed.count == 3  # and one not UTF-8
    _same(tmp_path / "ref", tmp_path / "got")


def test_filter_pass_without_malformed_record_list(tmp_path):
    """The filter pass copies kept lines unparsed, skipping the records the signatures pass found malformed
    (``bad-*.bin``); a work folder without that list (an older version's) is filtered by parsing every
    record again. Both give the same output, malformed lines, blank lines and ids included."""
    folder = _write_inputs(tmp_path, random.Random(3))
    with open(folder / "f0.jsonl", "a", encoding="utf-8") as fh:
        fh.write('\n   \n{"id": "x", "text": "lone \\ud800 surrogate"}\n["not", "an object"]\n')
    work = tmp_path / "work"
    for stage in ("signatures", "buckets", "clusters"):
        dedup_minhash([str(folder)], OutputOptions(tmp_path / "unused", quiet=True), stage=stage, work_dir=work)
    assert sorted(p.name for p in work.glob("bad-*.bin")) == ["bad-00000.bin", "bad-00001.bin", "bad-00002.bin"]
    fast = dedup_minhash([str(folder)], OutputOptions(tmp_path / "fast", quiet=True), id_key="id", stage="filter",
                         work_dir=work)
    record = json.loads((work / "signatures.json").read_text())
    for shard in record["shards"]:
        del shard["records"]
    (work / "signatures.json").write_text(json.dumps(record))
    parsed = dedup_minhash([str(folder)], OutputOptions(tmp_path / "parsed", quiet=True), id_key="id",
                           stage="filter", work_dir=work)
    assert fast.malformed.count == parsed.malformed.count == 4 and fast.removed["minhash_duplicate"] > 50
    assert (fast.bytes_out, fast.docs_out) == (parsed.bytes_out, parsed.docs_out)
    _same(tmp_path / "fast", tmp_path / "parsed")
