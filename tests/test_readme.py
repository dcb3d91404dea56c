"""The README's two opening commands stay true: CI runs the test command verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_opens_with_two_commands_and_ci_runs_the_second():
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    train_cmd, test_cmd = blocks[0].strip(), blocks[1].strip()
    assert "openseek-hal train" in train_cmd and "pip install" in train_cmd
    assert "pytest" in test_cmd and "pip install" in test_cmd
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    ci_lines = [ln for ln in ci if ln and not ln.startswith(("#", "set ", "cd "))]
    assert ci_lines == [test_cmd]
