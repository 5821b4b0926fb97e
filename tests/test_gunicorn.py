"""passthru under real gunicorn (deploy/gunicorn.conf.py): streaming, memory, disconnects, errors, secrets.

Each test talks to gunicorn over real sockets, with http.client or raw bytes, so what is checked is what a
client on the wire sees: event spacing, framing, resets, repeated header lines.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import json
import secrets
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from typing import Any

import pytest
from conftest import Gunicorn, start_gunicorn, write_config
from upstream import GZIP_TEXT, Upstream, pattern_bytes, pattern_sha256, start_upstream, wait_until
from wire import memory_kib, workers

MiB = 1 << 20


# ------------------------------------------------------------------------------------------------------------
# helpers


def _port(server: Gunicorn) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _conn(server: Gunicorn, timeout: float = 10) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", _port(server), timeout=timeout)


def _get(server: Gunicorn, target: str, headers: dict[str, str] | None = None, method: str = "GET",
         body: Any = None) -> tuple[http.client.HTTPResponse, bytes]:  # fmt: skip
    """One request on a fresh connection, read whole (small answers only)."""
    with closing(_conn(server)) as conn:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp, resp.read()


def _raw(server: Gunicorn, request: bytes, timeout: float = 10) -> tuple[list[bytes], bytes]:
    """Send exact bytes and read until the server closes (a timeout fails the test): (header lines, body)."""
    data = b""
    with closing(socket.create_connection(("127.0.0.1", _port(server)), timeout=timeout)) as sock:
        sock.sendall(request)
        while len(data) < MiB:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no end of headers in {data[:500]!r}"
    return head.split(b"\r\n"), body


def _header_lines(lines: list[bytes], name: str) -> list[bytes]:
    prefix = name.lower().encode() + b":"
    return [line for line in lines[1:] if line.lower().startswith(prefix)]


def _pattern_upload(size: int, piece: int = MiB) -> Iterator[bytes]:
    """size bytes of the upstream's 0..255 pattern, a piece at a time (piece is a multiple of 256)."""
    block = pattern_bytes(piece)
    for off in range(0, size, piece):
        yield block[: min(piece, size - off)]


def _entry(path: str, target: str, **fields: Any) -> dict[str, Any]:
    return {"path": path, "target": target, **fields}


# ------------------------------------------------------------------------------------------------------------
# one gunicorn for the tests that only read answers


@pytest.fixture(scope="module")
def shared(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    """One gunicorn worker with a route per upstream behaviour; its log is checked by several tests."""
    directory = tmp_path_factory.mktemp("shared")
    # Bound but never listening: connecting gets a refusal, and no later free_port() can hand the port out.
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    entries = [
        _entry("/sse", f"{upstream.url}/sse", timeout=10),
        _entry("/reset", f"{upstream.url}/reset", timeout=10),
        _entry("/stall", f"{upstream.url}/stall", timeout=1),
        _entry("/malformed", f"{upstream.url}/malformed", timeout=10),
        _entry("/refused", f"http://127.0.0.1:{closed.getsockname()[1]}/refused", timeout=10),
        _entry("/cookies", f"{upstream.url}/cookies"),
        _entry("/gzip", f"{upstream.url}/gzip"),
        _entry("/status", f"{upstream.url}/status", include_subpath=True),
        _entry("/echo", f"{upstream.url}/echo"),
    ]
    try:
        server = start_gunicorn(write_config(directory, entries), directory / "gunicorn.log")
        try:
            yield server
        finally:
            server.stop()
    finally:
        closed.close()


# ------------------------------------------------------------------------------------------------------------
# 1. Server-Sent Events arrive event by event


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_sse_events_arrive_one_by_one(shared: Gunicorn, framing: str) -> None:
    arrivals: list[float] = []
    events: list[bytes] = []
    with closing(_conn(shared)) as conn:
        conn.request("GET", f"/sse?n=5&gap=0.3&framing={framing}")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
        for _ in range(100):  # 5 events and their blank lines; bounded in case the stream misbehaves
            line = resp.readline()
            if not line:
                break
            if line.startswith(b"data:"):
                arrivals.append(time.monotonic())
                events.append(line)
    assert events == [f"data: {i}\n".encode() for i in range(5)]
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:], strict=False)]
    assert all(gap >= 0.15 for gap in gaps), gaps  # upstream spaces them 0.3 s apart: none bunched up
    assert arrivals[-1] - arrivals[0] >= 0.8


# ------------------------------------------------------------------------------------------------------------
# 2. Large bodies stream through one worker without growing it


@pytest.mark.slow
def test_200mib_both_ways_integrity_and_flat_worker_memory(upstream: Upstream, gunicorn: Any) -> None:
    size = 200 * MiB
    server = gunicorn([_entry("/bytes", f"{upstream.url}/bytes", timeout=60),
                       _entry("/upload", f"{upstream.url}/echo", timeout=60)])  # fmt: skip
    # Warm the worker up (imports, the pool, one of each kind of exchange) before taking the baseline.
    assert _get(server, "/bytes?size=1000")[1] == pattern_bytes(1000)
    assert _get(server, "/upload", {"Content-Length": "3"}, "POST", b"abc")[0].status == 200
    (worker,) = workers(server, 1)
    before = memory_kib(worker)

    with closing(_conn(server, timeout=60)) as conn:
        conn.request("GET", f"/bytes?size={size}")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Length") == str(size)
        digest, got = hashlib.sha256(), 0
        while piece := resp.read(MiB):
            digest.update(piece)
            got += len(piece)
    assert got == size and digest.hexdigest() == pattern_sha256(size)

    for headers in ({"Content-Length": str(size)}, {}):  # known length, then chunked (http.client's default)
        with closing(_conn(server, timeout=60)) as conn:
            conn.request("POST", "/upload", body=_pattern_upload(size), headers=headers)
            resp = conn.getresponse()
            echo = json.loads(resp.read())
        assert resp.status == 200
        sent = dict((k.lower(), v) for k, v in echo["headers"])
        if headers:
            assert sent.get("content-length") == str(size) and "transfer-encoding" not in sent
        else:
            assert sent.get("transfer-encoding") == "chunked" and "content-length" not in sent
        assert (echo["body_len"], echo["body_sha256"]) == (size, pattern_sha256(size))

    after = memory_kib(worker)
    assert workers(server, 1) == [worker]  # the same process did all three transfers
    # VmHWM is the peak: it catches a body buffered whole and freed again, which VmRSS alone would miss.
    assert after["VmRSS"] - before["VmRSS"] < 30 * 1024, (before, after)
    assert after["VmHWM"] - before["VmHWM"] < 30 * 1024, (before, after)


# ------------------------------------------------------------------------------------------------------------
# 3. Client aborts free the upstream connection


def test_client_aborts_close_their_upstream_connections(gunicorn: Any) -> None:
    own = start_upstream()  # its own upstream, so every open socket counted belongs to this gunicorn
    try:
        server = gunicorn([_entry("/bytes", f"{own.url}/bytes", timeout=10)])
        resp, body = _get(server, "/bytes?size=1000")
        assert resp.status == 200 and body == pattern_bytes(1000)
        # The access line is written after the body is closed, so after the connection went back to the pool.
        assert wait_until(lambda: "GET /bytes 200 1000B" in server.output(), 5), server.output()
        assert wait_until(lambda: own.open_connections() == 1, 5), own.open_connections()

        for _ in range(20):
            with closing(socket.create_connection(("127.0.0.1", _port(server)), timeout=10)) as sock:
                sock.sendall(b"GET /bytes?size=%d HTTP/1.1\r\nHost: t\r\n\r\n" % (100 * MiB))
                got = b""
                while len(got) < 256 * 1024:
                    piece = sock.recv(65536)
                    assert piece, "passthru closed before sending any body"
                    got += piece
                assert got.startswith(b"HTTP/1.1 200 ")
        # The first abort took the pooled connection; every aborted one is closed, none pooled half-read.
        assert wait_until(lambda: own.open_connections() == 0, 10), own.open_connections()

        resp, body = _get(server, "/bytes?size=5000")
        assert resp.status == 200 and body == pattern_bytes(5000)
        assert wait_until(lambda: own.open_connections() == 1, 5), own.open_connections()
        assert "Traceback" not in server.output()
    finally:
        own.stop()


# ------------------------------------------------------------------------------------------------------------
# 4. The upstream breaks off mid-body: the client sees a cut answer, never a clean short one


# gunicorn keeps a connection open for `keepalive` (5 s) after an answer it thinks is complete; a cut answer
# must end well before that, so the client reads with a shorter timeout: a hang fails rather than passes late.
CUT_WITHIN = 4


@pytest.mark.parametrize(
    "target, declared",
    [
        pytest.param("/reset?phase=body", 1000, id="reset"),
        pytest.param("/stall?phase=body&seconds=5", 100, id="stall-past-timeout"),
    ],
)
def test_upstream_breaking_mid_body_cuts_the_client(shared: Gunicorn, target: str, declared: int) -> None:
    with closing(_conn(shared, timeout=CUT_WITHIN)) as conn:
        conn.request("GET", target)
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Length") == str(declared)
        with pytest.raises(http.client.IncompleteRead) as cut:
            resp.read()
    assert 0 < len(cut.value.partial) < declared
    path = target.split("?")[0]
    # The access line is written when the server has closed the answer: after it, the log is complete for it.
    assert wait_until(lambda: f"GET {path} 200 " in shared.output(), 5), shared.output()
    assert "Traceback" not in shared.output()


def test_upstream_breaking_mid_body_seen_on_the_wire(shared: Gunicorn) -> None:
    """Raw bytes: the connection ends (not kept alive) after fewer than Content-Length bytes."""
    lines, body = _raw(shared, b"GET /reset?phase=body HTTP/1.1\r\nHost: t\r\n\r\n", timeout=CUT_WITHIN)
    assert lines[0].startswith(b"HTTP/1.1 200 ")
    assert _header_lines(lines, "Content-Length") == [b"Content-Length: 1000"]
    assert body == b"r" * 100


@contextmanager
def _chunked_then_reset() -> Iterator[str]:
    """A one-request upstream: a chunked 200 with one chunk, then a TCP reset instead of the last chunk."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data and len(data) < 65536:
                piece = conn.recv(65536)
                if not piece:
                    return
                data += piece
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\ne\r\ndata: first\n\n\r\n")  # fmt: skip
            time.sleep(0.3)  # let the proxy relay the chunk: a reset discards data not yet read
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        thread.join(15)
        listener.close()


def test_chunked_stream_cut_by_upstream_has_no_final_chunk(gunicorn: Any) -> None:
    """An SSE-like chunked stream broken upstream must not end with the 0-size chunk that means complete."""
    with _chunked_then_reset() as target:
        server = gunicorn([_entry("/events", target, timeout=10)])
        lines, body = _raw(server, b"GET /events HTTP/1.1\r\nHost: t\r\n\r\n", timeout=CUT_WITHIN)
    assert lines[0].startswith(b"HTTP/1.1 200 ")
    assert _header_lines(lines, "Transfer-Encoding") == [b"Transfer-Encoding: chunked"]
    assert b"data: first\n\n" in body
    assert not body.endswith(b"0\r\n\r\n"), body
    assert "Traceback" not in server.output()


# ------------------------------------------------------------------------------------------------------------
# 5. Errors before the headers: LiteLLM-shaped JSON, no trace, no target


@pytest.mark.parametrize(
    "target, status, error_type",
    [
        pytest.param("/refused", 502, "upstream_error", id="refused"),
        pytest.param("/reset?phase=headers", 502, "upstream_error", id="reset-before-headers"),
        pytest.param("/stall?phase=headers&seconds=5", 504, "timeout_error", id="stall-past-timeout"),
        pytest.param("/malformed", 502, "upstream_error", id="malformed-status-line"),
    ],
)
def test_errors_before_headers_are_json(
    shared: Gunicorn, upstream: Upstream, target: str, status: int, error_type: str
) -> None:
    resp, body = _get(shared, target)
    assert resp.status == status
    assert resp.getheader("Content-Type") == "application/json"
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == (error_type, str(status))
    assert isinstance(error["message"], str) and error["message"]
    text = body.decode()
    assert "Traceback" not in text and "127.0.0.1" not in text and str(upstream.port) not in text
    assert "Traceback" not in shared.output()


# ------------------------------------------------------------------------------------------------------------
# 6. Secrets: never upstream (the caller's key), never in a log line, never in an answer


CREDENTIAL_FORMS = [
    pytest.param("Authorization", "Bearer {}", id="authorization-bearer"),
    pytest.param("x-litellm-api-key", "{}", id="x-litellm-api-key"),
    pytest.param("x-litellm-api-key", "Bearer {}", id="x-litellm-api-key-bearer"),
    pytest.param("api-key", "{}", id="api-key"),
    pytest.param("x-api-key", "{}", id="x-api-key"),
    pytest.param("x-goog-api-key", "{}", id="x-goog-api-key"),
]


def test_secrets_stay_out_of_upstream_logs_and_answers(upstream: Upstream, gunicorn: Any) -> None:
    master = "sk-master-" + secrets.token_hex(8)
    upstream_key = "up-secret-" + secrets.token_hex(8)
    public, secret = upstream.langfuse_auth
    token = base64.b64encode(f"{public}:{secret}".encode()).decode()
    env = {"MK": master, "UPSTREAM_KEY": upstream_key, "LF_PUBLIC": public, "LF_SECRET": secret,
           "GUNICORN_CMD_ARGS": "--log-level debug"}  # fmt: skip
    entries = [
        _entry("/secure", f"{upstream.url}/status/200", auth=True, forward_headers=True,
               headers={"Authorization": "bearer os.environ/UPSTREAM_KEY"}),
        _entry("/langfuse", f"{upstream.url}/api/public/ingestion", auth=True, forward_headers=True,
               headers={"LANGFUSE_PUBLIC_KEY": "os.environ/LF_PUBLIC",
                        "LANGFUSE_SECRET_KEY": "os.environ/LF_SECRET"}),
        _entry("/open", f"{upstream.url}/status/200", forward_headers=True),
        _entry("/open-injecting", f"{upstream.url}/status/200",
               headers={"X-Token": "os.environ/UPSTREAM_KEY"}),
    ]  # fmt: skip
    server = gunicorn(entries, env=env, master_key="os.environ/MK")
    answers: list[bytes] = []

    def call(path: str, headers: dict[str, str], method: str = "GET", body: bytes | None = None) -> int:
        resp, text = _get(server, path, headers, method, body)
        answers.append(text)
        return resp.status

    forms = [(p.values[0], str(p.values[1]).format(master)) for p in CREDENTIAL_FORMS]
    for name, value in forms:
        assert call("/secure", {name: value}) == 200, name
        received = upstream.requests[-1]
        assert received.header("Authorization") == f"bearer {upstream_key}"  # the route's, not the caller's
        assert call("/langfuse", {name: value}, "POST", b"{}") == 207, name
        assert upstream.requests[-1].header("Authorization") == f"Basic {token}"
        assert call("/open", {name: value}) == 200, name  # auth: false still never relays the master key
        assert call(f"/open-injecting?note={name}", {name: value}) == 200, name
    assert call("/open", dict(forms[:1] + forms[3:])) == 200  # all at once
    assert call("/open?api_key=" + master, {}) == 200  # in the query: relayed, but never logged
    for headers in ({"Authorization": "Bearer sk-wrong"}, {"x-api-key": "sk-wrong"}, {}):
        assert call("/secure", headers) == 401
        assert call("/langfuse", headers, "POST", b"{}") == 401

    for received in upstream.requests:
        for name, value in received.headers:
            assert master not in value, (received.target, name)
    log = server.output()
    assert wait_until(lambda: server.output().count(" 401 ") >= 6, 5), log
    log = server.output()
    assert "DEBUG" in log  # the debug level really was on
    for value in (master, upstream_key, public, secret, token):
        assert value not in log, value
        for text in answers:
            assert value.encode() not in text, value


# ------------------------------------------------------------------------------------------------------------
# 7. Repeated headers, redirects, bodiless answers, gzip


def test_two_set_cookie_lines_stay_two_lines(shared: Gunicorn) -> None:
    lines, body = _raw(shared, b"GET /cookies HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert lines[0].startswith(b"HTTP/1.1 200 ")
    assert _header_lines(lines, "Set-Cookie") == [b"Set-Cookie: a=1; Path=/", b"Set-Cookie: b=2; Path=/"]
    assert body == b"two cookies\n"


def test_redirect_is_relayed_not_followed(shared: Gunicorn, upstream: Upstream) -> None:
    resp, _ = _get(shared, "/status/302?location=/somewhere/else")
    assert resp.status == 302 and resp.getheader("Location") == "/somewhere/else"
    assert [r.target for r in upstream.requests] == ["/status/302?location=/somewhere/else"]


@pytest.mark.parametrize(
    "method, target, status",
    [
        pytest.param("HEAD", "/status/200", 200, id="head"),
        pytest.param("GET", "/status/204", 204, id="204"),
        pytest.param("GET", "/status/304", 304, id="304"),
    ],
)
def test_bodiless_answers_have_no_body(shared: Gunicorn, method: str, target: str, status: int) -> None:
    request = f"{method} {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
    lines, body = _raw(shared, request)
    assert lines[0].startswith(f"HTTP/1.1 {status} ".encode())
    assert body == b""
    assert _header_lines(lines, "Transfer-Encoding") == []
    # On a kept-alive connection the next answer must parse cleanly right after it (no stray body bytes).
    with closing(_conn(shared)) as conn:
        for _ in range(2):
            conn.request(method, target)
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (status, b"")
        conn.request("GET", "/status/201")
        resp = conn.getresponse()
        assert (resp.status, json.loads(resp.read())) == (201, {"status": 201})


def test_gzip_is_relayed_byte_for_byte(shared: Gunicorn) -> None:
    resp, body = _get(shared, "/gzip", {"Accept-Encoding": "gzip"})
    assert resp.status == 200 and resp.getheader("Content-Encoding") == "gzip"
    assert body == gzip.compress(GZIP_TEXT.encode(), mtime=0)
    assert resp.getheader("Content-Length") == str(len(body))
    assert gzip.decompress(body) == GZIP_TEXT.encode()


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"zz\r\nhello\r\n0\r\n\r\n", id="bad-chunk-size"),
        pytest.param(b"5\r\nhel", id="cut-mid-chunk"),
    ],
)
def test_malformed_chunked_upload_is_400_json(shared: Gunicorn, body: bytes) -> None:
    request = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + body
    with closing(socket.create_connection(("127.0.0.1", _port(shared)), timeout=10)) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)  # the caller is done sending: the body is what it is
        data = b""
        while piece := sock.recv(65536):
            data += piece
    head, _, answer = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), data[:300]
    assert json.loads(answer)["error"]["type"] == "bad_request_error"


@pytest.mark.parametrize(
    ("head", "status"),
    [
        pytest.param(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n", 400,
                     id="cl-and-te"),
        pytest.param(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n", 400,
                     id="two-cl"),
        pytest.param(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5x\r\n", 400, id="bad-cl"),
        pytest.param(b"GET /echo HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 10_000 + b"\r\n", 431,
                     id="header-too-big"),
        pytest.param(b"GET /echo HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)), 431,
                     id="too-many-headers"),
        pytest.param(b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n", 414, id="request-line-too-long"),
    ],
)  # fmt: skip
def test_requests_gunicorn_refuses_get_json_errors_too(shared: Gunicorn, head: bytes, status: int) -> None:
    lines, body = _raw(shared, head + b"Connection: close\r\n\r\nhello")
    assert lines[0].startswith(b"HTTP/1.1 %d" % status), lines[0]
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == str(status)


def test_every_failure_is_a_log_line_never_a_traceback(shared: Gunicorn) -> None:
    """Each way an upstream fails, and a client that leaves mid-stream, logged by this test itself: one warning and
    one access line each, and no Python traceback anywhere."""
    start = len(shared.output())
    for target, status in (("/refused", 502), ("/reset?phase=headers", 502), ("/malformed", 502),
                           ("/stall?phase=headers&seconds=5", 504)):  # fmt: skip
        assert _get(shared, target)[0].status == status, target
    assert _raw(shared, b"GET /reset?phase=body HTTP/1.1\r\nHost: t\r\n\r\n", timeout=CUT_WITHIN)[1] == b"r" * 100
    with closing(_conn(shared)) as conn:  # the client reads one event of a long stream and hangs up
        conn.request("GET", "/sse?n=100&gap=0.05")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline() == b"data: 0\n"
    expected = ["GET /refused 502", "GET /reset 502", "GET /malformed 502", "GET /stall 504", "GET /reset 200",
                "GET /sse 200", "upstream refused on /refused", "upstream reset on /reset",
                "upstream timeout on /stall", "upstream reset mid-body on /reset"]  # fmt: skip

    def logged() -> str:
        return shared.output()[start:]

    # The client that hung up is noticed at the next event passthru writes: its access line comes last.
    assert wait_until(lambda: all(line in logged() for line in expected), 10), logged()
    assert "Traceback" not in logged(), logged()
