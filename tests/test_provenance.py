"""Every report says what produced it: versions, the git commit (and dirty flag), the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from openseek_hal.provenance import git_state, provenance

ROOT = Path(__file__).resolve().parents[1]


def test_provenance_of_this_checkout(monkeypatch):
    monkeypatch.delenv("OPENSEEK_HAL_COMMIT", raising=False)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    info = provenance(["openseek-hal", "conform", "--backend", "cpu", "--sample", "a b"])
    assert info["commit"] == head and info["commit_source"] == "git" and isinstance(info["dirty"], bool)
    assert info["command"] == "openseek-hal conform --backend cpu --sample 'a b'"
    assert info["torch"] == torch.__version__ and info["python"]


def test_a_copied_tree_takes_the_commit_from_the_environment(monkeypatch, tmp_path):
    assert git_state(tmp_path) == {"commit": None, "dirty": None, "commit_source": "not a git checkout"}
    monkeypatch.setenv("OPENSEEK_HAL_COMMIT", "abc1234")
    assert git_state(tmp_path) == {"commit": "abc1234", "dirty": None, "commit_source": "OPENSEEK_HAL_COMMIT"}


def test_conformance_reports_carry_provenance(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "openseek_hal", "conform", "--backend", "cpu", "--level", "ops",
                           "--op", "rms_norm", "--dtype", "float32", "--quick", "--seed", "3", "--report",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env = json.loads((tmp_path / "conform-cpu.json").read_text())["environment"]
    assert env["commit"] and env["command"].startswith("python -m openseek_hal conform --backend cpu")
    assert "--seed 3" in env["command"]
    markdown = next(tmp_path.glob("*.md")).read_text()
    assert env["commit"] in markdown


def test_changes_under_ignored_paths_do_not_make_a_checkout_dirty(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENSEEK_HAL_COMMIT", raising=False)

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "code.py").write_text("a\n")
    (tmp_path / "results" / "r.json").write_text("{}\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    assert git_state(tmp_path)["dirty"] is False
    (tmp_path / "results" / "r.json").write_text('{"new": 1}\n')  # a benchmark rewrote its record
    assert git_state(tmp_path)["dirty"] is True
    assert git_state(tmp_path, ignore=("results",))["dirty"] is False
    (tmp_path / "code.py").write_text("b\n")
    assert git_state(tmp_path, ignore=("results",))["dirty"] is True
