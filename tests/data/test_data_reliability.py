"""A stage's output folder is valid only as a whole: interrupted runs, leftovers, full disks, locks, workers."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import read_output, write_jsonl
from rich.console import Console

from openseek_hal.data.dedup_minhash import cluster_labels
from openseek_hal.data.outdir import StageOutput, verify
from openseek_hal.data.shards import TokenShards
from openseek_hal.errors import UserError

REPO = Path(__file__).resolve().parents[2]
FAULT_RUN = Path(__file__).with_name("fault_run.py")
def _word(n: int) -> str:  # MinHash normalizes digits away: words of letters keep documents apart
    return "".join(chr(ord("a") + int(c)) for c in str(n))


DOCS = [{"id": i, "text": "Document says " + " ".join(_word(100 * i + k) for k in range(12)) + "."} for i in range(30)]


def _run(*args, fault: str = "", wait: bool = True, **kw):
    """``openseek-hal ARGS`` in a fresh process (FAULT injected, see fault_run.py)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "FAULT": fault}
    cmd = [sys.executable, str(FAULT_RUN), *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, **kw)


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}


def _children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid``."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _kill_all(pids: list[int]) -> None:
    """Clean up after a failed test: the processes it started, by pid."""
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _wait_for(cond, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


# -- interrupted runs ------------------------------------------------------------------------------------


def test_rerun_killed_mid_write_leaves_the_previous_output_whole(cli, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", DOCS + DOCS[:5])  # 5 exact copies to remove
    out = tmp_path / "out"
    assert cli("data", "dedup-minhash", inp, "-o", out, "--shard-docs", 10, "-q")[0] == 0
    before = _listing(out)
    assert read_output(out) == DOCS
    # The rerun with another shard size is killed after its second shard: the old output must stay whole.
    fault = "kill:openseek_hal.data.io:ShardWriter._finish_shard:2"
    res = _run("data", "dedup-minhash", inp, "-o", out, "--shard-docs", 7, "-q", fault=fault)
    assert res.returncode == -signal.SIGKILL
    assert (out / ".staging").is_dir()  # the killed run's files, never mixed with the output
    assert _listing(out) == before
    assert verify(out)["docs_out"] == 30
    # The next stage reads all 30 documents, not a mix of two runs.
    assert cli("data", "filter", out, "-o", tmp_path / "f", "--min-chars", 1, "-q")[0] == 0
    assert read_output(tmp_path / "f") == DOCS
    # A completed rerun replaces the whole output and removes the killed run's leftovers.
    assert cli("data", "dedup-minhash", inp, "-o", out, "--shard-docs", 7, "-q")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == [".lock", "clusters.jsonl"] + [
        f"part-0000{i}.jsonl" for i in range(5)
    ] + ["stats.json"]
    assert read_output(out) == DOCS


def test_first_run_killed_is_refused_by_every_reader(cli, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", DOCS)
    out = tmp_path / "out"
    res = _run("data", "filter", inp, "-o", out, "--shard-docs", 5, "-q",
               fault="kill:openseek_hal.data.io:ShardWriter._finish_shard:3")
    assert res.returncode == -signal.SIGKILL
    assert not list(out.glob("part-*"))  # nothing outside the staging folder
    code, _, err = cli("data", "filter", out, "-o", tmp_path / "next", "-q")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{out} is an incomplete stage output: a run of filter (pid " in err and "rerun that stage" in err
    from openseek_hal.train.corpus import read_documents

    with pytest.raises(UserError, match="incomplete stage output"):
        read_documents(str(out))
    with pytest.raises(UserError, match="incomplete stage output"):
        read_documents(str(tmp_path))  # also when the folder is found inside another one
    # Rerun: complete, and nothing of the killed run is left.
    assert cli("data", "filter", inp, "-o", out, "--shard-docs", 5, "-q")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == [".lock"] + [f"part-0000{i}.jsonl" for i in range(6)] + [
        "stats.json"
    ]


def test_sigint_during_the_writing_pass_leaves_no_half_output(cli, tmp_path, monkeypatch):
    from openseek_hal.data import io

    inp = write_jsonl(tmp_path / "in.jsonl", DOCS)
    real = io.ShardWriter._finish_shard

    def interrupted(self):
        real(self)
        if len(self.written) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(io.ShardWriter, "_finish_shard", interrupted)
    code, _, err = cli("data", "filter", inp, "-o", tmp_path / "out", "--shard-docs", 2, "-q")
    assert code == 130 and err.strip() == "openseek-hal: aborted"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".incomplete", ".lock"]
    code, _, err = cli("data", "tokenize", tmp_path / "out", "-o", tmp_path / "tok", "--vocab-size", 300)
    assert code == 2 and "incomplete stage output" in err


def test_changed_folder_is_refused(cli, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", DOCS)
    out = tmp_path / "out"
    assert cli("data", "filter", inp, "-o", out, "--shard-docs", 10, "-q")[0] == 0
    assert [e["documents"] for e in verify(out)["files"]] == [10, 10, 10]
    (out / "part-00003.jsonl").write_text(json.dumps(DOCS[0]) + "\n")  # a shard of another run
    code, _, err = cli("data", "filter", out, "-o", tmp_path / "f", "-q")
    assert code == 2 and "part-00003.jsonl which" in err and "does not list" in err
    (out / "part-00003.jsonl").unlink()
    (out / "part-00001.jsonl").unlink()
    with pytest.raises(UserError, match="part-00001.jsonl is missing"):
        verify(out)
    (out / "part-00001.jsonl").write_text("x\n")
    with pytest.raises(UserError, match="part-00001.jsonl has 2 bytes but .*stats.json records"):
        verify(out)
    stats = json.loads((out / "stats.json").read_text())
    del stats["files"]  # as written before manifests existed
    (out / "stats.json").write_text(json.dumps(stats))
    with pytest.raises(UserError, match="lists no files"):
        verify(out)


def test_tokenize_rerun_killed_keeps_index_and_tokenizer_together(cli, tmp_path):
    from openseek_hal.train.corpus import load_training_tokens

    inp = write_jsonl(tmp_path / "in.jsonl", DOCS)
    tok = tmp_path / "tok"
    assert cli("data", "tokenize", inp, "-o", tok, "--vocab-size", 300, "-q")[0] == 0
    first = _listing(tok)
    res = _run("data", "tokenize", inp, "-o", tok, "--vocab-size", 400, "-q",
               fault="kill:openseek_hal.data.tokenize:_ShardSink.add:1")
    assert res.returncode == -signal.SIGKILL
    assert (tok / ".staging" / "tokenizer.json").is_file()  # the new tokenizer was written, in staging
    assert _listing(tok) == first
    shards = TokenShards(tok)
    assert shards.vocab_size == json.loads(first["index.json"])["vocab_size"]
    console = Console(file=open(os.devnull, "w"))  # noqa: SIM115
    data = load_training_tokens(str(tok), 512, console)
    assert data.tokenizer.to_str().encode() == first["tokenizer.json"]
    assert len(data.tokens) == shards.num_tokens
    # A tokenizer swapped by hand (or by an older version's killed rerun) is refused by its sha256, even
    # with a stats.json that agrees about sizes.
    from tokenizers import Tokenizer

    other = Tokenizer.from_file(str(tok / "tokenizer.json"))
    other.add_special_tokens(["<|other|>"])
    (tok / "tokenizer.json").write_text(other.to_str())
    stats = json.loads((tok / "stats.json").read_text())
    for e in stats["files"]:
        if e["name"] == "tokenizer.json":
            e["bytes"] = (tok / "tokenizer.json").stat().st_size
    (tok / "stats.json").write_text(json.dumps(stats))
    with pytest.raises(UserError, match="is not the tokenizer these shards were made with"):
        TokenShards(tok)
    with pytest.raises(UserError, match="is not the tokenizer these shards were made with"):
        load_training_tokens(str(tok), 512, console)


# -- leftovers and full disks ------------------------------------------------------------------------------


def _plant_leftovers(out: Path) -> None:
    out.mkdir(exist_ok=True)
    (out / ".part-00000.jsonl.tmp99999").write_text("partial")
    (out / ".clusters.jsonl.tmp99999").write_text("partial")
    (out / ".minhash-abc123").mkdir()
    (out / ".minhash-abc123" / "keys.bin").write_bytes(b"\0" * 112)
    (out / ".staging").mkdir()
    (out / ".staging" / "part-00000.jsonl").write_text("partial")


@pytest.mark.parametrize("stage", ["filter", "dedup-minhash"])
def test_stale_temporaries_are_removed_on_start(cli, tmp_path, stage):
    inp = write_jsonl(tmp_path / "in.jsonl", DOCS)
    out = tmp_path / "out"
    _plant_leftovers(out)
    assert cli("data", stage, inp, "-o", out, "-q")[0] == 0
    hidden = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert hidden == [".lock"]
    assert read_output(out) == DOCS


class _FullDisk:
    """A file whose writes fail with ENOSPC once ``budget`` bytes are written (and whose flush fails too)."""

    def __init__(self, fh, budget: list[int]):
        self.fh, self.budget = fh, budget

    def write(self, s):
        self.budget[0] -= len(s)
        if self.budget[0] < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.fh.write(s)

    def close(self):
        self.fh.close()
        if self.budget[0] < 0:
            raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_is_one_line_and_frees_the_space(cli, tmp_path, monkeypatch):
    from openseek_hal.data import io

    inp = write_jsonl(tmp_path / "in.jsonl", DOCS)
    out = tmp_path / "out"
    assert cli("data", "filter", inp, "-o", out, "--shard-docs", 10, "-q")[0] == 0
    before = _listing(out)
    (out / ".part-00009.jsonl.tmp4242").write_text("a crashed run's shard")
    budget = [sum(len(json.dumps(d)) + 1 for d in DOCS[:15])]  # room for one shard and a half
    real_open = io.open_text
    monkeypatch.setattr(io, "open_text", lambda p, mode="rt", format_name=None: _FullDisk(
        real_open(p, mode, format_name), budget) if "w" in mode else real_open(p, mode, format_name))
    code, _, err = cli("data", "filter", inp, "-o", out, "--shard-docs", 10, "-q")
    assert code == 2
    assert err.splitlines() == [
        f"openseek-hal: error: no space left on device while writing {out}; the partial output was removed "
        "(the folder holds what it held before), free some space and rerun"
    ]
    assert _listing(out) == before  # nothing half-written, the crashed run's temp file removed too
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".lock"]


# -- dedup-minhash with nothing to cluster ------------------------------------------------------------------


def test_cluster_labels_without_candidates():
    assert cluster_labels(np.zeros((0, 14), np.uint64), np.zeros(0, bool))[0].tolist() == []
    keys = np.ones((3, 14), np.uint64)  # equal keys, but every document is empty: never duplicates
    assert cluster_labels(keys, np.ones(3, bool))[0].tolist() == [0, 1, 2]
    assert cluster_labels(keys, np.array([False, True, False]))[0].tolist() == [0, 1, 0]


@pytest.mark.parametrize(
    "lines,malformed",
    [([], 0), (["{bad", "[1]", "nope"], 3), (['{"text": 1}', '{"text": null}'], 2)],
    ids=["empty", "all-malformed", "non-string-text"],
)
def test_dedup_minhash_with_no_usable_document(cli, tmp_path, lines, malformed):
    inp = write_jsonl(tmp_path / "in.jsonl", lines)
    code, _, err = cli("data", "dedup-minhash", inp, "-o", tmp_path / "out", "-q")
    assert code == 0, err
    stats = verify(tmp_path / "out")
    assert (stats["docs_in"], stats["docs_out"], stats["malformed"]["count"]) == (0, 0, malformed)
    assert read_output(tmp_path / "out") == []
    code, _, err = cli("data", "filter", tmp_path / "out", "-o", tmp_path / "f", "-q")
    assert code == 2 and "holds no documents" in err


# -- invalid UTF-8 ------------------------------------------------------------------------------------------

BAD_LINE = b'{"id": "bad", "text": "caf\xe9 au lait"}'
BAD_AT = len(b'{"id": "bad", "text": "caf')


@pytest.mark.parametrize("stage", ["filter", "dedup-minhash", "dedup-exact", "tokenize"])
def test_invalid_utf8_line_is_a_counted_malformed_record(cli, tmp_path, stage):
    good = [json.dumps(d, ensure_ascii=False).encode() for d in DOCS[:3]]
    good[1] = '{"id": 1, "text": "naïve — ünïcode ✓"}'.encode()
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\n".join([good[0], good[1], BAD_LINE, good[2]]) + b"\n")
    extra = ["--vocab-size", "300"] if stage == "tokenize" else ["--min-chars", "1"] if stage == "filter" else []
    code, _, err = cli("data", stage, inp, "-o", tmp_path / "out", "-q", *extra)
    assert code == 0
    stats = verify(tmp_path / "out")
    assert stats["malformed"] == {
        "count": 1,
        "first": [{"file": str(inp), "line": 3, "error": f"invalid UTF-8 at byte {BAD_AT} of the line"}],
    }
    assert stats["docs_in"] == 3
    assert err.splitlines() == [
        f"warning: skipped malformed record {inp}:3: invalid UTF-8 at byte {BAD_AT} of the line"
    ]
    if stage == "dedup-minhash":  # documents still pass through byte for byte
        assert (tmp_path / "out" / "part-00000.jsonl").read_bytes() == b"\n".join(
            [good[0], good[1], good[2]]
        ) + b"\n"
    elif stage != "tokenize":
        assert [d["id"] for d in read_output(tmp_path / "out")] == [0, 1, 2]
    assert "\ufffd" not in "".join(p.read_text(errors="strict") for p in (tmp_path / "out").glob("part-*"))


# -- locks ----------------------------------------------------------------------------------------------------


def test_second_run_into_a_locked_folder_fails_at_once(cli, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", DOCS)
    out = tmp_path / "out"
    with StageOutput(out, "dedup-exact"):
        start = time.monotonic()
        code, _, err = cli("data", "filter", inp, "-o", out, "-q")
        assert time.monotonic() - start < 5
    assert code == 2
    assert err.splitlines() == [
        f"openseek-hal: error: output folder {out} is in use by dedup-exact pid {os.getpid()} on "
        f"{socket.gethostname()} (lock {out / '.lock'}); wait for it to end or stop it, or choose another -o"
    ]
    assert cli("data", "filter", inp, "-o", out, "-q")[0] == 0  # released when the holder left


def test_lock_dies_with_its_holder(cli, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", DOCS)
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom openseek_hal.data.outdir import StageOutput\n"
         f"with StageOutput({str(out)!r}, 'filter'):\n    print('ready', flush=True)\n    time.sleep(60)"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        code, _, err = cli("data", "filter", inp, "-o", out, "-q")
        assert code == 2 and f"in use by filter pid {holder.pid} on {socket.gethostname()}" in err
    finally:
        holder.kill()
        holder.wait()
    assert cli("data", "filter", inp, "-o", out, "-q")[0] == 0


# -- workers and signals --------------------------------------------------------------------------------------


def test_workers_die_with_a_killed_parent(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", DOCS)
    job = _run("data", "filter", tmp_path / "in.jsonl", "-o", tmp_path / "out", "--workers", 2, "-q",
               fault="sleep:openseek_hal.data.runner:_DocBatch.__call__:600", wait=False)
    workers: list[int] = []
    try:
        assert _wait_for(lambda: len(_children(job.pid)) == 2), "workers did not start"
        workers = _children(job.pid)
        os.kill(job.pid, signal.SIGKILL)
        job.wait(10)
        assert _wait_for(lambda: not any(_alive(w) for w in workers), timeout=5), "workers outlived the parent"
    finally:
        _kill_all([job.pid, *workers])


def test_sigterm_stops_a_job_cleanly(cli, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", DOCS * 40)  # 5 batches of 256
    out = tmp_path / "out"
    assert cli("data", "filter", inp, "-o", out, "--shard-docs", 100, "--min-chars", 1, "-q")[0] == 0
    before = _listing(out)
    job = _run("data", "filter", inp, "-o", out, "--workers", 2, "--shard-docs", 3, "--min-chars", 1, "-q",
               fault="sleep:openseek_hal.data.runner:_DocBatch.__call__:1", wait=False)
    workers: list[int] = []
    try:
        assert _wait_for(lambda: len(_children(job.pid)) == 2), "workers did not start"
        workers = _children(job.pid)
        job.send_signal(signal.SIGTERM)
        _, err = job.communicate(timeout=20)
    finally:
        _kill_all([job.pid, *workers])
    assert job.returncode == 128 + signal.SIGTERM
    assert err.splitlines() == [
        "openseek-hal: error: terminated by SIGTERM before the run finished; its output was not committed"
    ]
    assert not any(_alive(w) for w in workers)
    assert _listing(out) == before and not (out / ".staging").exists()
    assert read_output(out) == DOCS * 40
