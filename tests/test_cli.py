"""The command line: version, backends table, and one clear line with exit 2 for user errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from openseek_hal import __version__


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "openseek_hal", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_version():
    r = run("--version")
    assert r.returncode == 0 and __version__ in r.stdout


def test_backends_table():
    r = run("backends", "--ops")
    assert r.returncode == 0, r.stderr
    rows = {line.split("│")[1].strip(): line for line in r.stdout.splitlines() if line.count("│") > 3}
    assert "yes" in rows["cpu"]
    if not torch.cuda.is_available():
        assert " no " in rows["cuda"]
    assert "cpu native: " in r.stdout.replace("\n", " ")


@pytest.mark.parametrize("args, fragment", [
    (["train", "--backend", "no-such-chip"], "unknown backend 'no-such-chip' (choose from: "),
    (["train", "--steps", "0"], "Invalid value for '--steps'"),
    (["train", "--bogus"], "No such option '--bogus'"),
    (["train", "--config", "/nonexistent/c.yaml"], "config file not found"),
    (["train", "--data", "/nonexistent/corpus.txt"], "data not found"),
    (["train", "--set", "nokey"], "expected KEY=VALUE"),
    (["no-such-command"], "No such command"),
    # values that cannot be meant (each ran before: no learning, gradient ascent, nan val loss, ...)
    (["train", "--set", "grad_clip=0"], "grad_clip must be a positive norm"),
    (["train", "--set", "grad_clip=-1"], "grad_clip must be a positive norm"),
    (["train", "--set", "save_every=-1"], "save_every must be zero or positive"),
    (["train", "--set", "warmup_steps=-5"], "warmup_steps must be zero or positive"),
    (["train", "--set", "eval_batches=0"], "eval_batches must be positive"),
    (["train", "--set", "tokenizer_vocab_size=10"], "tokenizer_vocab_size must be at least 257"),
    (["train", "--set", "model.num_hidden_layers=0"], "num_hidden_layers must be a positive integer"),
    (["train", "--set", "model.hidden_size=abc"], "hidden_size must be a positive integer, got 'abc'"),
    (["train", "--set", "expert_parallel=3"], "expert_parallel=3 does not divide the 8 routed experts"),
    (["train", "-n", "3", "--batch-size", "16"], "global_batch_size 16 does not split over 3"),
    (["train", "--resume", "/nonexistent/run"], "no checkpoint found"),
])
def test_user_errors_are_one_line_exit_2(args, fragment):
    r = run(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("openseek-hal: error: ") and fragment in lines[0]
    assert "Traceback" not in r.stderr


def test_unavailable_backend_is_one_line():
    if torch.cuda.is_available():
        pytest.skip("cuda is available here")
    r = run("train", "--backend", "cuda")
    assert r.returncode == 2 and "backend 'cuda' is not available here" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
