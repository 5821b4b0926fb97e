"""A real HTTP upstream on 127.0.0.1 for integration tests.

It fails the way sockets really fail (TCP resets, half-sent bodies, bad status lines, stalls),
which in-process mocks such as `responses` cannot show. Standard library only.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import http.client
import json
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

PIECE = 64 * 1024
GZIP_TEXT = "hello gzip " * 100
_GZIP_BODY = gzip.compress(GZIP_TEXT.encode(), mtime=0)
RERANK_RESPONSE: dict[str, Any] = {
    "id": "37103a5b-8cfb-48d3-87c7-da288bedd429",
    "results": [
        {"index": 2, "relevance_score": 0.999071},
        {"index": 4, "relevance_score": 0.7867867},
        {"index": 0, "relevance_score": 0.32713068},
    ],
    "meta": {"api_version": {"version": "1"}, "billed_units": {"search_units": 1}},
}
_PERIOD = bytes(range(256))
_REDIRECTS = (301, 302, 303, 307, 308)
_Headers = tuple[tuple[str, str], ...]
_POST_ONLY = ("/v1/rerank", "/api/public/ingestion")
_ROUTES = {
    "/cookies": "_cookies",
    "/headers": "_asked_headers",
    "/gzip": "_gzip",
    "/sse": "_sse",
    "/bytes": "_bytes",
    "/stall": "_stall",
    "/reset": "_reset",
    "/malformed": "_malformed",
    "/v1/rerank": "_rerank",
    "/api/public/ingestion": "_ingestion",
}  # path -> _Handler method taking the query dict


def _pattern_pieces(n: int, piece: int = PIECE) -> Iterator[bytes]:
    """Yield n pattern bytes in pieces, so neither end ever holds all of them."""
    base = _PERIOD * (piece // len(_PERIOD) + 2)
    for off in range(0, n, piece):
        start = off % len(_PERIOD)
        yield base[start : start + min(piece, n - off)]


def pattern_bytes(n: int) -> bytes:
    """The first n bytes of the /bytes pattern (0..255 repeating), for small exact comparisons."""
    return b"".join(_pattern_pieces(n))


def pattern_sha256(n: int) -> str:
    """Hex sha256 of pattern_bytes(n), hashed piece by piece so large sizes cost no memory."""
    digest = hashlib.sha256()
    for piece in _pattern_pieces(n):
        digest.update(piece)
    return digest.hexdigest()


def wait_until(cond: Callable[[], bool], seconds: float) -> bool:
    """Poll cond until true or seconds pass; server-side effects (closes, records) lag the client."""
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@dataclass(frozen=True)
class Recorded:
    """One request as the upstream saw it, so tests can assert what a proxy really forwarded."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body_len: int
    body_sha256: str

    def header(self, name: str) -> str | None:
        """First value of a header, matched case-insensitively as HTTP does."""
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


@dataclass(frozen=True)
class Answer:
    """An answer a test gives the upstream to send at /answer/<name>: a JSON body, or a stream of events."""

    content_type: str
    body: bytes
    stream: bool = False

    def events(self) -> list[bytes]:
        """The stream's events, each with the blank line (or, for JSON lines, the newline) that ends it."""
        ends = b"\n" if self.content_type.endswith("json") else b"\n\n"
        if b"\r\n\r\n" in self.body:
            ends = b"\r\n\r\n"
        pieces = self.body.split(ends)
        return [piece + ends for piece in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 overflows when a proxy opens connections in bursts (200 aborted uploads
    # in a row): the kernel then drops handshakes and the proxy sees resets no real upstream would send.
    request_queue_size = 128

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.live: set[socket.socket] = set()
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Hang-ups, resets and timeouts are this server's job; print only real bugs."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """Reads each body fully (hashing as it streams), records it, then answers by route."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: without this, delayed ACK adds 40 ms
    timeout = 30  # an idle keep-alive client cannot pin a thread forever
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.live.add(self.connection)
        if self.server.stopping.is_set():  # accepted while stop() was cutting the others
            self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.lock:
                self.server.live.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request stderr lines; test output is for failures."""

    def __getattr__(self, name: str) -> Any:
        """Send every method (PATCH, OPTIONS, made-up ones) to the one dispatcher."""
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    def _dispatch(self) -> None:
        length, digest = self._read_body()
        target = self.requestline.split()[1]  # self.path gets "//" collapsed; record the raw target
        headers = tuple((k, str(v)) for k, v in self.headers.items())
        rec = Recorded(self.command, target, headers, length, digest)
        self.server.upstream.requests.append(rec)
        path, _, query = target.partition("?")
        q = dict(parse_qsl(query, keep_blank_values=True))
        if path.startswith("/status/") and path.removeprefix("/status/").isdigit():
            self._status(int(path.removeprefix("/status/")), q)
        elif path.startswith("/answer/") and path.removeprefix("/answer/") in self.server.upstream.answers:
            self._answer(self.server.upstream.answers[path.removeprefix("/answer/")], q)
        elif path in _POST_ONLY and self.command != "POST":
            self._json(405, {"message": "method not allowed"}, (("Allow", "POST"),))
        elif path in _ROUTES:
            getattr(self, _ROUTES[path])(q)
        else:
            self._json(
                200,
                {
                    "method": rec.method,
                    "target": target,
                    "headers": headers,
                    "body_len": length,
                    "body_sha256": digest,
                },
            )

    def _read_body(self) -> tuple[int, str]:
        """Stream the body through sha256 so a huge upload never sits in memory."""
        digest = hashlib.sha256()
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_into(digest, int(self.headers.get("Content-Length") or 0)), digest.hexdigest()
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0], 16)
            except ValueError:
                raise ConnectionAbortedError(f"bad chunk-size line {line!r}") from None
            if size == 0:
                break
            total += self._read_into(digest, size)
            if self.rfile.read(2) != b"\r\n":
                raise ConnectionAbortedError("chunk data not followed by CRLF")
        while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
            pass  # trailer fields
        return total, digest.hexdigest()

    def _read_into(self, digest: Any, size: int) -> int:
        left = size
        while left:
            piece = self.rfile.read(min(left, PIECE))
            if not piece:
                raise ConnectionAbortedError("client closed mid-body")
            digest.update(piece)
            left -= len(piece)
        return size

    def _start(self, code: int, headers: Iterable[tuple[str, str]]) -> None:
        self.send_response(code)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()

    def _reply(self, code: int, body: bytes | None, ctype: str, headers: _Headers = ()) -> None:
        """A complete response; body None means no body and no Content-Length (204/304)."""
        framing = () if body is None else (("Content-Type", ctype), ("Content-Length", str(len(body))))
        self._start(code, headers + framing)
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, obj: Any, headers: _Headers = ()) -> None:
        self._reply(code, json.dumps(obj).encode(), "application/json", headers)

    def _stream(self, pieces: Iterable[bytes], chunked: bool) -> None:
        """Write pieces as they come (wfile is unbuffered), one HTTP chunk per piece if chunked."""
        for piece in pieces:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _events(self, n: int, gap: float) -> Iterator[bytes]:
        for i in range(n):
            if i and self.server.stopping.wait(gap):
                raise ConnectionAbortedError("upstream stopping")
            yield f"data: {i}\n\n".encode()

    def _status(self, code: int, q: dict[str, str]) -> None:
        location = (("Location", q.get("location", "/elsewhere")),) if code in _REDIRECTS else ()
        if code in (204, 304):
            self._reply(code, None, "", location)
        else:
            self._json(code, {"status": code}, location)

    def _cookies(self, q: dict[str, str]) -> None:
        self._reply(
            200,
            b"two cookies\n",
            "text/plain",
            (("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2; Path=/")),
        )

    def _asked_headers(self, q: dict[str, str]) -> None:
        """200 with exactly the query's name=value pairs as headers (and a body's framing): no Server or Date of the
        handler's own unless asked for, so a test can send hop-by-hop headers, an id, a Date and a Server of its own."""
        body = b"headers as asked\n"
        self.send_response_only(200)
        for name, value in q.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _gzip(self, q: dict[str, str]) -> None:
        self._reply(200, _GZIP_BODY, "text/plain", (("Content-Encoding", "gzip"),))

    def _sse(self, q: dict[str, str]) -> None:
        """Events with real gaps, framed chunked or (like some SSE servers) by closing the socket; with ?cut=k, a
        TCP reset after k events (chunked), where the stream's end should be."""
        chunked = q.get("framing", "chunked") != "close"
        framing = ("Transfer-Encoding", "chunked") if chunked else ("Connection", "close")
        self._start(200, [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"), framing])
        if "cut" in q:
            for event in self._events(int(q["cut"]), float(q.get("gap", 0.2))):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self._abort()
            return
        self._stream(self._events(int(q.get("n", 5)), float(q.get("gap", 0.2))), chunked)

    def _bytes(self, q: dict[str, str]) -> None:
        size, chunked = int(q.get("size", 1 << 20)), q.get("framing") == "chunked"
        framing = ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(size))
        self._start(200, [("Content-Type", "application/octet-stream"), framing])
        self._stream(_pattern_pieces(size, max(1, int(q.get("chunk", PIECE)))), chunked)

    def _stall(self, q: dict[str, str]) -> None:
        """Go quiet before or inside the response, to exercise timeouts; wakes early on stop()."""
        seconds = float(q.get("seconds", 10))
        if q.get("phase", "headers") == "headers":
            if self.server.stopping.wait(seconds):
                raise ConnectionAbortedError("upstream stopping")
            self._reply(200, b"late", "text/plain")
        else:
            self._start(200, [("Content-Type", "text/plain"), ("Content-Length", "100")])
            self.wfile.write(b"x" * 10)
            self.server.stopping.wait(seconds)
            self.close_connection = True

    def _reset(self, q: dict[str, str]) -> None:
        """Abort with a TCP RST (linger 0), before the response or 100 bytes into a 1000-byte body."""
        if q.get("phase", "headers") == "body":
            self._start(200, [("Content-Type", "application/octet-stream"), ("Content-Length", "1000")])
            self.wfile.write(b"r" * 100)
        self._abort()

    def _abort(self) -> None:
        """Close with a TCP RST (linger 0): the peer sees a reset, not an end."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()  # its reference would keep the fd open past close()
        self.connection.close()
        self.close_connection = True

    def _malformed(self, q: dict[str, str]) -> None:
        self.wfile.write(b"HTTP/1.1 abc nonsense\r\n\r\n")
        self.close_connection = True

    def _answer(self, answer: Answer, q: dict[str, str]) -> None:
        """A test's answer (Upstream.answers): gzip-encoded with ?gzip=1; a stream sent an event at a time, chunked,
        ?gap seconds apart; any ?cost as x-litellm-response-cost."""
        extra = (("x-litellm-response-cost", q["cost"]),) if "cost" in q else ()
        body = answer.body
        if q.get("gzip"):
            body, extra = gzip.compress(body, mtime=0), (*extra, ("Content-Encoding", "gzip"))
        if not answer.stream:
            self._reply(200, body, answer.content_type, extra)
            return
        self._start(200, [("Content-Type", answer.content_type), ("Transfer-Encoding", "chunked"), *extra])
        self._stream(self._spaced(answer.events(), float(q.get("gap", 0))), chunked=True)

    def _spaced(self, events: list[bytes], gap: float) -> Iterator[bytes]:
        for i, event in enumerate(events):
            if i and gap and self.server.stopping.wait(gap):
                raise ConnectionAbortedError("upstream stopping")
            yield event

    def _rerank(self, q: dict[str, str]) -> None:
        self._json(200, RERANK_RESPONSE)

    def _ingestion(self, q: dict[str, str]) -> None:
        public, secret = self.server.upstream.langfuse_auth
        expected = "Basic " + base64.b64encode(f"{public}:{secret}".encode()).decode()
        if self.headers.get("Authorization") == expected:
            self._json(207, {"successes": [{"id": "1", "status": 201}], "errors": []})
        else:
            self._json(401, {"message": "unauthorized"})


class Upstream:
    """A running fake upstream; create it with start_upstream()."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.answers: dict[str, Answer] = {}  # served at /answer/<name>
        self.langfuse_auth = ("pk-lf-test", "sk-lf-test")
        self._server = _Server(self)
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    def open_connections(self) -> int:
        """Sockets accepted and not yet closed: shows whether a proxy pools, leaks or closes them."""
        with self._server.lock:
            return len(self._server.live)

    def stop(self) -> None:
        """Wake stalled handlers, stop accepting, cut live sockets; bounded, never waits out a stall."""
        self._server.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        with self._server.lock:
            live = list(self._server.live)
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)
        wait_until(lambda: self.open_connections() == 0, 5)


def start_upstream() -> Upstream:
    """Start on a free port; return once a real request was answered (gives up after ~5 s)."""
    up = Upstream()
    up._thread.start()
    deadline = time.monotonic() + 5
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", up.port, timeout=1)
        try:
            conn.request("GET", "/ready")
            conn.getresponse().read()
            break
        except OSError:
            if time.monotonic() > deadline:
                up.stop()
                raise
            time.sleep(0.02)
        finally:
            conn.close()
    wait_until(lambda: up.open_connections() == 0, 5)
    up.requests.clear()
    return up
