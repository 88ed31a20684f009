"""The OpenAI-compatible server through a real HTTP client (urllib) on 127.0.0.1:
completions, chat, streaming, bad requests -> 4xx with a message, 16 concurrent
requests, the concurrency limit. Expected texts come from step-by-step reference
decoding of the same tiny model."""
import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from flashdsa.engine import EngineConfig, LLMEngine
from flashdsa.engine.server import ServerLimits, start_server

from .tiny import reference_greedy, tiny_model

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
    assert r["usage"] == {"prompt_tokens": 11, "completion_tokens": 12, "total_tokens": 23}
    # a prompt of token ids
    ids = [5, 77, 140, 33, 9]
    status, r = post(server.url + "/v1/completions", {"prompt": ids, "max_tokens": 7, "temperature": 0,
                                                      "ignore_eos": True})
    assert status == 200 and r["choices"][0]["text"] == expected_text(model, tok, ids, 7)


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
    ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages"),
    ("/v1/nothing", {"prompt": "hi"}, 404, None),
])
def test_bad_requests(server, path, body, status, param):
    got, r = post(server.url + path, body)
    assert got == status, r
    assert isinstance(r["error"]["message"], str) and r["error"]["message"]
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
        assert post(handle.url + "/v1/completions", {"prompt": "c", "max_tokens": 2})[0] == 200
    finally:
        handle.loop.resume()
        handle.shutdown()


def test_client_disconnect_aborts_request(server):
    import http.client
    engine = server.loop.engine
    aborted = []
    abort = engine.abort_request
    engine.abort_request = lambda rid: (aborted.append(rid) if rid in engine.sequences else None, abort(rid))
    try:
        server.loop.pause()                  # nothing is generated until the client has left
        conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps(
            {"prompt": "abc", "max_tokens": 64, "temperature": 0, "ignore_eos": True, "stream": True}),
            {"Content-Type": "application/json"})
        resp = conn.getresponse()            # the stream's headers come before any token
        assert resp.status == 200
        resp.close()                         # the response owns the socket (HTTP/1.0)
        conn.close()
        server.loop.resume()
        deadline = time.time() + 30
        while (server.loop.in_flight or engine.has_unfinished_requests()) and time.time() < deadline:
            time.sleep(0.01)     # release() frees the slot, then the engine thread aborts
        assert server.loop.in_flight == 0
        assert len(aborted) == 1 and not engine.has_unfinished_requests()
    finally:
        server.loop.resume()
        engine.abort_request = abort
