"""An OpenAI-compatible HTTP server on the standard library only (http.server + threads).

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with ``"stream": true``
for server-sent events), GET /v1/models, GET /health.

Threads: every HTTP connection has its own thread (ThreadingHTTPServer); ONE engine
thread owns the :class:`LLMEngine`: it takes new requests and aborts from an inbox
between steps (continuous batching) and hands each request's outputs to that request's
queue. Limits: prompt length, max_tokens, prompt + max_tokens <= max_model_len,
concurrent requests (429 beyond), body size (413). Bad requests get a 4xx status and an
OpenAI-style ``{"error": {"message": ..., "type": ..., "param": ...}}`` body.
"""
from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .llm import LLMEngine, RequestOutput
from .sampler import SamplingParams


class RequestError(Exception):
    """A bad request: becomes an HTTP error status with an OpenAI-style message."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param

    @property
    def kind(self) -> str:
        return {429: "rate_limit_error", 404: "not_found_error", 405: "invalid_request_error",
                413: "invalid_request_error"}.get(self.status, "invalid_request_error" if self.status < 500
                                                 else "server_error")


@dataclass
class ServerLimits:
    """max_prompt_tokens: longest prompt; max_tokens: largest max_tokens a request may
    ask for; max_concurrent: requests in flight (more get 429); max_body_bytes: request
    body size (413 beyond); default_max_tokens: when the request gives none."""
    max_prompt_tokens: int = 8192
    max_tokens: int = 4096
    max_concurrent: int = 64
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 16


class _Finished:
    """Sentinel put on a request's queue when the engine failed it."""

    def __init__(self, error: str, status: int):
        self.error, self.status = error, status


class EngineLoop:
    """Drives an :class:`LLMEngine` from one background thread (see module docstring)."""

    def __init__(self, engine: LLMEngine, max_concurrent: int = 64):
        self.engine = engine
        self.max_concurrent = max_concurrent
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, queue.Queue] = {}
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._wake = threading.Event()
        self._running = threading.Event()      # cleared by pause() (tests)
        self._running.set()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="flashdsa-engine", daemon=True)
        self.in_flight = 0
        self._lock = threading.Lock()

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        self._running.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def pause(self) -> None:
        """Stop stepping (requests queue up); for tests of the limits."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()
        self._wake.set()

    def submit(self, prompt_ids: list[int], params: SamplingParams, prompt: str | None = None):
        """Queue a request. Returns (request_id, queue of RequestOutput / _Finished);
        raises RequestError(429) when ``max_concurrent`` requests are in flight."""
        if not self._slots.acquire(blocking=False):
            raise RequestError(f"too many concurrent requests (limit {self.max_concurrent}); retry later", 429)
        with self._lock:
            self.in_flight += 1
        rid = uuid.uuid4().hex
        q: queue.Queue = queue.Queue()
        self._streams[rid] = q
        self._inbox.put(("add", rid, prompt_ids, params, prompt))
        self._wake.set()
        return rid, q

    def release(self, request_id: str) -> None:
        """Called by the HTTP thread when it is done with a request (finished or not):
        aborts it in the engine if it still runs and frees its concurrency slot."""
        if self._streams.pop(request_id, None) is not None:
            self._inbox.put(("abort", request_id))
            self._wake.set()
            with self._lock:
                self.in_flight -= 1
            self._slots.release()

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "add":
                _, rid, prompt_ids, params, prompt = msg
                if rid not in self._streams:
                    continue                          # released before it started
                try:
                    self.engine.add_request(prompt_ids, params, request_id=rid, prompt=prompt)
                except ValueError as e:
                    self._streams[rid].put(_Finished(str(e), 400))
            else:
                self.engine.abort_request(msg[1])

    def _loop(self) -> None:
        while not self._stop:
            self._running.wait()
            self._drain_inbox()
            if not self.engine.has_unfinished_requests():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outs = self.engine.step()
            except Exception as e:  # keep serving: fail the requests of this step
                for rid, q in list(self._streams.items()):
                    if rid in self.engine.sequences:
                        self.engine.abort_request(rid)
                        q.put(_Finished(f"engine error: {type(e).__name__}: {e}", 500))
                continue
            for out in outs:
                q = self._streams.get(out.request_id)
                if q is not None:
                    q.put(out)


def _stream_text(text: str, sent: int, finished: bool, stops: list[str]) -> int:
    """How much of ``text`` may be sent now: not a trailing partial UTF-8 character
    (decoded as U+FFFD) and not the last len(stop) - 1 characters, which may turn out to
    start a stop string and be cut."""
    if finished:
        return len(text)
    n = len(text)
    while n > sent and text[n - 1] == "\ufffd":
        n -= 1
    if stops:
        n = min(n, len(text) - max(len(s) for s in stops) + 1)
    return max(n, sent)


class _Handler(BaseHTTPRequestHandler):
    server_version = "flashdsa"
    protocol_version = "HTTP/1.0"  # one request a connection; the end of a stream closes it
    # set on the subclass made by make_server
    loop: EngineLoop
    limits: ServerLimits
    model_name: str

    def log_message(self, fmt, *args):  # quiet; the server is used from tests and the CLI
        pass

    # responses --------------------------------------------------------------------------
    def _send_json(self, status: int, obj) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_error(self, err: RequestError) -> None:
        self._send_json(err.status, {"error": {"message": str(err), "type": err.kind, "param": err.param,
                                               "code": None}})

    def do_GET(self):
        if self.path in ("/health", "/v1/health"):
            self._send_json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [
                {"id": self.model_name, "object": "model", "created": 0, "owned_by": "flashdsa"}]})
        elif self.path in ("/v1/completions", "/v1/chat/completions"):
            self._send_error(RequestError(f"method GET not allowed on {self.path}; use POST", 405))
        else:
            self._send_error(RequestError(f"no such endpoint: {self.path}", 404))

    def do_POST(self):
        try:
            if self.path not in ("/v1/completions", "/v1/chat/completions"):
                raise RequestError(f"no such endpoint: {self.path}", 404)
            body = self._read_json()
            chat = self.path == "/v1/chat/completions"
            prompt, prompt_ids, params, stream = self._parse(body, chat)
            rid, q = self.loop.submit(prompt_ids, params, prompt)
        except RequestError as e:
            self._send_error(e)
            return
        try:
            if stream:
                self._stream(rid, q, chat, len(prompt_ids), params)
            else:
                self._complete(rid, q, chat, len(prompt_ids))
        finally:
            self.loop.release(rid)

    # parsing and validation -------------------------------------------------------------
    def _read_json(self) -> dict:
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise RequestError("Content-Length: not a number")
        if n > self.limits.max_body_bytes:
            raise RequestError(f"request body of {n} bytes exceeds the limit of {self.limits.max_body_bytes}", 413)
        try:
            body = json.loads(self.rfile.read(n) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"body is not valid JSON: {e}")
        if not isinstance(body, dict):
            raise RequestError("body: expected a JSON object")
        return body

    def _parse(self, body: dict, chat: bool):
        lim, tok = self.limits, self.loop.engine.tokenizer
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise RequestError("messages: expected a non-empty list of {role, content} objects", param="messages")
            for i, m in enumerate(msgs):
                if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                        and isinstance(m.get("content"), str)):
                    raise RequestError(f"messages[{i}]: expected {{'role': 'system'|'user'|'assistant', "
                                       "'content': str}", param="messages")
            prompt = tok.apply_chat_template(msgs)
            prompt_ids = tok.encode(prompt)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, str):
                prompt_ids = tok.encode(prompt)
            elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                             for t in prompt):
                prompt_ids, prompt = list(prompt), None
                vocab = self.loop.engine.model_config.vocab_size
                if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
                    raise RequestError(f"prompt: token ids must be in [0, {vocab})", param="prompt")
            else:
                raise RequestError("prompt: expected a string or a list of token ids (one prompt a request)",
                                   param="prompt")
        if not prompt_ids:
            raise RequestError("prompt: empty", param="prompt")
        if len(prompt_ids) > lim.max_prompt_tokens:
            raise RequestError(f"prompt: {len(prompt_ids)} tokens exceeds the limit of {lim.max_prompt_tokens}",
                               param="prompt")

        def number(name, default, lo, hi, integer=False):
            v = body.get(name, default)
            if v is None:
                v = default
            ok = isinstance(v, int) if integer else isinstance(v, (int, float))
            if not ok or isinstance(v, bool) or not lo <= v <= hi:
                kind = "an integer" if integer else "a number"
                raise RequestError(f"{name}: expected {kind} in [{lo}, {hi}], got {v!r}", param=name)
            return v

        max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) if chat else body.get("max_tokens")
        body = dict(body, max_tokens=max_tokens)
        max_tokens = number("max_tokens", lim.default_max_tokens, 1, lim.max_tokens, integer=True)
        if len(prompt_ids) + max_tokens > self.loop.engine.max_model_len:
            raise RequestError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                               f"context of {self.loop.engine.max_model_len} tokens", param="max_tokens")
        temperature = number("temperature", 1.0, 0.0, 2.0)
        top_p = number("top_p", 1.0, 0.0, 1.0)
        if top_p == 0:
            raise RequestError("top_p: expected a number in (0, 1], got 0", param="top_p")
        top_k = number("top_k", 0, -1, 1 << 30, integer=True)
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise RequestError(f"seed: expected an integer, got {seed!r}", param="seed")
        n = body.get("n", 1)
        if n != 1:
            raise RequestError("n: only n = 1 is supported", param="n")
        if body.get("logprobs") not in (None, False, 0) or body.get("echo"):
            raise RequestError("logprobs and echo are not supported", param="logprobs")
        stop = body.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
            raise RequestError("stop: expected a non-empty string or a list of at most 4", param="stop")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(f"stream: expected true or false, got {stream!r}", param="stream")
        ignore_eos = bool(body.get("ignore_eos", False))
        params = SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=max(top_k, 0),
                                seed=seed, max_tokens=max_tokens, stop=stop, ignore_eos=ignore_eos)
        return prompt, prompt_ids, params, stream

    # generation -------------------------------------------------------------------------
    def _next(self, q: queue.Queue):
        item = q.get()
        if isinstance(item, _Finished):
            raise RequestError(item.error, item.status)
        return item

    def _envelope(self, rid: str, chat: bool, stream: bool) -> dict:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
        return {"id": ("chatcmpl-" if chat else "cmpl-") + rid, "object": kind, "created": int(time.time()),
                "model": self.model_name}

    def _complete(self, rid, q, chat: bool, n_prompt: int) -> None:
        try:
            out: RequestOutput = self._next(q)
            while not out.finished:
                out = self._next(q)
        except RequestError as e:
            self._send_error(e)
            return
        choice = {"index": 0, "finish_reason": out.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": out.text}
        else:
            choice.update(text=out.text, logprobs=None)
        resp = self._envelope(rid, chat, False)
        resp.update(choices=[choice], usage={"prompt_tokens": n_prompt, "completion_tokens": len(out.token_ids),
                                            "total_tokens": n_prompt + len(out.token_ids)})
        self._send_json(200, resp)

    def _event(self, obj) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def _stream(self, rid, q, chat: bool, n_prompt: int, params: SamplingParams) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

        def chunk(text: str | None, finish: str | None, role: bool = False) -> dict:
            c = self._envelope(rid, chat, True)
            if chat:
                delta = {"role": "assistant"} if role else ({"content": text} if text else {})
                c["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
            else:
                c["choices"] = [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
            return c

        try:
            if chat:
                self._event(chunk(None, None, role=True))
            sent = 0
            while True:
                try:
                    out = self._next(q)
                except RequestError as e:
                    self._event({"error": {"message": str(e), "type": e.kind, "param": None, "code": None}})
                    break
                n = _stream_text(out.text, sent, out.finished, params.stop)
                if n > sent:
                    self._event(chunk(out.text[sent:n], None))
                    sent = n
                if out.finished:
                    final = chunk(None, out.finish_reason)
                    final["usage"] = {"prompt_tokens": n_prompt, "completion_tokens": len(out.token_ids),
                                      "total_tokens": n_prompt + len(out.token_ids)}
                    self._event(final)
                    break
            self._event("[DONE]")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; release() aborts the request


class _HTTPServer(ThreadingHTTPServer):
    # the default listen backlog (5) resets connections when many clients connect at once
    request_queue_size = 1024
    daemon_threads = True


class ServerHandle:
    """A running server: ``.url``, ``.port``, ``.loop`` (the EngineLoop), ``.shutdown()``."""

    def __init__(self, httpd: ThreadingHTTPServer, loop: EngineLoop, thread: threading.Thread):
        self.httpd, self.loop, self._thread = httpd, loop, thread
        self.host, self.port = httpd.server_address[:2]
        self.url = f"http://{self.host}:{self.port}"

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.loop.stop()
        self._thread.join(timeout=10)


def make_server(engine: LLMEngine, host: str = "127.0.0.1", port: int = 8000, model_name: str = "flashdsa",
                limits: ServerLimits | None = None) -> tuple[ThreadingHTTPServer, EngineLoop]:
    """Build (not start) the HTTP server and its engine loop."""
    limits = limits or ServerLimits()
    loop = EngineLoop(engine, limits.max_concurrent)
    handler = type("Handler", (_Handler,), {"loop": loop, "limits": limits, "model_name": model_name})
    httpd = _HTTPServer((host, port), handler)
    return httpd, loop


def start_server(engine: LLMEngine, host: str = "127.0.0.1", port: int = 0, model_name: str = "flashdsa",
                 limits: ServerLimits | None = None) -> ServerHandle:
    """Start the server in background threads (port 0: a free port); returns a handle."""
    httpd, loop = make_server(engine, host, port, model_name, limits)
    loop.start()
    thread = threading.Thread(target=httpd.serve_forever, name="flashdsa-http", daemon=True)
    thread.start()
    return ServerHandle(httpd, loop, thread)


def serve(engine: LLMEngine, host: str = "127.0.0.1", port: int = 8000, model_name: str = "flashdsa",
          limits: ServerLimits | None = None) -> None:
    """Serve until interrupted (Ctrl-C)."""
    httpd, loop = make_server(engine, host, port, model_name, limits)
    loop.start()
    print(f"flashdsa: serving {model_name} on http://{host}:{httpd.server_address[1]} "
          "(/v1/completions, /v1/chat/completions)", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        loop.stop()
