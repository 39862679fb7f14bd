"""The layers of docs/architecture.md hold: import-linter's contracts in pyproject.toml, checked on the code."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_layers_hold():
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "1 kept, 0 broken" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


def test_nothing_a_user_reads_points_outside_the_repository():
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert all("../shared" not in p.read_text() for p in texts)
