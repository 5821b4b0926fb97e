"""Hostile requests in raw bytes through real gunicorn: path traversal, CR/LF injection, request smuggling,
oversized heads, and a body that never comes. Each gets a clean 4xx/5xx (or a closed connection), the worker
keeps serving, nothing half-parsed reaches the upstream, and no secret shows in any answer or log line.

gunicorn answers the malformed framing itself (400/431/414/501) before passthru sees it, in LiteLLM's JSON
shape like passthru's own answers (deploy/gunicorn.conf.py swaps gunicorn's HTML page for it).
tests/test_proxy.py checks a few traversal and framing cases on werkzeug's server; here they go through
gunicorn, with many more encodings.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest
from upstream import wait_until
from wire import Evidence, OneWorker, RawUpstream, Recorder, Reply, exchange, one_worker, workers

MASTER = "sk-abuse-master-" + secrets.token_hex(12)
UPSTREAM_KEY = "up-abuse-key-" + secrets.token_hex(12)
QUERY_KEY = "q-abuse-key-" + secrets.token_hex(12)
SECRETS = [MASTER, UPSTREAM_KEY, QUERY_KEY]
AUTH = f"Authorization: Bearer {MASTER}\r\n".encode()  # every request is an authenticated client misbehaving
EVIDENCE = Evidence()


@dataclass
class Rig(OneWorker):
    recorder: Recorder  # what the upstream received, whole requests only


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    directory: Path = tmp_path_factory.mktemp("abuse-requests")
    recorder = Recorder()
    upstream = RawUpstream(recorder)
    entries = [
        {"path": "/files", "target": f"{upstream.url}/base", "include_subpath": True, "forward_headers": True,
         "auth": True, "headers": {"Authorization": "bearer os.environ/UPSTREAM_KEY"},
         "default_query_params": {"key": "os.environ/QUERY_KEY"}},
        {"path": "/open", "target": f"{upstream.url}/open", "forward_headers": True,
         "headers": {"X-Upstream-Key": "os.environ/UPSTREAM_KEY"}},
    ]  # fmt: skip
    env = {"MK": MASTER, "UPSTREAM_KEY": UPSTREAM_KEY, "QUERY_KEY": QUERY_KEY}
    try:
        with one_worker(directory, entries, env, EVIDENCE) as served:
            yield Rig(served.server, served.port, served.worker, recorder)
    finally:
        upstream.close()


def get(target: str, headers: bytes = b"") -> bytes:
    """A GET from an authenticated client, on a connection it closes after the answer."""
    return f"GET {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n".encode() + AUTH + headers + b"\r\n"


def send(rig: Rig, label: str, request: bytes, half_close: bool = False) -> Reply:
    """Send raw bytes; the answer is kept for the final grep for secrets."""
    return EVIDENCE.answer(label, exchange(rig.port, request, half_close=half_close))


def assert_refused(reply: Reply, by: str, status: int | None = None) -> None:
    """A clean refusal: one 4xx/5xx in LiteLLM's JSON shape, then the connection ends.

    `by` says who refuses, for the reader: gunicorn (before any app code; deploy/gunicorn.conf.py makes its
    answers JSON too) or passthru.
    """
    assert by in ("gunicorn", "passthru")
    assert reply.status is not None and 400 <= reply.status < 600, reply.data[:300]
    if status is not None:
        assert reply.status == status, reply.data[:300]
    assert len(re.findall(rb"HTTP/1\.1 \d{3} ", reply.data)) == 1, reply.data[:600]  # nothing smuggled behind it
    assert reply.ended in ("closed", "reset"), reply.ended
    assert reply.header("Content-Type") == ["application/json"], reply.data[:300]
    error = json.loads(reply.body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == str(reply.status)


def assert_still_serving(rig: Rig) -> None:
    """The same worker answers a normal request right after."""
    reply = send(rig, "normal", get("/open"))
    assert reply.status == 200 and reply.body == b'{"ok": true}', reply.data[:300]
    assert workers(rig.server, 1) == [rig.worker]


def climbs_out(target: str, base: str = "/base") -> bool:
    """Whether an upstream could resolve this path outside `base`: decoded once as it should be and once more as
    a careless upstream might (passthru's own threat model), backslashes as slashes, and `;params` dropped from
    segments as Tomcat and Jetty do.
    """
    path = unquote(unquote(target.split("?", 1)[0])).replace("\\", "/")
    if path != base and not path.startswith(base + "/"):
        return True
    depth = 0
    for segment in path[len(base) :].split("/"):
        segment = segment.split(";", 1)[0]
        if segment == "..":
            depth -= 1
            if depth < 0:
                return True
        elif segment not in ("", "."):
            depth += 1
    return False


# ------------------------------------------------------------------------------------------------------------
# path traversal against an include_subpath route


@pytest.mark.parametrize(
    "target, outcome",
    [
        pytest.param("/files/../etc/passwd", 404, id="dotdot"),
        pytest.param("/files/a/../../etc/passwd", 404, id="dotdot-after-a-segment"),
        pytest.param("/files/./.././etc", 404, id="dot-then-dotdot"),
        pytest.param("/files/..", 404, id="dotdot-at-the-end"),
        pytest.param("/files/%2e%2e/%2e%2e/etc/passwd", 400, id="percent-encoded"),
        pytest.param("/files/%2E%2E%2F%2E%2E%2Fetc", 400, id="percent-encoded-upper-with-slashes"),
        pytest.param("/files/.%2e/etc", 404, id="half-encoded-1"),
        pytest.param("/files/%2e./etc", 404, id="half-encoded-2"),
        pytest.param("/files/..%2fetc", 400, id="encoded-slash"),
        pytest.param("/files%2f..%2fetc", 400, id="encoded-slash-after-the-prefix"),
        pytest.param("/files/%252e%252e%252fetc", 400, id="double-encoded"),
        pytest.param("/files/a/%252e%252e/%252e%252e/etc", 400, id="double-encoded-segments"),
        pytest.param("/files/%25252e%25252e/etc", "inside", id="triple-encoded-stays-literal"),
        pytest.param("/files/..\\..\\etc", 400, id="backslash"),
        pytest.param("/files/a/..%5c..%5cetc", 400, id="encoded-backslash"),
        pytest.param("/files/..%255c..%255cetc", 400, id="double-encoded-backslash"),
        pytest.param("/files/%c0%ae%c0%ae/etc", "inside", id="overlong-utf8-dot"),
        pytest.param("/files/..%c0%afetc", "inside", id="overlong-utf8-slash"),
        pytest.param("/files/%e0%80%ae%e0%80%ae/etc", "inside", id="overlong-utf8-3-byte-dot"),
        pytest.param("/files/%u002e%u002e/etc", "inside", id="iis-percent-u"),
        pytest.param("/files/%ef%bc%8e%ef%bc%8e/etc", "inside", id="fullwidth-dots"),
        pytest.param("/files/..%00/etc", 400, id="nul"),
        pytest.param("/files/..%09/etc", 400, id="tab"),
        pytest.param("/files/%2fetc/passwd", 400, id="encoded-leading-slash"),
        pytest.param("//files/../etc", 404, id="double-slash-prefix"),
        pytest.param("http://evil.example/files/../etc", 404, id="absolute-form"),
        pytest.param("/files/a?p=../../etc", "inside", id="dotdot-in-the-query"),
        pytest.param("/files/..;/etc", 400, id="tomcat-path-parameter"),
        pytest.param("/files/%2e%2e;/etc", 400, id="tomcat-path-parameter-encoded"),
        pytest.param("/files/..%3bjsessionid=1/etc", 400, id="tomcat-encoded-semicolon"),
    ],
)
# Dot segments are resolved before a route is chosen (tests/test_routes.py): a path that then lies outside every
# route is 404; one that climbs above the root, or hides a slash, backslash, dot segment or control character in an
# escape, is 400.
def test_traversal_is_refused_or_stays_inside_the_route(rig: Rig, target: str, outcome: int | str) -> None:
    before = len(rig.recorder.requests)
    reply = send(rig, f"traversal {target}", get(target))
    if outcome == "inside":
        assert reply.status == 200, reply.data[:300]
        [received] = rig.recorder.requests[before:]
        assert not climbs_out(received.target), received.target
    else:
        assert isinstance(outcome, int)
        assert_refused(reply, "passthru", outcome)
        assert rig.recorder.requests[before:] == []
    assert_still_serving(rig)


# ------------------------------------------------------------------------------------------------------------
# CR, LF and other control characters in header values and the query


@pytest.mark.parametrize(
    "request_line, header",
    [
        pytest.param(b"GET /open", b"X-A: a\rX-Injected: 1\r\n", id="bare-cr-in-a-header-value"),
        pytest.param(b"GET /open", b"X-A: a\nX-Injected: 1\r\n", id="bare-lf-in-a-header-value"),
        pytest.param(b"GET /open", b"X-A: a\x00b\r\n", id="nul-in-a-header-value"),
        pytest.param(b"GET /open", b"X-A: a\x7fb\r\n", id="del-in-a-header-value"),
        pytest.param(b"GET /open", b"X-A: a\r\n X-Injected: 1\r\n", id="obsolete-line-folding"),
        pytest.param(b"GET /open", b"X-Injected : 1\r\n", id="space-before-the-colon"),
        pytest.param(b"GET /open?x=a\r\nX-Injected: 1", b"", id="crlf-in-the-query"),
        pytest.param(b"GET /open?x=a\rb", b"", id="cr-in-the-query"),
        pytest.param(b"GET /open?x=a\nb", b"", id="lf-in-the-query"),
        pytest.param(b"GET /open?x=a\x00b", b"", id="nul-in-the-query"),
    ],
)
def test_control_characters_are_refused_by_gunicorn(rig: Rig, request_line: bytes, header: bytes) -> None:
    before = len(rig.recorder.requests)
    request = request_line + b" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n" + AUTH + header + b"\r\n"
    reply = send(rig, f"control {request_line!r} {header!r}", request)
    assert_refused(reply, "gunicorn", 400)
    assert rig.recorder.requests[before:] == []
    assert_still_serving(rig)


@pytest.mark.parametrize(
    "target, header",
    [
        pytest.param("/open?x=a%0d%0aX-Injected:%201", b"", id="encoded-crlf-in-the-query"),
        pytest.param("/open", b"X-A: a%0d%0aX-Injected: 1\r\n", id="encoded-crlf-in-a-header-value"),
        pytest.param("/open", b"X-Request-Id: a%0d%0aX-Injected: 1\r\n", id="encoded-crlf-in-the-request-id"),
    ],
)
def test_encoded_crlf_goes_upstream_still_encoded(rig: Rig, target: str, header: bytes) -> None:
    before = len(rig.recorder.requests)
    reply = send(rig, f"encoded crlf {target} {header!r}", get(target, header))
    assert reply.status == 200
    [received] = rig.recorder.requests[before:]
    lines = [received.head[0], *received.head[1:]]
    assert not any(line.lower().startswith(b"x-injected") for line in lines), lines
    assert not any(b"\r" in line or b"\n" in line or b"\x00" in line for line in lines), lines
    # A caller's request id that is not a plain token is replaced, on both sides.
    assert "%0d%0a" not in "".join(reply.header("x-request-id")).lower()


@pytest.mark.parametrize("prefix", ["/files/x", "/open"])
def test_an_encoded_newline_in_the_path_cannot_forge_a_log_line(rig: Rig, prefix: str) -> None:
    forged = f"FORGED-{secrets.token_hex(4)} INFO [1] [-] passthru: GET /admin 200 0B"
    target = prefix + "%0d%0a" + forged.replace(" ", "%20")
    reply = send(rig, "log forgery", get(target))
    assert_refused(reply, "passthru", 404)
    assert wait_until(lambda: forged.split()[0] in rig.server.output(), 5)  # the access line is written
    lines = rig.server.output().splitlines()
    assert not any(line.startswith(forged.split()[0]) for line in lines), [ln for ln in lines if "FORGED" in ln]


def test_a_secret_in_a_malformed_request_line_is_masked_in_the_log(rig: Rig) -> None:
    """gunicorn's 400 page repeats a malformed request line to the client that sent it (its own bytes: this
    answer is left out of the grep for secrets); the log line about it must still mask the key."""
    reply = exchange(rig.port, f"GET /open?api_key={MASTER}\rx HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    assert_refused(reply, "gunicorn", 400)
    assert wait_until(lambda: "Invalid HTTP request line: 'GET /open?api_key=***" in rig.server.output(), 5)
    assert_still_serving(rig)


# ------------------------------------------------------------------------------------------------------------
# request smuggling: framing two servers could read two ways

POST = b"POST /open HTTP/1.1\r\nHost: t\r\n" + b"X-Note: smuggling\r\n"


@pytest.mark.parametrize(
    "framing, body, by, status",
    [
        pytest.param(b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n", "gunicorn", 400,
                     id="content-length-and-chunked"),
        pytest.param(b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", b"0\r\n\r\n", "gunicorn", 400,
                     id="chunked-and-content-length"),
        pytest.param(b"Content-Length: 4\r\nContent-Length: 5\r\n", b"abcde", "gunicorn", 400,
                     id="two-content-lengths"),
        pytest.param(b"Content-Length: 4\r\nContent-Length: 4\r\n", b"abcd", "gunicorn", 400,
                     id="two-equal-content-lengths"),
        pytest.param(b"Content-Length: 4, 4\r\n", b"abcd", "gunicorn", 400, id="content-length-list"),
        pytest.param(b"Content-Length: +4\r\n", b"abcd", "gunicorn", 400, id="content-length-plus"),
        pytest.param(b"Content-Length: -1\r\n", b"abcd", "gunicorn", 400, id="content-length-negative"),
        pytest.param(b"Content-Length: 0x4\r\n", b"abcd", "gunicorn", 400, id="content-length-hex"),
        pytest.param(b"Transfer-Encoding: chunked, chunked\r\n", b"0\r\n\r\n", "gunicorn", 400,
                     id="chunked-twice"),
        pytest.param(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n", "gunicorn", 501, id="unknown-coding"),
        pytest.param(b"Transfer-Encoding: identity\r\n", b"", "gunicorn", 400, id="identity-coding"),
        pytest.param(b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n", "gunicorn", 400,
                     id="space-before-the-colon"),
        pytest.param(b"Transfer-Encoding:\x0bchunked\r\n", b"0\r\n\r\n", "gunicorn", 400, id="vertical-tab"),
        pytest.param(b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n", "passthru", 400,
                     id="gzip-then-chunked"),
        pytest.param(b"Transfer-Encoding: chunked\r\n", b"zz\r\nhello\r\n0\r\n\r\n", "passthru", 400,
                     id="chunk-size-not-hex"),
        pytest.param(b"Transfer-Encoding: chunked\r\n", b"-5\r\nhello\r\n0\r\n\r\n", "passthru", 400,
                     id="chunk-size-negative"),
        pytest.param(b"Transfer-Encoding: chunked\r\n", b"ffffffffffffffffffff\r\nhello\r\n0\r\n\r\n", "passthru",
                     400, id="chunk-size-overflowing"),
        pytest.param(b"Transfer-Encoding: chunked\r\n", b"0x5\r\nhello\r\n0\r\n\r\n", "passthru", 400,
                     id="chunk-size-0x"),
        pytest.param(b"Transfer-Encoding: chunked\r\n", b"+5\r\nhello\r\n0\r\n\r\n", "passthru", 400,
                     id="chunk-size-plus"),
        pytest.param(b"Transfer-Encoding: chunked\r\n", b"3\r\nhello\r\n0\r\n\r\n", "passthru", 400,
                     id="chunk-longer-than-its-size"),
        pytest.param(b"Transfer-Encoding: chunked\r\n", b"5;\x01\r\nhello\r\n0\r\n\r\n", "passthru", 400,
                     id="chunk-extension-control-character"),
        pytest.param(b"Transfer-Encoding: chunked\r\n", b"5\nhello\n0\n\n", "passthru", 400,
                     id="chunk-lines-with-bare-lf"),
    ],
)  # fmt: skip
def test_ambiguous_framing_is_refused_whole(rig: Rig, framing: bytes, body: bytes, by: str, status: int) -> None:
    """Kept alive and then half-closed: had any leftover bytes been read as a second request, a second answer
    would follow the first."""
    before = len(rig.recorder.requests)
    reply = send(rig, f"framing {framing!r}", POST + AUTH + framing + b"\r\n" + body, half_close=True)
    assert_refused(reply, by, status)
    assert rig.recorder.requests[before:] == []  # nothing whole reached the upstream
    assert_still_serving(rig)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_request_hidden_in_a_body_stays_a_body(rig: Rig, chunked: bool) -> None:
    hidden = b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n"
    framing = b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n" % len(hidden)
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(hidden), hidden) if chunked else hidden
    before = len(rig.recorder.requests)
    reply = send(rig, "hidden request", POST + AUTH + framing + b"Connection: close\r\n\r\n" + body)
    assert reply.status == 200
    [received] = rig.recorder.requests[before:]
    assert (received.target, received.body_len) == ("/open", len(hidden))


# ------------------------------------------------------------------------------------------------------------
# oversized heads (gunicorn's limit_request_line 4094, limit_request_fields 100, limit_request_field_size 8190)


@pytest.mark.parametrize(
    "head, status",
    [
        pytest.param(b"GET /open HTTP/1.1\r\nX-Big: " + b"a" * 100_000 + b"\r\n", 431, id="one-100kb-header"),
        pytest.param(b"GET /open?" + b"a" * 100_000 + b" HTTP/1.1\r\n", 414, id="100kb-request-line"),
        pytest.param(b"GET /open HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(101)), 431,
                     id="101-headers"),
        pytest.param(b"GET /open HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(10_000)), 431,
                     id="10000-headers"),
    ],
)  # fmt: skip
def test_oversized_heads_are_refused_by_gunicorn(rig: Rig, head: bytes, status: int) -> None:
    before = len(rig.recorder.requests)
    reply = send(rig, f"oversized {head[:40]!r}", head + b"Host: t\r\n" + AUTH + b"\r\n")
    if reply.status is None:  # gunicorn answered and closed while the head was still arriving: a reset
        assert reply.ended == "reset", reply
    else:
        assert_refused(reply, "gunicorn", status)
    assert rig.recorder.requests[before:] == []
    assert_still_serving(rig)


def test_100kb_of_headers_within_gunicorns_limits_are_relayed(rig: Rig) -> None:
    """13 headers of 8,000 bytes pass gunicorn's per-field and field-count limits; passthru relays them as any
    headers. Its memory per request is bounded by gunicorn's limits: 100 fields of 8,190 bytes, about 800 KB."""
    before = len(rig.recorder.requests)
    headers = b"".join(b"X-Big-%d: %s\r\n" % (i, b"b" * 8000) for i in range(13))
    reply = send(rig, "100kb in 13 headers", get("/open", headers))
    assert reply.status == 200
    [received] = rig.recorder.requests[before:]
    assert sum(line.startswith(b"X-Big-") and len(line) > 8000 for line in received.head) == 13


# ------------------------------------------------------------------------------------------------------------
# a huge declared Content-Length and a small body


@pytest.mark.parametrize("length", [10**12, 10**30], ids=["1-terabyte", "beyond-64-bits"])
def test_a_huge_content_length_with_a_small_body_is_400_once_the_client_stops(rig: Rig, length: int) -> None:
    before = len(rig.recorder.requests)
    request = POST + AUTH + b"Content-Length: %d\r\n\r\nabc" % length
    reply = send(rig, f"huge length {length}", request, half_close=True)
    assert_refused(reply, "passthru", 400)
    assert rig.recorder.requests[before:] == []  # the upstream saw its request break off, never complete
    assert_still_serving(rig)


def test_a_huge_content_length_from_a_client_that_stays_holds_one_call_until_it_goes(rig: Rig) -> None:
    """passthru streams uploads, so it waits for the body it was promised; gunicorn has no timeout for a client
    that sends nothing more (nginx's client_body_timeout is the bound: tests/abuse/README.md). Meanwhile only
    that one call waits, and everything is released once the client goes."""
    refused = rig.server.output().count("POST /open 400 ")
    before = len(rig.recorder.requests)
    with socket.create_connection(("127.0.0.1", rig.port), timeout=10) as sock:
        sock.sendall(POST + AUTH + b"Content-Length: %d\r\n\r\nabc" % 10**12)
        sock.settimeout(1.5)
        with pytest.raises(TimeoutError):
            sock.recv(1)  # no answer while the promised body may still come
        assert_still_serving(rig)
    # Gone: the call ends as the caller's 400 (answered to no one), its upstream request broken off, not whole.
    assert wait_until(lambda: rig.server.output().count("POST /open 400 ") > refused, 5)
    assert not [r for r in rig.recorder.requests[before:] if r.head[0].startswith(b"POST")]
    assert_still_serving(rig)


# ------------------------------------------------------------------------------------------------------------


def test_no_secret_in_any_answer_or_log_and_one_worker_throughout(rig: Rig) -> None:
    """Runs last: every answer above and the whole gunicorn log (at debug level) are free of every secret."""
    assert_still_serving(rig)
    time.sleep(0.2)  # the last access line
    assert EVIDENCE.leaks(SECRETS) == []
    assert len(EVIDENCE.answers) > 100
    log = rig.server.output()
    assert "[DEBUG]" in log  # the debug level really was on
    assert log.count("Booting worker") == 1
    assert "Traceback" not in log
