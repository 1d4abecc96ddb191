"""Every ```python block of the README runs on its own, as a user who pastes it would run it."""

from __future__ import annotations

import code
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```$", README.read_text(), flags=re.MULTILINE | re.DOTALL)
EXAMPLES = [pytest.param(block, id=f"example-{i + 1}") for i, block in enumerate(BLOCKS)]


class _CompileOnly(code.InteractiveConsole):
    """The interactive interpreter's reading of pasted lines, without running them."""

    def runcode(self, code):
        pass

    def showsyntaxerror(self, *args, **kwargs):
        raise  # the SyntaxError being handled


def test_readme_has_three_examples():
    assert len(BLOCKS) == 3


@pytest.mark.scripts
@pytest.mark.parametrize("source", EXAMPLES)
def test_readme_example_runs_alone(source, tmp_path):
    env = {**os.environ, "MPLBACKEND": "Agg"}
    out = subprocess.run(
        [sys.executable, "-c", source],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]


@pytest.mark.parametrize("source", EXAMPLES)
def test_readme_example_can_be_pasted_into_the_interpreter(source):
    """A compound statement (``def``, ``for``) must end with a blank line when pasted."""
    console = _CompileOnly()
    for line in source.splitlines():
        console.push(line)
    assert not console.push(""), "the example ends inside a statement"


def test_paste_check_catches_a_block_without_a_blank_line():
    console = _CompileOnly()
    console.push("for i in range(3):")
    console.push("    x = i")
    with pytest.raises(SyntaxError):
        console.push("y = 1")
