"""Timeouts, timed on the wire: an upstream that does not answer within a route's `timeout` gets a 504 at that
moment, and a stream that goes quiet mid-body is cut that long after its last byte, never ended cleanly.

tests/test_gunicorn.py already proves the status, the JSON shape and the cut for refused, reset before and mid
body, stalled before and mid body and malformed status line upstreams (`test_errors_before_headers_are_json`,
`test_upstream_breaking_mid_body_*`); what it does not check is *when* the timeout fires, or a chunked stream
(the shape of an LLM's event stream) that stalls. That is all this module adds.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Gunicorn, start_gunicorn, write_config
from wire import Conn, RawUpstream, Script, exchange, port_of

TIMEOUT = 1.5  # the routes' `timeout`: long enough to measure, short enough to wait for
LATE = 1.5  # how much later than TIMEOUT the 504 or the cut may come on a loaded CI machine


def _quiet(conn: Conn) -> None:
    conn.stop.wait(15)  # never answers (the test's end wakes it)


def _stream_then_quiet(chunked: bool) -> Script:
    def script(conn: Conn) -> None:
        framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: 100"
        event = b"data: first\n\n"
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + framing + b"\r\n\r\n"
                  + (b"%x\r\n%s\r\n" % (len(event), event) if chunked else event))  # fmt: skip
        conn.stop.wait(15)  # then silence, until passthru gives up on it

    return script


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    directory: Path = tmp_path_factory.mktemp("timeouts")
    upstreams = {
        "/quiet": RawUpstream(_quiet),
        "/chunked": RawUpstream(_stream_then_quiet(chunked=True)),
        "/length": RawUpstream(_stream_then_quiet(chunked=False)),
    }
    try:
        entries = [{"path": path, "target": up.url, "timeout": TIMEOUT} for path, up in upstreams.items()]
        gunicorn = start_gunicorn(write_config(directory, entries), directory / "gunicorn.log")
        try:
            yield gunicorn
        finally:
            gunicorn.stop()
    finally:
        for up in upstreams.values():
            up.close()


def test_no_answer_within_the_timeout_is_a_504_at_the_timeout(server: Gunicorn) -> None:
    reply = exchange(port_of(server), b"GET /quiet HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert reply.status == 504, reply.data[:300]
    assert TIMEOUT - 0.1 <= reply.seconds <= TIMEOUT + LATE, reply.seconds
    assert reply.header("Content-Type") == ["application/json"]
    error = json.loads(reply.body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("timeout_error", "504")


@pytest.mark.parametrize("path", ["/chunked", "/length"])
def test_a_stream_that_goes_quiet_is_cut_a_timeout_after_its_last_byte(server: Gunicorn, path: str) -> None:
    data = b""
    first_event = closed = None
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=TIMEOUT + LATE + 2) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())  # keep-alive: only a cut ends it early
        while len(data) < 65536:
            try:
                piece = sock.recv(65536)
            except ConnectionResetError:
                piece = b""
            if not piece:
                closed = time.monotonic()
                break
            data += piece
            if first_event is None and b"data: first\n\n" in data:
                first_event = time.monotonic()
    assert first_event is not None, data
    assert closed is not None, f"the connection was still open {TIMEOUT + LATE + 2}s after the stream went quiet"
    assert TIMEOUT - 0.1 <= closed - first_event <= TIMEOUT + LATE, closed - first_event
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    if path == "/chunked":
        assert not body.endswith(b"0\r\n\r\n"), body  # no last chunk: the client can tell the stream was cut
    else:
        assert b"Content-Length: 100" in head and len(body) < 100
    assert "Traceback" not in server.output()
