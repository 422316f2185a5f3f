"""Every Python snippet in the READMEs and every example runs as written; a snippet marked
``# fragment`` still compiles."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
READMES = [ROOT / "README.md", ROOT / "crates" / "conveyor-python" / "README.md"]
FRAGMENT = "# fragment"


def snippets():
    for readme in READMES:
        text = readme.read_text(encoding="utf-8")
        for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
            line = text.count("\n", 0, match.start()) + 1
            name = f"{readme.relative_to(ROOT)}:{line}"
            yield pytest.param(name, match.group(1), id=name)


def test_the_readmes_have_python_snippets():
    assert len(list(snippets())) >= 8


@pytest.mark.parametrize("name, code", snippets())
def test_readme_python_snippet_runs_as_written(name, code, tmp_path):
    if code.startswith(FRAGMENT):
        # Needs what the reader supplies (an endpoint, a token, `requests`): it must at least
        # be valid Python.
        compile(code, name, "exec")
        return
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        cwd=tmp_path,  # snippets may create files, such as a journal
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"{name}:\n{proc.stderr}"
    assert proc.stderr == ""


EXAMPLES = sorted((ROOT / "crates" / "conveyor-python" / "examples").glob("*.py"))


def test_there_are_examples():
    assert EXAMPLES


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_example_runs(example, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(example)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"{example.name}:\n{proc.stderr}"
    assert proc.stderr == ""
