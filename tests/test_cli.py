import subprocess
import sys

from flashdsa.cli import main


def test_info_prints_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for key in ("flashdsa", "torch", "triton", "device", "backend reference", "backend auto"):
        assert key in out


def test_console_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "flashdsa.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("flashdsa ")
