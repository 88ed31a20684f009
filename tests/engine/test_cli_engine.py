"""`flashdsa generate` in-process and `flashdsa serve` as a real subprocess."""
import io
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

from flashdsa.cli import main
from flashdsa.engine import LLM, SamplingParams
from flashdsa.model import DSAForCausalLM
from flashdsa.train import preset_config

ROOT = Path(__file__).resolve().parents[2]


def test_generate_matches_llm(capsys):
    assert main(["generate", "random:tiny", "--seed", "4", "--prompt", "def f(x):", "--prompt", "import",
                 "--max-tokens", "9", "--ignore-eos", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    torch.manual_seed(4)
    llm = LLM(DSAForCausalLM(preset_config("tiny")))
    want = llm.generate(["def f(x):", "import"], SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))
    assert [x["token_ids"] for x in lines] == [w.token_ids for w in want]
    assert all(x["finish_reason"] == "length" for x in lines)


def test_generate_prefix_caching_switch(capsys):
    """Two prompts that share their first 130 bytes: with the default prefix caching the
    second, admitted after the first's prefill, takes two cached blocks; with
    --no-prefix-caching none; the tokens are the same."""
    shared = "s" * 130
    lines = {}
    for flag in ([], ["--no-prefix-caching"]):
        assert main(["generate", "random:tiny", "--prompt", shared + "a", "--prompt", shared + "bc",
                     "--max-tokens", "4", "--ignore-eos", "--max-num-batched-tokens", "64", "--json", *flag]) == 0
        lines[bool(flag)] = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["cached_tokens"] for x in lines[False]] == [0, 128]
    assert [x["cached_tokens"] for x in lines[True]] == [0, 0]
    assert [x["token_ids"] for x in lines[False]] == [x["token_ids"] for x in lines[True]]


def test_generate_logprobs(capsys):
    assert main(["generate", "random:tiny", "--prompt", "abc", "--max-tokens", "3", "--ignore-eos", "--json",
                 "--logprobs", "2"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert len(line["logprobs"]) == 3 and all(len(x["top"]) == 2 and x["logprob"] <= 0 for x in line["logprobs"])
    assert main(["generate", "random:tiny", "--prompt", "abc", "--logprobs", "21"]) == 2
    assert "logprobs" in capsys.readouterr().err
    assert main(["generate", "random:tiny", "--prompt", "abc", "--repetition-penalty", "0"]) == 2
    assert "repetition_penalty" in capsys.readouterr().err


def test_generate_rejects_too_long(capsys):
    assert main(["generate", "random:tiny", "--prompt", "x" * 30, "--max-model-len", "32",
                 "--max-tokens", "8"]) == 2
    assert "max_model_len" in capsys.readouterr().err


def test_serve_subprocess():
    pytest.importorskip("uvicorn", reason="the server's packages (flashdsa[serve]) are not installed")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "flashdsa.cli", "serve", "random:tiny", "--port", "0",
                             "--served-model-name", "t"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        assert "serving" in line, line
        url = line.split(" on ")[1].split()[0]
        req = urllib.request.Request(url + "/v1/chat/completions", method="POST",
                                     data=json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 4}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            body = json.loads(r.read())
        assert body["model"] == "t" and body["choices"][0]["message"]["role"] == "assistant"
        assert 1 <= body["usage"]["completion_tokens"] <= 4
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class _Terminal(io.StringIO):
    """stdin as a terminal on which the user typed these lines."""

    def isatty(self):
        return True


def test_generate_says_it_reads_stdin_on_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", _Terminal("def f(x):\n\nimport\n"))
    assert main(["generate", "random:tiny", "--max-tokens", "2", "--ignore-eos", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "reading prompts from stdin" in err
    assert [json.loads(x)["prompt"] for x in out.splitlines()] == ["def f(x):", "import"]


def test_generate_reads_piped_stdin_silently(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("import\n"))
    assert main(["generate", "random:tiny", "--max-tokens", "2", "--ignore-eos"]) == 0
    assert capsys.readouterr().err == ""


def test_generate_without_any_prompt_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert main(["generate", "random:tiny"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "flashdsa generate: error: no prompt: pass --prompt or pipe lines on stdin (--debug shows the traceback)"]
