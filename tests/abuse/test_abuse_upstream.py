"""Hostile upstreams, written byte by byte: 100 MB of headers, a body that never ends, and answers whose framing
or header values are malformed. Each ends in a 502 in LiteLLM's JSON shape (or, once the answer has started, a
closed connection), the worker keeps serving with flat memory, and no secret shows in any answer or log line.
"""

from __future__ import annotations

import json
import secrets
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from upstream import wait_until
from wire import (
    Conn,
    Evidence,
    MiB,
    OneWorker,
    RawUpstream,
    Recorder,
    Reply,
    Script,
    exchange,
    memory_kib,
    one_worker,
    workers,
)

MASTER = "sk-hostile-master-" + secrets.token_hex(12)
UPSTREAM_KEY = "up-hostile-key-" + secrets.token_hex(12)
AUTH = f"Authorization: Bearer {MASTER}\r\n".encode()
HOSTILE_BYTES = 100 * MiB  # what the flooding upstreams would send if nobody stopped reading
EVIDENCE = Evidence()


@dataclass
class Rig(OneWorker):
    hostile: RawUpstream  # its script is set by each test

    def call(self, label: str, path: str = "/hostile") -> Reply:
        request = f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n".encode() + AUTH + b"\r\n"
        return EVIDENCE.answer(label, exchange(self.port, request))

    def still_serving(self) -> None:
        reply = self.call("normal", "/ok")
        assert reply.status == 200 and reply.body == b'{"ok": true}', reply.data[:300]
        assert workers(self.server, 1) == [self.worker]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    directory: Path = tmp_path_factory.mktemp("abuse-upstream")
    hostile = RawUpstream(lambda conn: None)
    normal = RawUpstream(Recorder())
    secret = {"Authorization": "bearer os.environ/UPSTREAM_KEY"}
    entries = [{"path": "/hostile", "target": hostile.url, "auth": True, "headers": secret, "timeout": 3},
               {"path": "/ok", "target": normal.url, "auth": True, "headers": secret}]  # fmt: skip
    env = {"MK": MASTER, "UPSTREAM_KEY": UPSTREAM_KEY}
    try:
        with one_worker(directory, entries, env, EVIDENCE) as served:
            rig = Rig(served.server, served.port, served.worker, hostile)
            rig.still_serving()  # warm: imports done and the pool made before memory is measured
            yield rig
    finally:
        hostile.close()
        normal.close()


def assert_502_json(reply: Reply) -> None:
    assert reply.status == 502, reply.data[:300]
    assert reply.header("Content-Type") == ["application/json"]
    error = json.loads(reply.body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("upstream_error", "502")


# ------------------------------------------------------------------------------------------------------------
# 100 MB of headers


def _flood_of_lines(conn: Conn) -> None:
    conn.send(b"HTTP/1.1 200 OK\r\n")
    block = b"".join(b"X-Flood-%04d: %s\r\n" % (i, b"v" * 40) for i in range(1000))
    while conn.sent < HOSTILE_BYTES and not conn.stop.is_set():
        conn.send(block)


def _one_endless_line(conn: Conn) -> None:
    conn.send(b"HTTP/1.1 200 OK\r\nX-Long: ")
    block = b"v" * 65536
    while conn.sent < HOSTILE_BYTES and not conn.stop.is_set():
        conn.send(block)


@pytest.mark.parametrize("script", [_flood_of_lines, _one_endless_line], ids=["many-lines", "one-line"])
def test_100mb_of_headers_is_a_502_and_the_upstream_is_cut_off(rig: Rig, script: Script) -> None:
    before = len(rig.hostile.served)
    peak = memory_kib(rig.worker)["VmHWM"]
    rig.hostile.script = script
    reply = rig.call("header flood")
    assert_502_json(reply)
    assert reply.seconds < 3, reply.seconds  # refused at the first line over http.client's limits, not timed out
    assert wait_until(lambda: len(rig.hostile.ended()) > before, 5)
    [served] = rig.hostile.served[before:]
    assert served.error in ("ConnectionResetError", "BrokenPipeError"), served  # passthru hung up on it
    assert served.sent < 10 * MiB, served.sent  # far from the 100 MB it had to give
    assert memory_kib(rig.worker)["VmHWM"] - peak < 30 * 1024
    rig.still_serving()


# ------------------------------------------------------------------------------------------------------------
# a body that never ends


def _endless_body(framing: bytes) -> Script:
    def script(conn: Conn) -> None:
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n" + framing + b"\r\n")
        piece = b"e" * 65536
        chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
        deadline = time.monotonic() + 30
        while not conn.stop.is_set() and time.monotonic() < deadline:
            conn.send(chunk if b"chunked" in framing else piece)

    return script


@pytest.mark.parametrize(
    "framing",
    [b"Transfer-Encoding: chunked\r\n", b"Connection: close\r\n", b"Content-Length: 1000000000000000\r\n"],
    ids=["chunked", "until-close", "petabyte-content-length"],
)
@pytest.mark.parametrize("reset", [False, True], ids=["client-closes", "client-resets"])
def test_an_endless_body_streams_until_the_client_leaves_then_the_upstream_is_cut(
    rig: Rig, framing: bytes, reset: bool
) -> None:
    before = len(rig.hostile.served)
    peak = memory_kib(rig.worker)["VmHWM"]
    rig.hostile.script = _endless_body(framing)
    got = 0
    with socket.create_connection(("127.0.0.1", rig.port), timeout=10) as sock:
        sock.sendall(b"GET /hostile HTTP/1.1\r\nHost: t\r\n" + AUTH + b"\r\n")
        head = sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 200 "), head[:300]
        while got < 32 * MiB:  # streamed as it comes: 32 MiB through, and it would go on
            piece = sock.recv(1 << 20)
            assert piece, "passthru ended an endless body"
            got += len(piece)
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        left = time.monotonic()
    # The client left: passthru stops reading and closes the upstream connection, which fails the next send.
    assert wait_until(lambda: len(rig.hostile.ended()) > before, 5), "the upstream is still being read"
    [served] = rig.hostile.served[before:]
    assert served.error is not None and served.finished - left < 5, served
    assert memory_kib(rig.worker)["VmHWM"] - peak < 30 * 1024  # relayed piece by piece, never gathered
    rig.still_serving()


# ------------------------------------------------------------------------------------------------------------
# malformed answers


def _answer(raw: bytes) -> Script:
    def script(conn: Conn) -> None:
        conn.send(raw)
        conn.stop.wait(0.3)  # let passthru read it all before the connection closes

    return script


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 20\r\n\r\nHELLOworldHELLOworld",
                     id="two-different-content-lengths"),
        pytest.param(b"HELLO, no status line", id="no-status-line"),
        pytest.param(b"HTTP/1.1 abc nonsense\r\n\r\n", id="bad-status-code"),
        pytest.param(b"HTTP/1.1 200 " + b"K" * 70_000 + b"\r\n\r\n", id="status-line-over-64k"),
        pytest.param(b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(101)) + b"\r\n",
                     id="101-headers"),
    ],
)  # fmt: skip
def test_a_malformed_answer_before_its_body_is_a_502(rig: Rig, raw: bytes) -> None:
    start = len(rig.server.output())
    rig.hostile.script = _answer(raw)
    assert_502_json(rig.call("malformed"))
    assert "Traceback" not in rig.server.output()[start:]
    rig.still_serving()


def test_a_broken_chunk_before_any_byte_closes_the_connection(rig: Rig) -> None:
    """The status was handed to gunicorn but not yet sent: the client sees the connection close, no answer."""
    start = len(rig.server.output())
    rig.hostile.script = _answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nHELLO\r\n0\r\n\r\n")
    reply = rig.call("broken chunk")
    assert reply.ended in ("closed", "reset") and b"HELLO" not in reply.data, reply
    assert reply.status in (None, 200), reply.data[:300]
    assert "Traceback" not in rig.server.output()[start:]
    rig.still_serving()


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Evil: a\x00b\r\n\r\nHELLO", id="nul-in-a-value"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Evil: a\x01b\r\n\r\nHELLO", id="control-in-a-value"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nHELLO", id="content-length-not-a-number"),
    ],
)
def test_a_header_value_the_server_cannot_write_is_a_502(rig: Rig, raw: bytes) -> None:
    start = len(rig.server.output())
    rig.hostile.script = _answer(raw)
    reply = rig.call("unwritable header")
    rig.still_serving()
    assert "Traceback" not in rig.server.output()[start:]
    assert_502_json(reply)


def test_a_negative_content_length_is_a_502(rig: Rig) -> None:
    rig.hostile.script = _answer(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nHELLO")
    reply = rig.call("negative content-length")
    rig.still_serving()
    assert reply.header("Content-Length") != ["-1"], reply.data[:300]
    assert_502_json(reply)


def test_chunked_wins_over_a_content_length_sent_with_it(rig: Rig) -> None:
    rig.hostile.script = _answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"14\r\nHELLOworldHELLOworld\r\n0\r\n\r\n")  # fmt: skip
    reply = rig.call("content-length with chunked")
    rig.still_serving()
    assert reply.status == 200
    assert reply.header("Content-Length") in ([], ["20"]), reply.data[:300]
    body = reply.body
    if reply.header("Transfer-Encoding") == ["chunked"]:
        body = b"".join(body.split(b"\r\n")[1::2])
    assert body == b"HELLOworldHELLOworld", reply.data[:300]


# ------------------------------------------------------------------------------------------------------------


def _reflecting(shape: Callable[[bytes], bytes], reset: bool = False) -> Script:
    """A hostile answer that carries back what passthru sent this upstream (its request line and headers, so the
    injected key, and the caller's key if passthru ever relayed it): an error text or a log line that quoted the
    answer would show them."""

    def script(conn: Conn) -> None:
        conn.send(shape(b" ".join(conn.head)))
        if reset:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            conn.stop.wait(0.3)

    return script


REFLECTING = {
    "status line": _reflecting(lambda seen: b"HTTP/1.1 abc " + seen + b"\r\n\r\n"),
    "no status line": _reflecting(lambda seen: seen + b"\r\n\r\n"),
    "control character in a header": _reflecting(
        lambda seen: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Seen: \x01" + seen + b"\r\n\r\nok"
    ),
    "bad content-length": _reflecting(lambda seen: b"HTTP/1.1 200 OK\r\nContent-Length: " + seen + b"\r\n\r\nok"),
    "reset inside the head": _reflecting(lambda seen: b"HTTP/1.1 200 OK\r\nX-Seen: " + seen, reset=True),
}


def test_no_secret_in_any_answer_or_log_and_one_worker_throughout(rig: Rig) -> None:
    """Upstreams that answer with the secrets passthru sent them, in every place an error can quote: none of it
    reaches the caller's answer or the log, and the one worker serves throughout. Also checks what the module's
    other tests collected, when they ran first."""
    evidence = Evidence()
    evidence.log(rig.server.log)
    # A connection an earlier answer left in passthru's pool must be closed first, or one call below would use it.
    assert wait_until(lambda: rig.hostile.open_connections() == 0, 5)
    start = len(rig.server.output())
    for label, script in REFLECTING.items():
        before = len(rig.hostile.served)
        rig.hostile.script = script
        assert_502_json(evidence.answer(label, rig.call(label)))
        [served] = rig.hostile.served[before:]
        assert wait_until(lambda: served.finished > 0, 5), label  # noqa: B023
        assert UPSTREAM_KEY.encode() in b" ".join(served.head), label  # the secret really was in play
    # Every line about these calls is written once the access line of the last one is.
    assert wait_until(lambda: rig.server.output()[start:].count("GET /hostile 502") == len(REFLECTING), 5)
    rig.still_serving()
    assert evidence.leaks([MASTER, UPSTREAM_KEY]) == []
    assert EVIDENCE.leaks([MASTER, UPSTREAM_KEY]) == []
    assert rig.server.output().count("Booting worker") == 1
