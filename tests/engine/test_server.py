"""The OpenAI-compatible server through real HTTP clients (urllib and the official
``openai`` client) on 127.0.0.1: completions, chat (string and text-part content),
streaming, logprobs and echo, prefix-cached tokens in usage, the model name checked,
bad requests -> 4xx with an OpenAI error object,
16 concurrent requests, the concurrency limit. Expected texts come from step-by-step
reference decoding of the same tiny model. Raw, malformed HTTP: test_server_http.py."""
import json
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch

from flashdsa.engine import EngineConfig, LLMEngine
from flashdsa.engine.server import ServerLimits, start_server

from .tiny import penalized_greedy, reference_greedy, tiny_hf_tokenizer, tiny_model

LIMITS = ServerLimits(max_prompt_tokens=200, max_tokens=64, max_concurrent=32, max_body_bytes=4096)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=21)


@pytest.fixture(scope="module")
def server(model):
    engine = LLMEngine(model, config=EngineConfig(num_blocks=48, max_num_seqs=16, max_num_batched_tokens=64))
    handle = start_server(engine, limits=LIMITS, model_name="tiny")
    yield handle
    handle.shutdown()


def post(url, body, raw: bytes | None = None, timeout=60):
    """(status, parsed JSON or raw text) of a POST; HTTP errors are returned, not raised."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode()
            ctype = r.headers.get("Content-Type", "")
            return r.status, (json.loads(text) if ctype.startswith("application/json") else text)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


def sse_events(text: str) -> list:
    events = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def expected_text(model, tok, prompt_ids, n):
    return tok.decode(reference_greedy(model, prompt_ids, n))


def test_completion(server, model):
    tok = server.loop.engine.tokenizer
    status, r = post(server.url + "/v1/completions",
                     {"model": "tiny", "prompt": "Hello, DSA!", "max_tokens": 12, "temperature": 0, "ignore_eos": True})
    assert status == 200, r
    assert r["object"] == "text_completion" and r["model"] == "tiny"
    assert r["choices"][0]["text"] == expected_text(model, tok, tok.encode("Hello, DSA!"), 12)
    assert r["choices"][0]["finish_reason"] == "length"
    assert r["usage"] == {"prompt_tokens": 11, "completion_tokens": 12, "total_tokens": 23,
                          "prompt_tokens_details": {"cached_tokens": 0}}
    # a prompt of token ids
    ids = [5, 77, 140, 33, 9]
    status, r = post(server.url + "/v1/completions", {"prompt": ids, "max_tokens": 7, "temperature": 0,
                                                      "ignore_eos": True})
    assert status == 200 and r["choices"][0]["text"] == expected_text(model, tok, ids, 7)


def test_usage_counts_prefix_cached_tokens(server, model):
    """A prompt that repeats the first 128 tokens of an earlier one reports them as
    cached (the OpenAI usage field), and its text is the reference's."""
    tok = server.loop.engine.tokenizer
    first = "The lightning indexer scores every earlier token; the top-k keeps 2048 of them. " * 2
    body = {"max_tokens": 5, "temperature": 0, "ignore_eos": True}
    _, r = post(server.url + "/v1/completions", dict(body, prompt=first + "Once."))
    assert r["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    _, r = post(server.url + "/v1/completions", dict(body, prompt=first + "Twice, then."))
    assert r["usage"]["prompt_tokens"] > 128 and r["usage"]["prompt_tokens_details"] == {"cached_tokens": 128}
    assert r["choices"][0]["text"] == expected_text(model, tok, tok.encode(first + "Twice, then."), 5)


def test_logprobs_completions_and_chat(server, model):
    """logprobs of text completions (token_logprobs = the model's log-softmax at each step,
    to fp32 rounding; top_logprobs most likely first; text_offset into the text) and of
    chat (top_logprobs alternatives), the same streamed (the chunks' entries joined) as
    not; the openai client parses both."""
    tok = server.loop.engine.tokenizer
    ids = tok.encode("Hello, DSA!")
    body = {"prompt": "Hello, DSA!", "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    _, r = post(server.url + "/v1/completions", body)
    lp = r["choices"][0]["logprobs"]
    want = reference_greedy(model, ids, 6)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor(ids + want[:2]), backend="reference").logits[-3:].double(), -1)
    for i in range(3):
        assert abs(lp["token_logprobs"][i] - float(ref[i, want[i]])) < 2e-6
        top = list(lp["top_logprobs"][i].values())
        assert len(top) == 2 and top[0] >= top[1] and abs(top[0] - lp["token_logprobs"][i]) < 1e-9   # greedy
    assert lp["text_offset"] == [len(tok.decode(want[:i])) for i in range(6)]
    _, s = post(server.url + "/v1/completions", dict(body, stream=True))
    parts = [e["choices"][0]["logprobs"] for e in sse_events(s) if e["choices"][0]["logprobs"]]
    assert {k: [x for p in parts for x in p[k]] for k in lp} == lp

    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0,
            "ignore_eos": True, "logprobs": True, "top_logprobs": 3}
    _, r = post(server.url + "/v1/chat/completions", chat)
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == 5 and all(len(c["top_logprobs"]) == 3 for c in content)
    assert all(c["top_logprobs"][0]["logprob"] == c["logprob"] and isinstance(c["bytes"], list) for c in content)
    _, s = post(server.url + "/v1/chat/completions", dict(chat, stream=True))
    assert [c for e in sse_events(s) if e["choices"][0]["logprobs"]
            for c in e["choices"][0]["logprobs"]["content"]] == content
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    got = client.chat.completions.create(model="tiny", **{k: v for k, v in chat.items() if k != "ignore_eos"},
                                         extra_body={"ignore_eos": True})
    assert [c.logprob for c in got.choices[0].logprobs.content] == [c["logprob"] for c in content]
    _, r = post(server.url + "/v1/completions", dict(body, logprobs=None))
    assert r["choices"][0]["logprobs"] is None


def test_echo_scores_the_prompt(server, model):
    """echo (what evaluation harnesses send to score a text): the prompt's text before the
    completion, and with logprobs its tokens' log-probabilities under the model (None for
    the first), top_logprobs and text offsets, then the completion's; max_tokens 0 scores
    the prompt alone; streamed, the same fields joined."""
    tok = server.loop.engine.tokenizer
    prompt = "Sparse attention keeps the top 2048 tokens of every query."
    ids = tok.encode(prompt)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor(ids), backend="reference").logits.double(), -1)
    body = {"prompt": prompt, "max_tokens": 0, "temperature": 0, "echo": True, "logprobs": 1}
    _, r = post(server.url + "/v1/completions", body)
    c = r["choices"][0]
    lp = c["logprobs"]
    assert c["text"] == prompt and c["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 0
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(abs(lp["token_logprobs"][i] - float(ref[i - 1, ids[i]])) < 2e-6 for i in range(1, len(ids)))
    assert all(len(t) == 1 for t in lp["top_logprobs"][1:])
    assert lp["text_offset"] == [len(tok.decode(ids[:i])) for i in range(len(ids))]
    _, r = post(server.url + "/v1/completions", dict(body, max_tokens=3, ignore_eos=True))
    c = r["choices"][0]
    want = reference_greedy(model, ids, 3)
    assert c["text"] == prompt + tok.decode(want) and len(c["logprobs"]["tokens"]) == len(ids) + 3
    assert c["logprobs"]["text_offset"][len(ids):] == [len(prompt) + len(tok.decode(want[:i])) for i in range(3)]
    assert c["logprobs"]["token_logprobs"][:len(ids)] == lp["token_logprobs"]
    _, s = post(server.url + "/v1/completions", dict(body, max_tokens=3, ignore_eos=True, stream=True))
    events = sse_events(s)
    assert "".join(e["choices"][0]["text"] for e in events) == c["text"]
    parts = [e["choices"][0]["logprobs"] for e in events if e["choices"][0]["logprobs"]]
    assert {k: [x for p in parts for x in p[k]] for k in c["logprobs"]} == c["logprobs"]
    _, r = post(server.url + "/v1/completions", dict(body, logprobs=None))
    assert r["choices"][0]["text"] == prompt and r["choices"][0]["logprobs"] is None


def test_n_choices(server, model):
    """n: n choices, choice i sampled as a request of seed + i alone would be (greedy: all
    the reference's), the completion tokens summed in usage; streamed, each choice's
    chunks carry its index and join to its text; the openai client reads them."""
    tok = server.loop.engine.tokenizer
    body = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0.9, "seed": 5, "ignore_eos": True}
    _, r = post(server.url + "/v1/completions", dict(body, n=3))
    texts = [c["text"] for c in r["choices"]]
    assert [c["index"] for c in r["choices"]] == [0, 1, 2] and len(set(texts)) > 1
    for i in range(3):
        _, one = post(server.url + "/v1/completions", dict(body, seed=5 + i))
        assert one["choices"][0]["text"] == texts[i]
    assert r["usage"]["completion_tokens"] == 18 and r["usage"]["prompt_tokens"] == len(tok.encode(body["prompt"]))
    _, s = post(server.url + "/v1/completions", dict(body, n=3, stream=True))
    events = sse_events(s)
    assert ["".join(e["choices"][0]["text"] for e in events if e["choices"][0]["index"] == i)
            for i in range(3)] == texts
    assert sum("usage" in e for e in events) == 1 and events[-1]["usage"]["completion_tokens"] == 18
    greedy = dict(body, temperature=0, n=2)
    _, r = post(server.url + "/v1/completions", greedy)
    want = expected_text(model, tok, tok.encode(body["prompt"]), 6)
    assert [c["text"] for c in r["choices"]] == [want, want]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    got = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=2,
                                         max_tokens=3, temperature=0)
    assert [c.index for c in got.choices] == [0, 1]
    assert got.choices[0].message.content == got.choices[1].message.content
    assert server.loop.in_flight == 0


def test_penalties(server, model):
    """presence, frequency and repetition penalties reach the sampler (the tokens of
    greedy decoding with the penalties written out); fields asking for nothing (an empty
    logit_bias, tool_choice "none", a text response_format) are accepted."""
    tok = server.loop.engine.tokenizer
    body = {"prompt": "abcabcabc", "max_tokens": 8, "temperature": 0, "ignore_eos": True, "presence_penalty": 1.2,
            "frequency_penalty": 0.4, "repetition_penalty": 1.3, "logit_bias": {}}
    _, r = post(server.url + "/v1/completions", body)
    want = penalized_greedy(model, tok.encode("abcabcabc"), 8, presence=1.2, frequency=0.4, repetition=1.3)
    assert r["choices"][0]["text"] == tok.decode(want)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "tool_choice": "none",
            "response_format": {"type": "text"}}
    assert post(server.url + "/v1/chat/completions", chat)[0] == 200


def test_chat(server, model):
    tok = server.loop.engine.tokenizer
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is sparse attention?"}]
    status, r = post(server.url + "/v1/chat/completions",
                     {"messages": msgs, "max_tokens": 10, "temperature": 0, "ignore_eos": True})
    assert status == 200, r
    assert r["object"] == "chat.completion"
    msg = r["choices"][0]["message"]
    assert msg["role"] == "assistant"
    assert msg["content"] == expected_text(model, tok, tok.encode(tok.apply_chat_template(msgs)), 10)


def test_streaming_completion_and_chat(server):
    body = {"prompt": "stream me", "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    _, full = post(server.url + "/v1/completions", body)
    status, text = post(server.url + "/v1/completions", dict(body, stream=True))
    assert status == 200
    events = sse_events(text)
    assert len(events) >= 2                      # streamed in pieces, not one blob
    assert "".join(e["choices"][0]["text"] for e in events) == full["choices"][0]["text"]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])

    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 15, "temperature": 0, "ignore_eos": True}
    _, full = post(server.url + "/v1/chat/completions", chat)
    status, text = post(server.url + "/v1/chat/completions", dict(chat, stream=True))
    events = sse_events(text)
    assert events[0]["object"] == "chat.completion.chunk"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant"}
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert content == full["choices"][0]["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_string_streaming_matches(server, model):
    tok = server.loop.engine.tokenizer
    prompt = "abcabc"
    text = expected_text(model, tok, tok.encode(prompt), 30)
    stop = text[10:12]
    cut = text[:text.find(stop)]
    body = {"prompt": prompt, "max_tokens": 30, "temperature": 0, "ignore_eos": True, "stop": stop}
    _, r = post(server.url + "/v1/completions", body)
    assert r["choices"][0]["text"] == cut and r["choices"][0]["finish_reason"] == "stop"
    _, s = post(server.url + "/v1/completions", dict(body, stream=True))
    assert "".join(e["choices"][0]["text"] for e in sse_events(s)) == cut


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1.5, 2]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [5, 9999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x" * 201}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 65}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 17}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": []}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, 400,
     "messages"),
    ("/v1/completions", {"prompt": "hi", "echo": "yes"}, 400, "echo"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "echo": True}, 400, "echo"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": True}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": 2}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": -1}, 400, "top_logprobs"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     400, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("/v1/nothing", {"prompt": "hi"}, 404, None),
])
def test_bad_requests(server, path, body, status, param):
    got, r = post(server.url + path, body)
    assert got == status, r
    assert isinstance(r["error"]["message"], str) and r["error"]["message"]
    assert set(r["error"]) == {"message", "type", "param", "code"}
    assert r["error"]["param"] == param


def test_malformed_and_oversized_bodies(server):
    got, r = post(server.url + "/v1/completions", None, raw=b"{not json")
    assert got == 400 and "JSON" in r["error"]["message"]
    got, r = post(server.url + "/v1/completions", None, raw=b"[1, 2]")
    assert got == 400 and "object" in r["error"]["message"]
    got, r = post(server.url + "/v1/completions", {"prompt": "x" * 5000})
    assert got == 413 and "limit" in r["error"]["message"]
    try:
        urllib.request.urlopen(server.url + "/v1/completions", timeout=10)
        raise AssertionError("GET on a POST endpoint must fail")
    except urllib.error.HTTPError as e:
        assert e.code == 405
    with urllib.request.urlopen(server.url + "/v1/models", timeout=10) as r:
        assert json.loads(r.read())["data"][0]["id"] == "tiny"


def test_16_concurrent_requests(server, model):
    tok = server.loop.engine.tokenizer
    prompts = [f"request number {i}: " + "xyz"[i % 3] * (i * 5) for i in range(16)]
    results = [None] * 16

    def run(i):
        body = {"prompt": prompts[i], "max_tokens": 12, "temperature": 0, "ignore_eos": True, "stream": i % 2 == 1}
        results[i] = post(server.url + "/v1/completions", body)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for i, (status, r) in enumerate(results):
        assert status == 200, (i, r)
        text = (r["choices"][0]["text"] if i % 2 == 0
                else "".join(e["choices"][0]["text"] for e in sse_events(r)))
        assert text == expected_text(model, tok, tok.encode(prompts[i]), 12), i
    assert server.loop.in_flight == 0


def test_hugging_face_tokenizer(model):
    """A server over a Hugging Face tokenizer: chat through its template, logprobs with the
    tokens' bytes from the byte-level BPE (joined: the completion's UTF-8 text)."""
    from flashdsa.engine.tokenizer import HFTokenizer
    tok = HFTokenizer(tiny_hf_tokenizer())
    engine = LLMEngine(model, tok, config=EngineConfig(num_blocks=8))
    handle = start_server(engine, limits=LIMITS, model_name="tiny")
    try:
        _, r = post(handle.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}],
                                                          "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                                                          "logprobs": True})
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hello"}]))
        want = reference_greedy(model, ids, 6)
        content = r["choices"][0]["logprobs"]["content"]
        assert r["choices"][0]["message"]["content"] == tok.decode(want)
        assert b"".join(bytes(c["bytes"]) for c in content) == b"".join(tok.token_bytes(t) for t in want)
        assert r["usage"]["prompt_tokens"] == len(ids)
    finally:
        handle.shutdown()


def test_concurrency_limit_gives_429(model):
    engine = LLMEngine(model, config=EngineConfig(num_blocks=8))
    handle = start_server(engine, limits=ServerLimits(max_concurrent=1))
    try:
        handle.loop.pause()                      # the first request cannot finish yet
        first = {}
        t = threading.Thread(target=lambda: first.update(r=post(handle.url + "/v1/completions",
                                                                {"prompt": "a", "max_tokens": 3})))
        t.start()
        deadline = time.time() + 30
        while handle.loop.in_flight < 1 and time.time() < deadline:
            time.sleep(0.01)
        status, r = post(handle.url + "/v1/completions", {"prompt": "b", "max_tokens": 3})
        assert status == 429 and "concurrent" in r["error"]["message"]
        handle.loop.resume()
        t.join(timeout=60)
        assert first["r"][0] == 200
        status, r = post(handle.url + "/v1/completions", {"prompt": "b", "max_tokens": 3, "n": 2})
        assert status == 429 and handle.loop.in_flight == 0   # n choices take n slots; none is kept
        assert post(handle.url + "/v1/completions", {"prompt": "c", "max_tokens": 2})[0] == 200
    finally:
        handle.loop.resume()
        handle.shutdown()


@pytest.mark.parametrize("n", [1, 3])
def test_client_disconnect_aborts_request(server, n):
    """A streaming client that goes away: its request (every choice of it) is released at
    once and aborted in the engine (a choice the engine had not taken yet is dropped
    instead: the engine thread was paused after the first token)."""
    import http.client
    engine = server.loop.engine
    aborted = []
    abort = engine.abort_request
    engine.abort_request = lambda rid: (aborted.append(rid) if rid in engine.sequences else None, abort(rid))
    try:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps(
            {"prompt": "abc", "max_tokens": 64, "temperature": 0, "ignore_eos": True, "stream": True, "n": n}),
            {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.readline().startswith(b"data: ")   # the first token: the request runs in the engine
        server.loop.pause()                  # at most one more step until the client has left
        resp.close()
        conn.close()
        deadline = time.time() + 30
        while server.loop.in_flight and time.time() < deadline:
            time.sleep(0.01)                 # the server saw the disconnect and released the request
        assert server.loop.in_flight == 0
        server.loop.resume()
        while engine.has_unfinished_requests() and time.time() < deadline:
            time.sleep(0.01)                 # then the engine thread aborts it
        assert 1 <= len(aborted) <= n and not engine.has_unfinished_requests() and not engine.sequences
    finally:
        server.loop.resume()
        engine.abort_request = abort


def test_limits_are_checked():
    with pytest.raises(ValueError, match="request_timeout"):
        ServerLimits(request_timeout=0)
    with pytest.raises(ValueError, match="max_body_bytes"):
        ServerLimits(max_body_bytes=-1)
    with pytest.raises(ValueError, match="default_max_tokens"):
        ServerLimits(max_tokens=8)


def test_serve_without_the_extra_says_how_to_install(monkeypatch, capsys):
    import sys

    from flashdsa.cli import main
    monkeypatch.delitem(sys.modules, "flashdsa.engine.server")
    monkeypatch.setitem(sys.modules, "fastapi", None)        # as if FastAPI were not installed
    assert main(["serve", "random:tiny"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and 'pip install "flashdsa[serve]"' in err[0] and "fastapi" in err[0]


def test_internal_error_is_an_error_object(server, monkeypatch):
    def broken(text):
        raise RuntimeError("tokenizer exploded")
    monkeypatch.setattr(server.loop.engine.tokenizer, "encode", broken)
    status, r = post(server.url + "/v1/completions", {"prompt": "hi"})
    assert status == 500 and r["error"]["type"] == "server_error" and "tokenizer exploded" in r["error"]["message"]
    monkeypatch.undo()
    assert post(server.url + "/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=60, max_retries=0)


def test_openai_client(server, model):
    tok, c = server.loop.engine.tokenizer, client(server)
    want = expected_text(model, tok, tok.encode("Hello, DSA!"), 12)
    r = c.completions.create(model="tiny", prompt="Hello, DSA!", max_tokens=12, temperature=0,
                             extra_body={"ignore_eos": True})
    assert r.model == "tiny" and r.choices[0].text == want and r.usage.completion_tokens == 12
    chunks = list(c.completions.create(model="tiny", prompt="Hello, DSA!", max_tokens=12, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True}))
    assert len(chunks) >= 2 and "".join(ch.choices[0].text for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"

    msgs = [{"role": "user", "content": "what is sparse attention?"}]
    want = expected_text(model, tok, tok.encode(tok.apply_chat_template(msgs)), 10)
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    stream = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == want

    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert e.value.code == "model_not_found" and "gpt-4" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/cat.png"}}]}])
    assert "'image_url'" in e.value.message and e.value.param == "messages"
    assert [m.id for m in c.models.list()] == ["tiny"]


def test_chat_content_as_text_parts(server):
    """A list of text parts is the string of their texts joined by newlines."""
    body = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}
    parts = [{"type": "text", "text": "what is"}, {"type": "text", "text": "sparse attention?"}]
    _, as_parts = post(server.url + "/v1/chat/completions",
                       dict(body, messages=[{"role": "user", "content": parts}]))
    _, as_string = post(server.url + "/v1/chat/completions",
                        dict(body, messages=[{"role": "user", "content": "what is\nsparse attention?"}]))
    assert as_parts["choices"][0]["message"]["content"] == as_string["choices"][0]["message"]["content"]
    assert as_parts["usage"] == as_string["usage"]


def test_health(server):
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        assert r.status == 200 and json.loads(r.read()) == {"status": "ok"}
