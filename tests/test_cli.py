import contextlib
import subprocess
import sys

import pytest

from flashdsa.cli import main


def test_info_prints_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for key in ("flashdsa", "torch", "triton", "device", "backend reference", "backend auto"):
        assert key in out


def _run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True)


def test_console_entry_point_runs():
    r = _run("-m", "flashdsa.cli", "--version")
    assert r.returncode == 0 and r.stdout.startswith("flashdsa ")


@pytest.mark.parametrize("argv", [["--help"], ["info"], ["--version"], ["eval", "--help"]])
def test_python_m_flashdsa_is_the_command(argv, capsys):
    """``python -m flashdsa ...`` prints what ``flashdsa ...`` (cli.main) prints."""
    r = _run("-m", "flashdsa", *argv)
    with pytest.raises(SystemExit) if argv != ["info"] else contextlib.nullcontext():
        main(argv)
    want = capsys.readouterr().out
    assert r.returncode == 0, r.stderr
    if argv == ["info"]:   # the same rows (the values can differ: the subprocess has its own env)
        assert [line.split()[0] for line in r.stdout.splitlines()] == [line.split()[0] for line in want.splitlines()]
    else:
        assert r.stdout == want


def test_python_m_flashdsa_rejects_bad_command():
    r = _run("-m", "flashdsa", "nonsense")
    assert r.returncode == 2 and "invalid choice" in r.stderr
