"""server/worker.py under real gunicorn and the shipped config: keep-alive connections served request after request
by the thread that answered, and handed back to gthread whole (stop, reload, max_requests, pipelining).
"""

from __future__ import annotations

import http.client
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from typing import BinaryIO

import pytest
from conftest import Gunicorn
from upstream import Upstream, wait_until
from wire import port_of

from passthru.server.worker import MAX_REQUESTS_PER_HANDOFF


def _entries(upstream: Upstream) -> list[dict[str, object]]:
    return [{"path": "/echo", "target": f"{upstream.url}/echo", "include_subpath": True},
            {"path": "/stall", "target": f"{upstream.url}/stall"}]  # fmt: skip


@contextmanager
def _connection(server: Gunicorn) -> Iterator[tuple[socket.socket, BinaryIO]]:
    """A raw keep-alive connection to the server and a buffered reader of its answers; both closed after."""
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as sock, sock.makefile("rb") as reader:
        yield sock, reader


def _request(target: str, body: bytes = b"") -> bytes:
    method = b"POST" if body else b"GET"
    head = b"%s %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (method, target.encode(), len(body))
    return head + body


def _read_response(reader: BinaryIO) -> tuple[int, dict[str, str], bytes]:
    """One response off a kept-alive connection, framed by Content-Length or chunked: (status, headers, body)."""
    status_line = reader.readline(65536)
    assert status_line.startswith(b"HTTP/1.1 "), f"no response, got {status_line!r}"
    headers = {}
    while (line := reader.readline(65536)) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while size := int(reader.readline(1024).split(b";")[0], 16):
            body += reader.read(size)
            reader.readline(1024)
        reader.readline(1024)
    else:
        body = reader.read(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


def test_one_connection_serves_back_to_back_spaced_and_pipelined_requests(
    gunicorn: Callable[..., Gunicorn], upstream: Upstream
) -> None:
    server = gunicorn(_entries(upstream))
    assert "Using worker: passthru.server.worker.KeepAliveThreadWorker" in server.output()
    with _connection(server) as (sock, reader):
        targets = []
        # Back to back, past two hand-offs to gthread; then spaced past the wait, so gthread's selector takes each.
        for i in range(2 * MAX_REQUESTS_PER_HANDOFF + 3):
            targets.append(f"/echo/b{i}")
            sock.sendall(_request(targets[-1], body=b"x" * i))
            status, headers, body = _read_response(reader)
            assert (status, headers.get("connection")) == (200, "keep-alive")
            assert f'"body_len": {i}' in body.decode()
        for i in range(3):
            time.sleep(0.05)
            targets.append(f"/echo/s{i}")
            sock.sendall(_request(targets[-1]))
            assert _read_response(reader)[0] == 200
        # Three requests in one write: the next one is already read ahead into the parser, not on the socket.
        pipelined = [f"/echo/p{i}" for i in range(3)]
        sock.sendall(b"".join(_request(t, body=b"y" * 7) for t in pipelined))
        for _ in pipelined:
            status, _, body = _read_response(reader)
            assert status == 200 and '"body_len": 7' in body.decode()
        targets += pipelined
    assert [r.target for r in upstream.requests] == targets


@pytest.mark.parametrize("pipelined", [False, True], ids=["next-sent-after", "next-sent-ahead"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_stop_mid_keepalive_answers_the_next_request_with_close(
    gunicorn: Callable[..., Gunicorn], upstream: Upstream, sig: signal.Signals, pipelined: bool
) -> None:
    """A request in flight when the worker is told to stop is answered; the next one on its connection too, with
    Connection: close, and then the connection ends (SIGHUP stops the old worker once the new one is up)."""
    server = gunicorn(_entries(upstream))
    with _connection(server) as (sock, reader):
        sock.sendall(_request("/echo/first"))
        assert _read_response(reader)[0] == 200
        # Long enough for SIGHUP's new worker to boot and the old one to get its SIGTERM meanwhile.
        sock.sendall(_request("/stall?seconds=3") + (_request("/echo/next") if pipelined else b""))
        time.sleep(0.3)
        server.process.send_signal(sig)
        status, headers, body = _read_response(reader)
        assert (status, body, headers.get("connection")) == (200, b"late", "keep-alive")
        if not pipelined:
            sock.sendall(_request("/echo/next"))
        status, headers, _ = _read_response(reader)
        assert (status, headers.get("connection")) == (200, "close")
        assert reader.read() == b""
    if sig == signal.SIGTERM:
        assert server.process.wait(10) == 0
    else:
        fresh = http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=10)
        fresh.request("GET", "/echo/fresh")
        assert fresh.getresponse().status == 200
        fresh.close()
    assert "Traceback" not in server.output()


def test_max_requests_closes_the_connection_at_the_limit(gunicorn: Callable[..., Gunicorn], upstream: Upstream) -> None:
    """The answer that reaches max_requests says Connection: close, and requests sent behind it are not served."""
    server = gunicorn(_entries(upstream), env={"GUNICORN_CMD_ARGS": "--max-requests 5"})
    with _connection(server) as (sock, reader):
        sock.sendall(_request("/echo/0"))
        assert _read_response(reader)[0] == 200
        sock.sendall(b"".join(_request(f"/echo/{i}") for i in range(1, 8)))  # 3 more than the limit, in one write
        answers = [_read_response(reader) for _ in range(4)]
        assert [(status, headers.get("connection")) for status, headers, _ in answers] == [
            (200, "keep-alive"), (200, "keep-alive"), (200, "keep-alive"), (200, "close")]  # fmt: skip
        assert reader.read() == b""
    assert [r.target for r in upstream.requests] == [f"/echo/{i}" for i in range(5)]
    assert wait_until(lambda: "Autorestarting worker" in server.output(), 5)
    with closing(http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=10)) as fresh:
        fresh.request("GET", "/echo/after")
        assert fresh.getresponse().status == 200


def test_a_worker_whose_threads_are_all_busy_leaves_new_connections_to_the_others(
    gunicorn: Callable[..., Gunicorn], upstream: Upstream
) -> None:
    """Four workers of one thread each, four long streams opened one after another: each is answered at once, as a
    worker with no free thread stops accepting. Before, whichever worker woke first took the next connection, and
    a busy one queued it behind its stream (all four landing on four different workers happened about one time in
    eleven)."""
    entries = [{"path": "/s", "target": f"{upstream.url}/sse?n=2&gap=30"}]
    server = gunicorn(entries, env={"GUNICORN_CMD_ARGS": "--threads 1"}, workers=4)
    port = port_of(server)
    streams = []
    try:
        for n in range(4):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            streams.append(sock)
            sock.sendall(b"GET /s HTTP/1.1\r\nHost: t\r\n\r\n")
            data = b""
            while b"data:" not in data:  # the first event; the second is 30 s away
                try:
                    piece = sock.recv(4096)
                except TimeoutError:
                    waited = f"stream {n + 1} of 4 got no answer in 5 s: it waited for a busy worker"
                    raise AssertionError(waited) from None
                assert piece, f"stream {n + 1} was closed"
                data += piece
    finally:
        for sock in streams:
            sock.close()
