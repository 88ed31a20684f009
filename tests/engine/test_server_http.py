"""The server against raw, malformed and abusive HTTP over sockets: negative and lying
Content-Length, a slow body, 10 MB bodies, 100 concurrent clients. Each request gets a
status code with an OpenAI error object and one access-log line; nothing hangs (every
socket operation has a timeout); the server answers /health afterwards."""
import http.client
import json
import logging
import socket
import threading
import time

import pytest

from flashdsa.engine import EngineConfig, LLMEngine
from flashdsa.engine.server import ServerLimits, start_server

from .tiny import tiny_model

TIMEOUT = 1.0        # the server's request_timeout: seconds to receive a body
LIMITS = ServerLimits(max_prompt_tokens=200, max_tokens=16, max_concurrent=8, max_body_bytes=1 << 20,
                      request_timeout=TIMEOUT)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def access_log():
    logger, handler, level = logging.getLogger("uvicorn.access"), _Records(), logging.getLogger("uvicorn.access").level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(scope="module")
def server(access_log):
    engine = LLMEngine(tiny_model(seed=3), config=EngineConfig(num_blocks=32, max_num_seqs=8,
                                                               max_num_batched_tokens=64))
    handle = start_server(engine, limits=LIMITS, model_name="tiny")
    yield handle
    handle.shutdown()


def connect(server, timeout=30.0) -> socket.socket:
    return socket.create_connection((server.host, server.port), timeout=timeout)


def read_response(sock: socket.socket) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of one response read from ``sock`` (its timeout applies)."""
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    return resp.status, dict(resp.getheaders()), json.loads(resp.read())


def head(path: str, length: int | str, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode()


def assert_error(status, body, want):
    assert status == want, body
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]


def get(server, path="/health"):
    with connect(server) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        return read_response(s)


def test_negative_content_length(server, access_log):
    n = len(access_log.records)
    with connect(server) as s:
        s.sendall(head("/v1/completions", -5) + b'{"prompt": "hi"}')
        status, headers, body = read_response(s)
    assert_error(status, body, 400)
    assert headers["connection"] == "close"
    assert len(access_log.records) == n + 1 and access_log.records[-1].args[-1] == 400


def test_lying_content_length_times_out(server):
    t0 = time.monotonic()
    with connect(server) as s:
        s.sendall(head("/v1/completions", 100) + b'{"prompt": "hi"}')      # 16 of 100 bytes, then silence
        status, headers, body = read_response(s)
        assert headers["connection"] == "close"
        assert s.recv(1) == b""                                             # and the server closed it
    assert_error(status, body, 408)
    assert time.monotonic() - t0 < TIMEOUT + 10


def test_slow_body_times_out(server):
    payload = json.dumps({"prompt": "hi" * 40, "max_tokens": 2}).encode()
    t0 = time.monotonic()
    with connect(server) as s:
        s.sendall(head("/v1/completions", len(payload)))
        s.settimeout(0.2)
        for byte in payload:                     # one byte every 0.2 s: the body would take 17 s
            try:
                s.sendall(bytes([byte]))
                if s.recv(1, socket.MSG_PEEK):
                    break                        # the server has answered
            except TimeoutError:
                continue
            except OSError:                      # the server closed the connection
                break
        s.settimeout(30)
        status, _, body = read_response(s)
    assert_error(status, body, 408)
    assert time.monotonic() - t0 < TIMEOUT + 10


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:          # the server answered 413 and closed while we were still sending
        pass


@pytest.mark.parametrize("chunked", [False, True])
def test_10mb_body(server, chunked):
    body = b'{"prompt": "' + b"x" * (10 << 20) + b'"}'
    with connect(server) as s:
        if chunked:
            data = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 65536]), body[i:i + 65536])
                               for i in range(0, len(body), 65536)) + b"0\r\n\r\n")
        else:
            data = head("/v1/completions", len(body)) + body
        sender = threading.Thread(target=_send_quietly, args=(s, data), daemon=True)
        sender.start()
        status, headers, r = read_response(s)
        sender.join(timeout=30)
    assert_error(status, r, 413)
    assert "limit" in r["error"]["message"] and headers["connection"] == "close"


def test_100_concurrent_clients(server, access_log):
    n_log = len(access_log.records)
    payload = json.dumps({"prompt": "concurrent", "max_tokens": 2, "temperature": 0, "ignore_eos": True}).encode()
    statuses: list = [None] * 100
    barrier = threading.Barrier(100, timeout=60)

    def client(i):
        try:
            with connect(server, timeout=60) as s:
                barrier.wait()
                s.sendall(head("/v1/completions", len(payload), "Connection: close\r\n") + payload)
                statuses[i] = read_response(s)[0]
        except Exception as e:     # reported below with the index
            statuses[i] = repr(e)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert all(s in (200, 429) for s in statuses), statuses
    assert statuses.count(200) >= 1
    assert get(server)[0] == 200
    deadline = time.monotonic() + 30
    while server.loop.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.loop.in_flight == 0
    assert len(access_log.records) == n_log + 101          # one line per request, /health included


def test_access_log_one_line_per_request(server, access_log):
    n = len(access_log.records)
    assert get(server)[0] == 200
    assert get(server, "/v1/models")[2]["data"][0]["id"] == "tiny"
    status, _, body = get(server, "/nowhere")
    assert_error(status, body, 404)
    lines = [r.getMessage() for r in access_log.records[n:]]
    assert len(lines) == 3, lines
    assert ['"GET /health HTTP/1.1" 200' in lines[0], '"GET /v1/models HTTP/1.1" 200' in lines[1],
            '"GET /nowhere HTTP/1.1" 404' in lines[2]] == [True] * 3, lines


def test_serve_command_flags_and_access_log():
    """`flashdsa serve` passes --max-body-bytes and --request-timeout to the server, and
    logs one access line per request on stdout."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "flashdsa", "serve", "random:tiny", "--port", "0",
                             "--max-body-bytes", "100", "--request-timeout", "0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=root)
    try:
        line = proc.stdout.readline()
        assert "serving" in line, line
        host, port = line.split("http://")[1].split()[0].rsplit(":", 1)
        addr = type("Addr", (), {"host": host, "port": int(port)})
        with connect(addr) as s:
            s.sendall(head("/v1/completions", 200) + b"x" * 200)
            assert read_response(s)[0] == 413
        with connect(addr) as s:
            s.sendall(head("/v1/completions", 50) + b"{")
            assert read_response(s)[0] == 408
    finally:
        proc.terminate()
        log = [x for x in proc.communicate(timeout=30)[0].splitlines() if "HTTP/1.1" in x]
    assert len(log) == 2, log
    assert '"POST /v1/completions HTTP/1.1" 413' in log[0] and '"POST /v1/completions HTTP/1.1" 408' in log[1]
