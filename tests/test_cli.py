import contextlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flashdsa.cli import main
from flashdsa.errors import UsageError


def test_info_prints_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for key in ("flashdsa", "torch", "triton", "device", "backend reference", "backend auto", "decode launches",
                "sparse MLA forward", "engine decode"):
        assert key in out


def test_info_names_the_sparse_mla_kernels(monkeypatch):
    """On an sm_90 GPU info names the Gluon forward and when decode takes it; elsewhere the
    Triton kernels and why."""
    import torch

    from flashdsa.cli import _sparse_mla_paths
    from flashdsa.ops.sparse_mla import fwd_sm90

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fwd_sm90, "gluon_device", lambda device: None)
    rows = dict(_sparse_mla_paths(torch))
    assert rows["sparse MLA forward"].startswith("gluon") and "split-k" in rows["sparse MLA decode"]
    assert rows["indexer top-k filter"].startswith("gluon")
    monkeypatch.setattr(fwd_sm90, "gluon_device", lambda device: "built for sm_90")
    assert _sparse_mla_paths(torch) == [("sparse MLA forward, decode", "triton (built for sm_90)")]


def test_info_says_how_the_engine_decodes(monkeypatch):
    """CUDA graphs on a GPU with the kernels, MoE models included where torch's grouped
    GEMM runs (sm_90); eagerly elsewhere, and why."""
    import torch

    from flashdsa.cli import _engine_decode

    assert _engine_decode(torch).startswith("eager") or torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert _engine_decode(torch) == "CUDA graphs (bf16 MoE layers as grouped GEMMs)"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "MoE layers eagerly" in _engine_decode(torch) and "sm_90" in _engine_decode(torch)


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


# ---- start-up time: argument definitions import neither torch nor triton ----

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("info", "train", "eval", "demo", "generate", "serve")


def test_building_the_parser_imports_no_torch():
    code = ("import sys, flashdsa, flashdsa.cli; flashdsa.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'triton') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


@pytest.mark.parametrize("argv", [[], *([c] for c in COMMANDS)])
def test_help_starts_fast(argv):
    """Under 1 s on an idle 2-core machine (about 0.1 s); the bound leaves room for a busy CI
    machine, while importing torch alone takes 2-4 s there."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "flashdsa", *argv, "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert time.perf_counter() - t0 < 3.0


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_defaults_and_examples(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    examples = out[out.index("examples:"):].splitlines()[1:]
    assert examples and all(line.strip().startswith(("flashdsa " + command, "cat ")) for line in examples)
    if command != "info":
        assert "(default: " in out
    assert not any(f"(default: {v})" in out for v in ("None", "False", "[]"))


def test_every_option_has_a_help_text():
    """(argparse shows an option's default only beside its help text.)"""
    from flashdsa.cli import build_parser
    commands = build_parser()._subparsers._group_actions[0].choices
    missing = [f"{name} {a.option_strings[0]}" for name, p in commands.items() for a in p._actions
               if a.option_strings and not a.help]
    assert not missing



def test_package_exports_are_lazy_and_complete():
    import flashdsa
    from flashdsa import api
    assert flashdsa.sparse_mla_fwd is api.sparse_mla_fwd
    assert flashdsa.UsageError is UsageError and issubclass(UsageError, ValueError)
    assert set(flashdsa.__all__) <= set(dir(flashdsa))
    assert all(getattr(flashdsa, name) is not None for name in flashdsa.__all__)
    assert flashdsa.reference.__name__ == "flashdsa.reference"    # submodules by attribute
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        flashdsa.nonsense


# ---- ordinary mistakes: one line on stderr, status 2; --debug: the traceback ----

def _one_error_line(capsys, prog):
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"{prog}: error: "), err
    return err


def test_bad_flag_value_is_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["train", "--stage", "dense", "--out", str(tmp_path), "--steps", "abc"])
    assert e.value.code == 2
    assert "argument --steps: invalid int value: 'abc'" in _one_error_line(capsys, "flashdsa train")


@pytest.mark.parametrize("device,message", [("gpu", "expected cpu, cuda or cuda:N, got 'gpu'"),
                                            ("cuda:64", "CUDA device")])
def test_bad_device_is_one_line(device, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "model", "--device", device])
    assert e.value.code == 2
    assert "argument --device: " in (err := _one_error_line(capsys, "flashdsa eval")) and message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_device_cuda_without_gpu_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "random:tiny", "--device", "cuda"])
    assert e.value.code == 2
    assert "no CUDA device is available here" in _one_error_line(capsys, "flashdsa generate")


def test_missing_model_is_one_line(capsys, tmp_path):
    missing = str(tmp_path / "missing.pt")
    assert main(["eval", missing]) == 2
    assert missing in _one_error_line(capsys, "flashdsa eval")
    with pytest.raises(FileNotFoundError):
        main(["--debug", "eval", missing])


def test_usage_error_of_a_command_is_one_line(capsys, monkeypatch, tmp_path):
    """What the training code raises as flashdsa.UsageError (e.g. a resume that contradicts its
    checkpoint) reaches the user as one line; --debug, before or after the command, re-raises."""
    import flashdsa.train

    def refuse(args):
        raise UsageError("--steps 200 contradicts the checkpoint's steps 120")

    monkeypatch.setattr(flashdsa.train, "cmd_train", refuse)
    argv = ["train", "--stage", "dense", "--out", str(tmp_path)]
    assert main(argv) == 2
    err = _one_error_line(capsys, "flashdsa train")
    assert "--steps 200 contradicts the checkpoint's steps 120" in err and "--debug" in err
    for debug_argv in (["--debug", *argv], [*argv, "--debug"]):
        with pytest.raises(UsageError):
            main(debug_argv)


def test_bad_retrieval_flags_are_one_line_before_loading(capsys, monkeypatch, tmp_path):
    """train and eval check --retrieval-task and --repeat-offset against --seq-len before they
    read the corpus or load a model."""
    import flashdsa.train

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded before checking the flags")

    monkeypatch.setattr(flashdsa.train.Corpus, "load", no_loading)
    monkeypatch.setattr(flashdsa.train, "load_model", no_loading)
    train = ["train", "--stage", "dense", "--out", str(tmp_path / "run"), "--seq-len", "128"]
    cases = [([*train, "--retrieval-task", "repeat"],      # the default offset, 128
              "--repeat-offset 128 with --seq-len 128: a 64-digit span repeated 128 tokens later needs windows "
              "of 192 tokens (seq_len >= 191)"),
             ([*train, "--repeat-offset", "64"],
              "--repeat-offset 64: applies to --retrieval-task repeat only, got --retrieval-task passkey"),
             (["eval", str(tmp_path / "missing"), "--retrieval-task", "repeat", "--repeat-offset", "32"],
              "--repeat-offset 32 with --seq-len 512: repeat offset 32: expected at least the span")]
    for argv, message in cases:
        assert main(argv) == 2
        err = _one_error_line(capsys, f"flashdsa {argv[0]}")
        assert message in err
    assert not (tmp_path / "run").exists()
