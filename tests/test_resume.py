"""`flashdsa train`: a run killed with SIGKILL and resumed gives the uninterrupted run's
losses bit for bit; --seed makes a run reproducible; --resume restores the run's settings
and refuses flags that contradict them unless --override names them."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import flashdsa
from flashdsa.checkpoint import from_pretrained
from flashdsa.cli import main

STEPS = 60
TINY = ["--stage", "dense", "--preset", "tiny", "--seq-len", "64", "--batch-size", "2", "--max-bytes", str(1 << 18)]
TIMEOUT = 300       # seconds for one subprocess run: generous for a busy 2-core machine


def _flashdsa(*args: str, **kw) -> subprocess.Popen:
    """`python -m flashdsa ARGS` on this checkout, one torch thread (the same numerics in every run)."""
    env = {**os.environ, "PYTHONPATH": str(Path(flashdsa.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "flashdsa", *args], env=env, text=True,
                            stdout=subprocess.DEVNULL, **kw)


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err


def _history(path: Path) -> list:
    return json.loads(path.read_text())["history"]


def test_killed_run_resumes_bit_identical(tmp_path):
    run = [*TINY, "--steps", str(STEPS), "--log-every", "1", "--seed", "3"]
    whole = _flashdsa("train", *run, "--out", str(tmp_path / "whole"), "--json", str(tmp_path / "whole.json"),
                      stderr=subprocess.PIPE)
    killed = _flashdsa("train", *run, "--save-every", "4", "--out", str(tmp_path / "killed"),
                       stderr=subprocess.PIPE)
    ckpt = tmp_path / "killed" / "train_state.pt"
    try:
        # one progress line per step on stderr ("dense: ... 7/60 ..."); kill once a checkpoint exists
        deadline = time.monotonic() + TIMEOUT
        for line in killed.stderr:
            if f"/{STEPS} [" in line and ckpt.exists() or time.monotonic() > deadline:
                break
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=TIMEOUT)
    finally:
        killed.kill()
        killed.stderr.close()
    assert killed.returncode == -signal.SIGKILL
    saved = torch.load(ckpt, weights_only=False)["state"]["step"]
    assert 4 <= saved < STEPS and saved % 4 == 0
    # resume with no setting on the command line: all of them come from the checkpoint
    resumed = _flashdsa("train", "--resume", str(ckpt), "--json", str(tmp_path / "resumed.json"),
                        stderr=subprocess.PIPE)
    _finish(resumed)
    _finish(whole)
    want, got = _history(tmp_path / "whole.json"), _history(tmp_path / "resumed.json")
    assert len(want) == STEPS and got == want         # exact: every step's loss, to the last bit


def test_same_seed_same_run(tmp_path):
    """Two processes with one --seed: the same losses; the seed reaches the initial weights."""
    run = [*TINY, "--steps", "8", "--log-every", "1", "--seed", "11"]
    a, b = (_flashdsa("train", *run, "--out", str(tmp_path / n), "--json", str(tmp_path / f"{n}.json"),
                      stderr=subprocess.PIPE) for n in "ab")
    _finish(a)
    _finish(b)
    assert _history(tmp_path / "a.json") == _history(tmp_path / "b.json")
    # the seed sets a fresh model's weights (--steps 0 writes them untrained)
    for seed, out in ((11, "i11"), (11, "i11b"), (12, "i12")):
        assert main(["train", *TINY, "--steps", "0", "--seed", str(seed), "--out", str(tmp_path / out)]) == 0
    init = {out: from_pretrained(tmp_path / out / "model").state_dict() for out in ("i11", "i11b", "i12")}
    for name, w in init["i11"].items():
        assert torch.equal(w, init["i11b"][name]), name
    name = "model.embed_tokens.weight"
    assert not torch.equal(init["i11"][name], init["i12"][name])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-step run's train_state.pt (seed 5, lr 2e-3); tests that write copy it first."""
    out = tmp_path_factory.mktemp("finished")
    assert main(["train", *TINY, "--steps", "2", "--seed", "5", "--out", str(out)]) == 0
    return out / "train_state.pt"


@pytest.mark.parametrize("flags, message", [
    (["--steps", "10"], "--steps 10 contradicts the checkpoint's steps 2 (.*); drop the flag or pass --override steps"),
    (["--stage", "sparse"], "--stage sparse contradicts the checkpoint's stage dense (.*); drop the flag$"),
    (["--seq-len", "32"], "--seq-len 32 contradicts the checkpoint's seq-len 64"),
    (["--lr", "0.001"], "--lr 0.001 contradicts the checkpoint's lr 0.002"),
    (["--seed", "6"], "--seed 6 contradicts the checkpoint's seed 5"),
    (["--max-bytes", "1000"], "--max-bytes 1000 contradicts the checkpoint's max-bytes 262144"),
    (["--no-amp"], "--no-amp contradicts the checkpoint's no-amp off"),
    (["--steps", "3", "--override", "lr"], "--override lr without --lr"),
])
def test_resume_refuses_contradicting_flags(finished, capsys, flags, message):
    capsys.readouterr()
    assert main(["train", "--resume", str(finished), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0].removesuffix(" (--debug shows the traceback)")), err


def test_resume_restores_settings_and_applies_overrides(finished, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    finished = shutil.copy(finished, out)
    # flags equal to the checkpoint's are fine; the rest are restored (steps 2: nothing to do)
    assert main(["train", "--resume", str(finished), "--seed", "5", "--seq-len", "64", "--json",
                 str(tmp_path / "same.json")]) == 0
    same = json.loads((tmp_path / "same.json").read_text())
    assert same["steps"] == 2 and same["data_step"] == 2 and (out / "model" / "config.json").exists()
    # --override: train on to 4 steps with the rest of the settings from the checkpoint
    assert main(["train", "--resume", str(finished), "--steps", "4", "--override", "steps", "--json",
                 str(tmp_path / "longer.json"), "--log-every", "1"]) == 0
    longer = json.loads((tmp_path / "longer.json").read_text())
    assert longer["steps"] == 4 and longer["data_step"] == 4 and [h[0] for h in longer["history"]] == [2, 3, 4]
    cfg = torch.load(out / "train_state.pt", weights_only=False)["train_config"]
    assert (cfg["steps"], cfg["seed"], cfg["seq_len"], cfg["batch_size"], cfg["lr"]) == (4, 5, 64, 2, 2e-3)
    capsys.readouterr()
    assert main(["train", *TINY, "--override", "steps", "--out", str(tmp_path / "x")]) == 2
    assert "--override applies to --resume only" in capsys.readouterr().err
    assert main(["train", "--steps", "2"]) == 2
    assert "--stage is required (unless --resume is given)" in capsys.readouterr().err


def test_resume_reads_the_same_corpus_from_anywhere(tmp_path, monkeypatch, capsys):
    """--data paths are recorded absolute: a resume from another directory reads the same files."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("def f(x):\n    return x + 1\n" * 200)
    monkeypatch.chdir(tmp_path)
    args = ["--stage", "dense", "--preset", "tiny", "--seq-len", "64", "--batch-size", "2", "--steps", "2"]
    assert main(["train", *args, "--data", "corpus", "--out", "run"]) == 0
    blob = torch.load(tmp_path / "run" / "train_state.pt", weights_only=False)
    assert blob["corpus"]["data"] == [str(tmp_path / "corpus")]
    monkeypatch.chdir(tmp_path / "corpus")
    assert main(["train", "--resume", "../run/train_state.pt", "--data", "."]) == 0     # the same folder
    capsys.readouterr()
    assert main(["train", "--resume", "../run/train_state.pt", "--data", "a.txt"]) == 2
    assert (f"--data {tmp_path / 'corpus' / 'a.txt'} contradicts the checkpoint's data {tmp_path / 'corpus'} "
            in capsys.readouterr().err)


def test_resume_of_a_checkpoint_without_saved_corpus_is_one_line(finished, tmp_path, capsys):
    """A train_state.pt from before the corpus and Python RNG state were saved cannot be
    continued exactly: one line saying so and what to do, not a KeyError."""
    blob = torch.load(finished, weights_only=False)
    del blob["corpus"]
    old = tmp_path / "old_state.pt"
    torch.save(blob, old)
    capsys.readouterr()
    assert main(["train", "--resume", str(old)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no saved corpus" in err[0] and "--init" in err[0], err
