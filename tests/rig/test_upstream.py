"""The fake upstream itself, checked through real sockets so proxy tests can trust what it does."""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import json
import socket
import time
from collections.abc import Iterator
from contextlib import closing
from itertools import pairwise

import pytest
from upstream import (
    GZIP_TEXT,
    RERANK_RESPONSE,
    Upstream,
    pattern_bytes,
    pattern_sha256,
    start_upstream,
    wait_until,
)


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    up = start_upstream()
    try:
        yield up
    finally:
        up.stop()


def _conn(up: Upstream, timeout: float = 5) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", up.port, timeout=timeout)


def _fetch(
    up: Upstream, method: str, target: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[http.client.HTTPResponse, bytes]:
    """One request on a fresh connection, closed afterwards."""
    with closing(_conn(up)) as conn:
        conn.request(method, target, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp, resp.read()


def _raw(up: Upstream, request: bytes, method: str = "GET") -> tuple[http.client.HTTPResponse, bytes]:
    """Send exact bytes (header case, repeats, chunk extensions) and parse the answer."""
    with closing(socket.create_connection(("127.0.0.1", up.port), timeout=5)) as sock:
        sock.sendall(request)
        with closing(http.client.HTTPResponse(sock, method=method)) as resp:
            resp.begin()
            return resp, resp.read()


def test_ready_probe_is_not_recorded_and_no_connection_left(upstream: Upstream) -> None:
    assert upstream.url == f"http://127.0.0.1:{upstream.port}"
    assert all(r.target != "/ready" for r in upstream.requests)
    assert wait_until(lambda: upstream.open_connections() == 0, 5)


def test_echo_raw_target_header_order_and_chunked_body(upstream: Upstream) -> None:
    request = (
        b"POST /echo?a=1&a=2&b= HTTP/1.1\r\nHost: up\r\nX-Dup: 1\r\nx-dup: 2\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    resp, body = _raw(upstream, request, "POST")
    echo = json.loads(body)
    assert resp.status == 200 and resp.getheader("Content-Type") == "application/json"
    assert echo["method"] == "POST" and echo["target"] == "/echo?a=1&a=2&b="
    assert echo["headers"] == [
        ["Host", "up"],
        ["X-Dup", "1"],
        ["x-dup", "2"],
        ["Transfer-Encoding", "chunked"],
    ]
    assert echo["body_len"] == 11 and echo["body_sha256"] == hashlib.sha256(b"hello world").hexdigest()
    rec = upstream.requests[-1]
    assert (rec.method, rec.target, rec.body_len, rec.body_sha256) == (
        "POST",
        "/echo?a=1&a=2&b=",
        11,
        echo["body_sha256"],
    )
    assert rec.header("X-DUP") == "1" and rec.header("missing") is None


def test_echo_http_client_chunked_generator_body(upstream: Upstream) -> None:
    resp, body = _fetch(upstream, "PUT", "/any/path", body=iter([b"ab", b"", b"cd"]))
    echo = json.loads(body)
    assert echo["body_len"] == 4 and ["Transfer-Encoding", "chunked"] in echo["headers"]


def test_echo_large_content_length_body_is_hashed(upstream: Upstream) -> None:
    size = 300_001
    resp, body = _fetch(upstream, "POST", "/upload", body=pattern_bytes(size))
    assert json.loads(body)["body_sha256"] == pattern_sha256(size)
    assert upstream.requests[-1].body_len == size


@pytest.mark.parametrize("method", ["PATCH", "DELETE", "OPTIONS", "BREW"])
def test_echo_any_method(upstream: Upstream, method: str) -> None:
    resp, body = _fetch(upstream, method, "/m")
    assert resp.status == 200 and json.loads(body)["method"] == method


def test_head_echo_has_length_but_no_body(upstream: Upstream) -> None:
    with closing(_conn(upstream)) as conn:
        conn.request("HEAD", "/echo")
        head = conn.getresponse()
        assert head.read() == b"" and int(head.getheader("Content-Length", "0")) > 0
        conn.request("GET", "/echo")  # same socket: the HEAD answer left no stray bytes
        assert json.loads(conn.getresponse().read())["method"] == "GET"


def test_status_codes(upstream: Upstream) -> None:
    with closing(_conn(upstream)) as conn:
        for code in (404, 500, 204, 304, 201):
            conn.request("GET", f"/status/{code}")
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == code
            if code in (204, 304):
                assert body == b"" and resp.getheader("Content-Length") is None
            else:
                assert json.loads(body) == {"status": code}


def test_redirect_location(upstream: Upstream) -> None:
    resp, _ = _fetch(upstream, "GET", "/status/302")
    assert resp.status == 302 and resp.getheader("Location") == "/elsewhere"
    resp, _ = _fetch(upstream, "GET", "/status/307?location=http%3A%2F%2Fx.test%2Fy")
    assert resp.status == 307 and resp.getheader("Location") == "http://x.test/y"


def test_cookies_are_two_header_lines(upstream: Upstream) -> None:
    resp, body = _fetch(upstream, "GET", "/cookies")
    assert resp.msg.get_all("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"] and body


def test_headers_are_exactly_the_ones_asked_for(upstream: Upstream) -> None:
    target = "/headers?Keep-Alive=timeout%3D5&Server=up%2F1&Date=Thu,%2001%20Jan%201970%2000:00:00%20GMT&X-Evil=a%01b"
    resp, body = _raw(upstream, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert resp.status == 200 and body == b"headers as asked\n"
    assert resp.getheaders() == [("Keep-Alive", "timeout=5"), ("Server", "up/1"),
                                 ("Date", "Thu, 01 Jan 1970 00:00:00 GMT"), ("X-Evil", "a\x01b"),
                                 ("Content-Length", str(len(body)))]  # fmt: skip


def test_gzip_always(upstream: Upstream) -> None:
    resp, body = _fetch(upstream, "GET", "/gzip", headers={"Accept-Encoding": "identity"})
    assert resp.getheader("Content-Encoding") == "gzip" and resp.getheader("Content-Type") == "text/plain"
    assert int(resp.getheader("Content-Length", "0")) == len(body)
    assert gzip.decompress(body).decode() == GZIP_TEXT


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_sse_events_arrive_spaced(upstream: Upstream, framing: str) -> None:
    with closing(_conn(upstream)) as conn:
        conn.request("GET", f"/sse?n=4&gap=0.2&framing={framing}")
        resp = conn.getresponse()
        assert resp.getheader("Content-Type") == "text/event-stream"
        assert resp.getheader("Cache-Control") == "no-cache"
        assert resp.chunked == (framing == "chunked") and resp.length is None
        arrivals, events = [], []
        for _ in range(4):
            events.append(resp.readline() + resp.readline())
            arrivals.append(time.monotonic())
        assert events == [f"data: {i}\n\n".encode() for i in range(4)]
        assert resp.read() == b""
        if framing == "close":
            assert resp.getheader("Connection") == "close"
    gaps = [b - a for a, b in pairwise(arrivals)]
    assert all(0.1 < g < 2.0 for g in gaps), gaps


def test_sse_cut_resets_after_its_events(upstream: Upstream) -> None:
    with closing(_conn(upstream)) as conn:
        conn.request("GET", "/sse?cut=2&gap=0.05")
        resp = conn.getresponse()
        assert resp.chunked and resp.readline() + resp.readline() == b"data: 0\n\n"
        assert resp.readline() + resp.readline() == b"data: 1\n\n"
        with pytest.raises((http.client.IncompleteRead, ConnectionResetError)):
            resp.read()


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_bytes_stream_integrity(upstream: Upstream, framing: str) -> None:
    size = 1_000_003
    with closing(_conn(upstream)) as conn:
        conn.request("GET", f"/bytes?size={size}&chunk=65536&framing={framing}")
        resp = conn.getresponse()
        assert resp.getheader("Content-Length") == (str(size) if framing == "length" else None)
        digest, total = hashlib.sha256(), 0
        while piece := resp.read(50_000):
            digest.update(piece)
            total += len(piece)
    assert total == size and digest.hexdigest() == pattern_sha256(size)


def test_pattern_helpers_agree() -> None:
    assert pattern_bytes(300) == bytes(range(256)) + bytes(range(44))
    for n in (0, 1, 65536, 70_001):
        assert pattern_sha256(n) == hashlib.sha256(pattern_bytes(n)).hexdigest()


def test_stall_headers_answers_late(upstream: Upstream) -> None:
    t0 = time.monotonic()
    resp, body = _fetch(upstream, "GET", "/stall?phase=headers&seconds=0.3")
    assert body == b"late" and time.monotonic() - t0 >= 0.25


def test_stall_headers_trips_client_timeout(upstream: Upstream) -> None:
    with closing(_conn(upstream, timeout=0.2)) as conn:
        conn.request("GET", "/stall?phase=headers&seconds=1")
        with pytest.raises(TimeoutError):
            conn.getresponse()


def test_stall_body_then_close_is_incomplete(upstream: Upstream) -> None:
    with closing(_conn(upstream)) as conn:
        conn.request("GET", "/stall?phase=body&seconds=0.3")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Length") == "100"
        with pytest.raises(http.client.IncompleteRead) as err:
            resp.read()
    assert err.value.partial == b"x" * 10


def test_reset_before_headers(upstream: Upstream) -> None:
    with closing(_conn(upstream)) as conn:
        conn.request("GET", "/reset?phase=headers")
        with pytest.raises(ConnectionResetError):
            conn.getresponse()
    assert upstream.requests[-1].target == "/reset?phase=headers"


def test_reset_mid_body(upstream: Upstream) -> None:
    with closing(_conn(upstream)) as conn:
        conn.request("GET", "/reset?phase=body")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Length") == "1000"
        with pytest.raises((ConnectionResetError, http.client.IncompleteRead)):
            resp.read()


def test_reset_is_a_real_rst_on_the_socket(upstream: Upstream) -> None:
    with closing(socket.create_connection(("127.0.0.1", upstream.port), timeout=5)) as sock:
        sock.sendall(b"GET /reset HTTP/1.1\r\nHost: up\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            sock.recv(1024)  # an orderly close would return b"" instead


def test_malformed_status_line(upstream: Upstream) -> None:
    with closing(_conn(upstream)) as conn:
        conn.request("GET", "/malformed")
        with pytest.raises(http.client.BadStatusLine):
            conn.getresponse()


def test_rerank(upstream: Upstream) -> None:
    resp, body = _fetch(
        upstream, "POST", "/v1/rerank", body=b'{"query": "q"}', headers={"Content-Type": "application/json"}
    )
    assert resp.status == 200 and json.loads(body) == RERANK_RESPONSE
    assert body == json.dumps(RERANK_RESPONSE).encode()
    assert _fetch(upstream, "GET", "/v1/rerank")[0].status == 405


def _basic(public: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{public}:{secret}".encode()).decode()}


def test_langfuse_ingestion_auth(upstream: Upstream) -> None:
    resp, body = _fetch(upstream, "POST", "/api/public/ingestion", b"{}", _basic("pk-lf-test", "sk-lf-test"))
    assert resp.status == 207
    assert json.loads(body) == {"successes": [{"id": "1", "status": 201}], "errors": []}
    resp, body = _fetch(upstream, "POST", "/api/public/ingestion", b"{}", _basic("pk-lf-test", "wrong"))
    assert resp.status == 401 and json.loads(body) == {"message": "unauthorized"}
    upstream.langfuse_auth = ("pk-other", "sk-other")
    try:
        resp, _ = _fetch(upstream, "POST", "/api/public/ingestion", b"{}", _basic("pk-other", "sk-other"))
        assert resp.status == 207
    finally:
        upstream.langfuse_auth = ("pk-lf-test", "sk-lf-test")


def test_keep_alive_and_open_connections(upstream: Upstream) -> None:
    assert wait_until(lambda: upstream.open_connections() == 0, 5)
    conn = _conn(upstream)
    with closing(conn):
        for _ in range(3):
            conn.request("GET", "/echo")
            conn.getresponse().read()
        assert upstream.open_connections() == 1  # three requests, one socket
    assert wait_until(lambda: upstream.open_connections() == 0, 5)


def test_stop_is_quick_during_a_stall() -> None:
    up = start_upstream()
    with closing(socket.create_connection(("127.0.0.1", up.port), timeout=5)) as sock:
        sock.sendall(b"GET /stall?phase=headers&seconds=30 HTTP/1.1\r\nHost: up\r\n\r\n")
        assert wait_until(lambda: len(up.requests) == 1, 5)
        t0 = time.monotonic()
        up.stop()
        assert time.monotonic() - t0 < 2
        assert up.open_connections() == 0
        assert sock.recv(1024) == b""  # cut with a FIN, never answered "late"
