"""An OpenAI-compatible HTTP server: FastAPI on uvicorn (``pip install "flashdsa[serve]"``).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``"stream": true`` for server-sent events and ``logprobs``; completions with ``echo``),
``GET /v1/models``, ``GET /health``.

Threads: uvicorn's event loop parses HTTP and runs the endpoints; ONE engine thread
(:class:`EngineLoop`) owns the :class:`LLMEngine`: it takes new requests and aborts from
an inbox between steps (continuous batching) and hands each request's outputs to that
request's asyncio queue on the event loop.

Limits (:class:`ServerLimits`): prompt length, ``max_tokens``, prompt + max_tokens <= the
model's context, requests in flight (429 beyond), body size (413), the time a client may
take to send its body (408). Every error status carries an OpenAI error object
``{"error": {"message", "type", "param", "code"}}``, including the 400 that uvicorn
sends for a request it cannot parse (a negative Content-Length, say). uvicorn writes one
access-log line per request to the ``uvicorn.access`` logger (:func:`serve` configures
uvicorn's logging; :func:`start_server` leaves logging to the caller).
"""
from __future__ import annotations

import asyncio
import json
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass

try:
    import h11
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from fastapi.sse import EventSourceResponse, format_sse_event
    from starlette.exceptions import HTTPException
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ModuleNotFoundError as e:
    raise ModuleNotFoundError(f'the server needs {e.name}: pip install "flashdsa[serve]"', name=e.name) from e

from .llm import LLMEngine, RequestOutput
from .sampler import MAX_LOGPROBS, SamplingParams, TokenLogprob, choices_of

_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}


class RequestError(Exception):
    """A failed request: becomes an HTTP error status with an OpenAI error object.

    ``param`` names the offending request field, ``code`` is OpenAI's machine-readable
    code (``"model_not_found"``), ``kind`` overrides the error type derived from the status."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code
        self.kind = kind or _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        # after 408 or 413 the rest of the body may still be on its way: close the connection
        close = {"Connection": "close"} if self.status in (408, 413) else None
        return JSONResponse(self.body(), status_code=self.status, headers=close)


@dataclass
class ServerLimits:
    """Per-request limits of the server.

    max_prompt_tokens: longest prompt; max_tokens: largest ``max_tokens`` a request may
    ask for; max_concurrent: requests in flight (more get 429); max_body_bytes: request
    body size (413 beyond); request_timeout: seconds a client may take to send its body
    (408 beyond: a body shorter than its Content-Length, or one sent too slowly);
    default_max_tokens: when the request gives none; max_n: most choices (``n``) a request
    may ask for (each is a request of the engine and takes one of max_concurrent)."""
    max_prompt_tokens: int = 8192
    max_tokens: int = 4096
    max_concurrent: int = 64
    max_body_bytes: int = 1 << 20
    request_timeout: float = 30.0
    default_max_tokens: int = 16
    max_n: int = 16

    def __post_init__(self):
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"ServerLimits.{name}: expected a positive number, got {value!r}")
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"ServerLimits.default_max_tokens ({self.default_max_tokens}) exceeds "
                             f"max_tokens ({self.max_tokens})")


class _Finished:
    """Put on a request's queue when the engine failed it."""

    def __init__(self, error: str, status: int):
        self.error, self.status = error, status


class EngineLoop:
    """Drives an :class:`LLMEngine` from one background thread (see the module docstring)."""

    def __init__(self, engine: LLMEngine, max_concurrent: int = 64):
        self.engine = engine
        self.max_concurrent = max_concurrent
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._slots = threading.BoundedSemaphore(max_concurrent)
        self._wake = threading.Event()
        self._running = threading.Event()      # cleared by pause() (tests)
        self._running.set()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="flashdsa-engine", daemon=True)
        self.in_flight = 0
        self._lock = threading.Lock()

    def start(self) -> EngineLoop:
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
        """Queue a request from the event loop. Returns (request_id, asyncio.Queue of
        RequestOutput / _Finished); raises RequestError(429) when ``max_concurrent``
        requests are in flight."""
        if not self._slots.acquire(blocking=False):
            raise RequestError(f"too many concurrent requests (limit {self.max_concurrent}); retry later", 429)
        with self._lock:
            self.in_flight += 1
        rid = uuid.uuid4().hex
        q: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), q)
        self._inbox.put(("add", rid, prompt_ids, params, prompt))
        self._wake.set()
        return rid, q

    def release(self, request_id: str) -> None:
        """Called when the endpoint is done with a request (finished, failed or its client
        gone): aborts it in the engine if it still runs and frees its concurrency slot."""
        if self._streams.pop(request_id, None) is not None:
            self._inbox.put(("abort", request_id))
            self._wake.set()
            with self._lock:
                self.in_flight -= 1
            self._slots.release()

    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            aloop, q = target
            try:
                aloop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:        # the event loop has closed (server shutdown)
                pass

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
                    self._deliver(rid, _Finished(str(e), 400))
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
                for rid in list(self._streams):
                    if rid in self.engine.sequences:
                        self.engine.abort_request(rid)
                        self._deliver(rid, _Finished(f"engine error: {type(e).__name__}: {e}", 500))
                continue
            for out in outs:
                self._deliver(out.request_id, out)


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


def _message_text(i: int, content) -> str:
    """A chat message's content: a string, or a list of text parts joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise RequestError(f"messages[{i}].content[{j}]: expected a {{'type': 'text', 'text': str}} part",
                                   param="messages")
            if part.get("type") != "text":
                raise RequestError(f"messages[{i}].content[{j}]: content part type {part.get('type')!r} is not "
                                   "supported; only 'text' parts are", param="messages")
            if not isinstance(part.get("text"), str):
                raise RequestError(f"messages[{i}].content[{j}].text: expected a string", param="messages")
            texts.append(part["text"])
        return "\n".join(texts)
    raise RequestError(f"messages[{i}].content: expected a string or a non-empty list of text parts",
                       param="messages")


# OpenAI request fields this server does not implement, with the values that ask for
# nothing (accepted): any other value is a 400 naming the field
_UNSUPPORTED = {
    "logit_bias": lambda v, n: not v,
    "suffix": lambda v, n: not v,
    "best_of": lambda v, n: v in (None, 1, n),
    "tools": lambda v, n: not v,
    "functions": lambda v, n: not v,
    "tool_choice": lambda v, n: v in (None, "none"),
    "function_call": lambda v, n: v in (None, "none"),
    "response_format": lambda v, n: v in (None, {"type": "text"}),
}


def _parse(body: dict, chat: bool, engine: LLMEngine, lim: ServerLimits):
    """Validate a request body; returns (prompt text or None, prompt ids, SamplingParams,
    stream, echo)."""
    tok = engine.tokenizer
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise RequestError("messages: expected a non-empty list of {role, content} objects", param="messages")
        parsed = []
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and "content" in m):
                raise RequestError(f"messages[{i}]: expected {{'role': 'system'|'user'|'assistant', "
                                   "'content': str or a list of text parts}", param="messages")
            parsed.append({"role": m["role"], "content": _message_text(i, m["content"])})
        try:
            prompt = tok.apply_chat_template(parsed)
        except ValueError as e:   # no chat template
            raise RequestError(str(e), param="messages") from e
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
            vocab = engine.model_config.vocab_size
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

    echo = body.get("echo", False)
    if chat and echo:
        raise RequestError("echo: a completions parameter, not of chat", param="echo")
    if not isinstance(echo, bool):
        raise RequestError(f"echo: expected true or false, got {echo!r}", param="echo")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) if chat else body.get("max_tokens")
    body = dict(body, max_tokens=max_tokens)
    # with echo, max_tokens 0 returns the prompt (and its logprobs) alone
    max_tokens = number("max_tokens", lim.default_max_tokens, 0 if echo else 1, lim.max_tokens, integer=True)
    if len(prompt_ids) + max_tokens > engine.max_model_len:
        raise RequestError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                           f"context of {engine.max_model_len} tokens", param="max_tokens")
    temperature = number("temperature", 1.0, 0.0, 2.0)
    top_p = number("top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise RequestError("top_p: expected a number in (0, 1], got 0", param="top_p")
    top_k = number("top_k", 0, -1, 1 << 30, integer=True)
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise RequestError(f"seed: expected an integer, got {seed!r}", param="seed")
    n = number("n", 1, 1, lim.max_n, integer=True)
    if chat:   # logprobs: true / false; top_logprobs: how many alternatives
        if not isinstance(body.get("logprobs", False), bool):
            raise RequestError(f"logprobs: expected true or false, got {body['logprobs']!r}", param="logprobs")
        if body.get("top_logprobs") is not None and not body.get("logprobs"):
            raise RequestError("top_logprobs: needs logprobs: true", param="top_logprobs")
        logprobs = number("top_logprobs", 0, 0, MAX_LOGPROBS, integer=True) if body.get("logprobs") else None
    else:      # logprobs: how many alternatives (0: the sampled token's only), absent or null: none
        logprobs = None if body.get("logprobs") is None else number("logprobs", 0, 0, MAX_LOGPROBS, integer=True)
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
        raise RequestError("stop: expected a non-empty string or a list of at most 4", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"stream: expected true or false, got {stream!r}", param="stream")
    presence = number("presence_penalty", 0.0, -2.0, 2.0)
    frequency = number("frequency_penalty", 0.0, -2.0, 2.0)
    repetition = number("repetition_penalty", 1.0, 0.0, 10.0)
    if repetition == 0:
        raise RequestError("repetition_penalty: expected a number in (0, 10], got 0", param="repetition_penalty")
    for name, fine in _UNSUPPORTED.items():   # what would change the answer and is not done: refused, not ignored
        if name in body and not fine(body[name], n):
            raise RequestError(f"{name}: not supported by this server (got {body[name]!r})", param=name)
    params = SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=max(top_k, 0),
                            seed=seed, max_tokens=max_tokens, stop=stop, ignore_eos=bool(body.get("ignore_eos")),
                            logprobs=logprobs, prompt_logprobs=logprobs if echo else None,
                            presence_penalty=float(presence), frequency_penalty=float(frequency),
                            repetition_penalty=float(repetition), n=n)
    return prompt, prompt_ids, params, stream, echo


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, 413 as soon as its Content-Length or the bytes received exceed
    ``limit``. (Starlette's RequestBodyLimitMiddleware answers 413 in plain text, not
    with an OpenAI error object.)"""
    too_large = RequestError(f"request body exceeds the limit of {limit} bytes", 413)
    if int(request.headers.get("content-length", 0)) > limit:   # h11 has checked it is a number >= 0
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def _drain(request: Request, seconds: float) -> None:
    """Read and drop what is left of the request body, for at most ``seconds``, before a
    413 is sent (a lingering close): a server that closes the connection while the body
    is still arriving makes its TCP stack answer the unread bytes with a reset, which can
    destroy the 413 before the client reads it."""
    async def discard():
        while True:
            msg = await request.receive()
            if msg["type"] != "http.request" or not msg.get("more_body", False):
                return

    try:
        await asyncio.wait_for(discard(), seconds)
    except asyncio.TimeoutError:
        pass


async def _read_json(request: Request, lim: ServerLimits) -> dict:
    """The request's JSON object, within the body size and time limits (a body over the
    size limit is drained, within the time limit, then answered with 413)."""
    try:
        body = await asyncio.wait_for(_read_body(request, lim.max_body_bytes), lim.request_timeout)
    except asyncio.TimeoutError:
        raise RequestError(f"request body not received within {lim.request_timeout:g} s", 408) from None
    except RequestError as e:
        if e.status == 413:
            await _drain(request, lim.request_timeout)
        raise
    try:
        obj = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise RequestError("body: expected a JSON object")
    return obj


async def _next(q: asyncio.Queue) -> RequestOutput:
    item = await q.get()
    if isinstance(item, _Finished):
        raise RequestError(item.error, item.status)
    return item


def _token_text(tok, token_id: int) -> tuple[str, list[int] | None]:
    """A token's text in the logprobs fields and its bytes: the tokenizer's
    ``token_bytes(id)`` where it has one (bytes that are not whole UTF-8 characters are
    written "bytes:\\xNN...", as the OpenAI API does), else its decoded text."""
    raw = tok.token_bytes(token_id) if hasattr(tok, "token_bytes") else None
    if raw is None:
        text = tok.decode([token_id])
        return text, list(text.encode())
    try:
        return raw.decode("utf-8"), list(raw)
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)


def _chat_logprobs(tok, out: RequestOutput, start: int) -> dict:
    """The logprobs field of a chat choice for the output's tokens start.. (OpenAI's
    ``{"content": [{token, logprob, bytes, top_logprobs}]}``)."""
    def item(token_id: int, logprob: float) -> dict:
        text, raw = _token_text(tok, token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}
    return {"content": [dict(item(lp.token_id, lp.logprob), top_logprobs=[item(i, v) for i, v in lp.top])
                        for lp in out.logprobs[start:]]}


def _text_logprobs(tok, ids: list[int], lps: list, start: int, base: int) -> dict:
    """The logprobs field of a text completion (OpenAI's ``{tokens, token_logprobs,
    top_logprobs, text_offset}``) for tokens ids[start:] with their TokenLogprob ``lps``
    (None for a prompt's first token); text_offset is counted in the text decoded from
    ``ids``, plus ``base``."""
    return {"tokens": [_token_text(tok, t)[0] for t in ids[start:]],
            "token_logprobs": [None if lp is None else lp.logprob for lp in lps[start:]],
            "top_logprobs": [None if lp is None else {_token_text(tok, i)[0]: v for i, v in lp.top}
                             for lp in lps[start:]],
            "text_offset": [base + len(tok.decode(ids[:i])) for i in range(start, len(ids))]}


def _joined(*parts: dict) -> dict:
    """Text-completion logprobs fields of consecutive tokens, as one."""
    return {k: [x for p in parts for x in p[k]] for k in parts[0]}


def _usage(n_prompt: int, outs: list[RequestOutput]) -> dict:
    """The usage of a response of one choice a request output: the prompt counted once
    (its cached tokens: the first choice's), the completions' tokens summed."""
    n = sum(len(out.token_ids) for out in outs)
    return {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n,
            "prompt_tokens_details": {"cached_tokens": outs[0].metrics.get("cached_tokens", 0)}}


def create_app(loop: EngineLoop, model_name: str = "flashdsa", limits: ServerLimits | None = None) -> FastAPI:
    """The ASGI application of the server, on a (started or not) :class:`EngineLoop`.

    Requests may omit ``model``; one that names another model than ``model_name`` gets
    404 ``model_not_found``, as the OpenAI API answers."""
    lim = limits or ServerLimits()
    app = FastAPI(title="flashdsa", description="OpenAI-compatible API of the flashdsa engine",
                  docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = {404: f"no such endpoint: {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                          str(exc.detail))
        return RequestError(message, exc.status_code).response()

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:
        return RequestError(f"internal error: {type(exc).__name__}: {exc}", 500).response()

    def envelope(rid: str, chat: bool, stream: bool) -> dict:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
        return {"id": ("chatcmpl-" if chat else "cmpl-") + rid, "object": kind, "created": int(time.time()),
                "model": model_name}

    tok = loop.engine.tokenizer

    def echoed(out: RequestOutput) -> tuple[str, dict | None]:
        """The prompt's text and its logprobs fields (None without logprobs), for echo."""
        text = out.prompt if out.prompt is not None else tok.decode(out.prompt_token_ids)
        if out.prompt_logprobs is None:
            return text, None
        return text, _text_logprobs(tok, out.prompt_token_ids, out.prompt_logprobs, 0, 0)

    def choice_of(i: int, out: RequestOutput, chat: bool, echo: bool) -> dict:
        """Choice ``i`` of a non-streamed response from its request's final output."""
        choice = {"index": i, "finish_reason": out.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": out.text}
            if out.logprobs is not None:
                choice["logprobs"] = _chat_logprobs(tok, out, 0)
        else:
            head, head_lps = echoed(out) if echo else ("", None)
            choice["text"] = head + out.text
            if out.logprobs is not None:
                lps = _text_logprobs(tok, out.token_ids, out.logprobs, 0, len(head))
                choice["logprobs"] = lps if head_lps is None else _joined(head_lps, lps)
        return choice

    async def complete(subs: list, chat: bool, n_prompt: int, echo: bool) -> JSONResponse:
        outs = []
        try:
            for _, q in subs:
                out = await _next(q)
                while not out.finished:
                    out = await _next(q)
                outs.append(out)
        finally:
            for rid, _ in subs:
                loop.release(rid)
        choices = [choice_of(i, out, chat, echo) for i, out in enumerate(outs)]
        return JSONResponse(dict(envelope(subs[0][0], chat, False), choices=choices, usage=_usage(n_prompt, outs)))

    async def events(subs: list, chat: bool, n_prompt: int, stops: list[str], echo: bool):
        rid = subs[0][0]
        merged: asyncio.Queue = asyncio.Queue()   # (choice index, output or RequestError)

        async def pump(i: int, q: asyncio.Queue) -> None:
            while True:
                try:
                    out = await _next(q)
                except RequestError as e:
                    await merged.put((i, e))
                    return
                await merged.put((i, out))
                if out.finished:
                    return

        @dataclass
        class State:   # a choice's stream so far
            sent: int = 0      # characters of its text sent
            lp_sent: int = 0   # tokens whose logprobs went out: a chunk carries those since the last one
            head: int = 0      # echo: the prompt's text length, which the completion's text offsets follow
            pending: bool = echo   # echo: the prompt's text is still to be sent

        states = [State() for _ in subs]

        def chunk(i: int, text: str | None, finish: str | None, role: bool = False,
                  out: RequestOutput | None = None, lps: dict | None = None) -> dict:
            st = states[i]
            c = envelope(rid, chat, True)
            if out is not None and out.logprobs is not None:
                lps = (_chat_logprobs(tok, out, st.lp_sent) if chat else
                       _text_logprobs(tok, out.token_ids, out.logprobs, st.lp_sent, st.head))
                st.lp_sent = len(out.logprobs)
            if chat:
                delta = {"role": "assistant"} if role else ({"content": text} if text else {})
                c["choices"] = [{"index": i, "delta": delta, "finish_reason": finish, "logprobs": lps}]
            else:
                c["choices"] = [{"index": i, "text": text or "", "finish_reason": finish, "logprobs": lps}]
            return c

        def event(obj) -> bytes:
            return format_sse_event(data_str=json.dumps(obj))

        tasks = [asyncio.ensure_future(pump(i, q)) for i, (_, q) in enumerate(subs)]
        try:
            if chat:
                for i in range(len(subs)):
                    yield event(chunk(i, None, None, role=True))
            finals: dict[int, RequestOutput] = {}
            while len(finals) < len(subs):
                i, out = await merged.get()
                if isinstance(out, RequestError):
                    yield event(out.body())
                    break
                st = states[i]
                if st.pending:   # the prompt first, once it is computed
                    text, lps = echoed(out)
                    st.head, st.pending = len(text), False
                    yield event(chunk(i, text, None, lps=lps))
                n = _stream_text(out.text, st.sent, out.finished, stops)
                if n > st.sent:
                    yield event(chunk(i, out.text[st.sent:n], None, out=out))
                    st.sent = n
                if out.finished:
                    finals[i] = out
                    last = chunk(i, None, out.finish_reason, out=out)
                    if len(finals) == len(subs):   # the usage of all choices, with the last one's end
                        last["usage"] = _usage(n_prompt, [finals[k] for k in sorted(finals)])
                    yield event(last)
            yield format_sse_event(data_str="[DONE]")
        finally:        # also when the client went away: the response task is cancelled
            for t in tasks:
                t.cancel()
            for r, _ in subs:
                loop.release(r)

    async def generate(request: Request, chat: bool):
        body = await _read_json(request, lim)
        model = body.get("model")
        if model is not None and model != model_name:
            raise RequestError(f"The model `{model}` does not exist; this server serves `{model_name}`", 404,
                               param="model", code="model_not_found", kind="invalid_request_error")
        prompt, prompt_ids, params, stream, echo = _parse(body, chat, loop.engine, lim)
        subs = []   # (request id, queue) of each choice
        try:
            for choice in choices_of(params):
                subs.append(loop.submit(prompt_ids, choice, prompt))
        except RequestError:
            for rid, _ in subs:
                loop.release(rid)
            raise
        if stream:
            return EventSourceResponse(events(subs, chat, len(prompt_ids), params.stop, echo),
                                       headers={"Cache-Control": "no-cache"})
        return await complete(subs, chat, len(prompt_ids), echo)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "flashdsa"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app


class _Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol whose 400 for an unparsable request (a negative or
    malformed Content-Length, a bad request line) carries an OpenAI error object and has
    its access-log line, as every other request has."""

    def send_400_response(self, msg: str) -> None:
        if self.access_log:     # the arguments of uvicorn's access-log format; the request line is unknown
            client = "{}:{}".format(*self.client) if self.client else "-"
            self.access_logger.info('%s - "%s %s HTTP/%s" %d', client, "-", "-", "-", 400)
        body = json.dumps(RequestError(f"malformed HTTP request: {msg}").body()).encode()
        event = h11.Response(status_code=400, reason="Bad Request", headers=[
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")])
        for ev in (event, h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(ev))
        self.transport.close()


def _uvicorn(app: FastAPI, host: str, port: int, log_config) -> tuple[uvicorn.Server, socket.socket]:
    config = uvicorn.Config(app, http=_Protocol, lifespan="off", log_config=log_config, timeout_graceful_shutdown=5)
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    return uvicorn.Server(config), sock


class ServerHandle:
    """A server running in background threads: ``.url``, ``.host``, ``.port``, ``.loop``
    (the :class:`EngineLoop`), ``.shutdown()``."""

    def __init__(self, server: uvicorn.Server, sock: socket.socket, loop: EngineLoop, thread: threading.Thread):
        self.server, self.loop, self._thread, self._sock = server, loop, thread, sock
        self.host, self.port = sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"

    def shutdown(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()
        self.loop.stop()


def start_server(engine: LLMEngine, host: str = "127.0.0.1", port: int = 0, model_name: str = "flashdsa",
                 limits: ServerLimits | None = None, startup_timeout: float = 60.0) -> ServerHandle:
    """Start the server in background threads (port 0: a free port) and wait until it
    accepts connections; returns a handle. Logging is left as the caller configured it."""
    limits = limits or ServerLimits()
    loop = EngineLoop(engine, limits.max_concurrent).start()
    server, sock = _uvicorn(create_app(loop, model_name, limits), host, port, log_config=None)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="flashdsa-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            loop.stop()
            sock.close()
            raise RuntimeError(f"the server did not start within {startup_timeout:g} s")
        time.sleep(0.01)
    return ServerHandle(server, sock, loop, thread)


def serve(engine: LLMEngine, host: str = "127.0.0.1", port: int = 8000, model_name: str = "flashdsa",
          limits: ServerLimits | None = None) -> None:
    """Serve until interrupted (Ctrl-C), with uvicorn's logging (access log on stdout)."""
    limits = limits or ServerLimits()
    loop = EngineLoop(engine, limits.max_concurrent).start()
    server, sock = _uvicorn(create_app(loop, model_name, limits), host, port, log_config=uvicorn.config.LOGGING_CONFIG)
    print(f"flashdsa: serving {model_name} on http://{host}:{sock.getsockname()[1]} "
          "(/v1/completions, /v1/chat/completions, /v1/models, /health)", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        loop.stop()
