"""The linter CI runs: ruff, with the repository's ruff.toml, over every Python file."""

import subprocess
import sys

from conftest import REPO_ROOT


def test_ruff_finds_nothing():
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "."], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert lint.returncode == 0, lint.stdout + lint.stderr
