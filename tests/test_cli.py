"""The ``pyro-mixflow`` command line: the demo in a few steps, usage errors, module entry."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pyro_mixflow.cli import main


def test_demo_prints_a_table_and_writes_a_picture(tmp_path, capsys):
    out = tmp_path / "demo.png"
    args = ["demo", "--datasets", "8gaussians", "--steps", "5", "--num-train", "500"]
    status = main([*args, "--num-test", "500", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert status == 0
    assert "| 8gaussians | gmm |" in printed and "| 8gaussians | flow |" in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    "args,message",
    [
        (["demo", "--datasets", "nope", "--steps", "1"], "nope"),
        (["demo", "--steps", "0"], "`--steps` must be >= 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyro-mixflow: error:") and message in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_module_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "pyro_mixflow", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.startswith("pyro-mixflow ")
