"""Several targets behind one route, through real sockets (forward.py's attempts): a failed attempt goes to the next
target, what reached the caller is never sent twice, bodies go out again byte for byte, cooldowns skip a failing
target, and a kept-alive connection that the upstream closed is sent again on a fresh one."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import requests
from conftest import Gunicorn
from test_metrics import metric, scrape
from upstream import Upstream, pattern_bytes, pattern_sha256, wait_until
from wire import Conn, RawUpstream, read_body

Serve = Callable[..., str]
MiB = 1024 * 1024
BODY = bytes(range(256)) * 1200  # 300 KiB, every byte value: within the default retry_body_limit


@contextmanager
def refusing() -> Iterator[str]:
    """A URL on a port that is bound and never listens: every connect to it is refused."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{closed.getsockname()[1]}/x"


def access_line(capsys: pytest.CaptureFixture[str], needle: str) -> str:
    """The access line that contains `needle`, once it is written (after the answer's end)."""
    seen = ""

    def find() -> str | None:
        nonlocal seen
        seen += capsys.readouterr().err
        return next((line for line in seen.splitlines() if needle in line and "upstream=" in line), None)

    assert wait_until(lambda: find() is not None, 5), seen
    return str(find())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("failing", "timeout"),
    [
        pytest.param(None, 10, id="refused"),
        pytest.param("/reset?phase=headers", 10, id="reset-before-status-line"),
        pytest.param("/stall?phase=headers&seconds=5", 0.3, id="no-status-line-within-timeout"),
        pytest.param("blackhole", 0.3, id="connect-timeout"),
        pytest.param("/status/503", 10, id="503"),
        pytest.param("/status/429", 10, id="429"),
        pytest.param("/status/500", 10, id="500"),
    ],
)
def test_a_failed_attempt_goes_to_the_next_target(
    serve: Serve, upstream: Upstream, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str],
    failing: str | None, timeout: float,
) -> None:  # fmt: skip
    with refusing() as refused:
        first = refused if failing is None else f"{upstream.url}{failing}"
        if failing == "blackhole":
            first = f"http://127.0.0.1:{request.getfixturevalue('blackhole')}/x"
        route = {
            "path": "/chat",
            "timeout": timeout,
            "targets": [{"url": first, "name": "first"}, {"url": f"{upstream.url}/echo", "name": "second"}],
        }
        base = serve([route])
        started = time.monotonic()
        answer = requests.post(f"{base}/chat", data=BODY, timeout=10)
    assert answer.status_code == 200, answer.text
    assert time.monotonic() - started < 3
    echo = answer.json()
    assert (echo["target"], echo["body_len"], echo["body_sha256"]) == ("/echo", len(BODY), sha(BODY))
    assert "target=second attempts=2" in access_line(capsys, "POST /chat 200")


@pytest.mark.parametrize(
    ("first", "second", "status", "error_type"),
    [
        pytest.param("refused", "/status/503", 503, None, id="a-status-is-relayed"),
        pytest.param("/status/503", "refused", 502, "upstream_error", id="refused-is-502"),
        pytest.param("refused", "/stall?phase=headers&seconds=5", 504, "timeout_error", id="timeout-is-504"),
    ],
)
def test_when_no_attempt_is_left_the_last_failure_is_the_answer(
    serve: Serve, upstream: Upstream, first: str, second: str, status: int, error_type: str | None
) -> None:
    with refusing() as refused:
        urls = [refused if url == "refused" else f"{upstream.url}{url}" for url in (first, second)]
        base = serve(
            [
                {
                    "path": "/chat",
                    "timeout": 0.3,
                    "targets": [{"url": urls[0], "name": "first"}, {"url": urls[1], "name": "second"}],
                }
            ]
        )
        answer = requests.post(f"{base}/chat", data=b"{}", timeout=10)
    assert answer.status_code == status
    if error_type is None:
        assert answer.json() == {"status": status}  # the upstream's own body
    else:
        assert answer.json()["error"]["type"] == error_type
        assert upstream.url not in answer.text


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_429_then_200_sends_the_body_again_byte_for_byte_and_the_caller_sees_only_the_200(
    serve: Serve, upstream: Upstream, framing: str
) -> None:
    base = serve([{"path": "/chat", "targets": [{"url": f"{upstream.url}/status/429", "name": "limited"},
                                                 {"url": f"{upstream.url}/echo", "name": "spare"}]}])  # fmt: skip
    data: Any = BODY if framing == "content-length" else iter([BODY[:1000], BODY[1000:]])
    answer = requests.post(f"{base}/chat", data=data, headers={"Idempotency-Key": "idem-42"}, timeout=10)
    assert answer.status_code == 200
    assert answer.json()["target"] == "/echo" and "status" not in answer.json()  # not a byte of the 429's {"status"}
    limited, spare = upstream.requests
    assert (limited.target, spare.target) == ("/status/429", "/echo")
    for seen in (limited, spare):
        assert (seen.body_len, seen.body_sha256) == (len(BODY), sha(BODY))
        assert seen.header("Idempotency-Key") == "idem-42"  # the same key on every attempt
    assert (spare.header("Transfer-Encoding") == "chunked") == (framing == "chunked")


def test_a_broken_event_stream_is_not_sent_again(serve: Serve, upstream: Upstream) -> None:
    base = serve([{"path": "/events", "targets": [{"url": f"{upstream.url}/sse?cut=1&gap=0.05", "name": "breaks"},
                                                   {"url": f"{upstream.url}/echo", "name": "spare"}]}])  # fmt: skip
    with requests.get(f"{base}/events", stream=True, timeout=10) as answer:
        assert answer.status_code == 200
        pieces = answer.iter_content(None)
        assert next(pieces) == b"data: 0\n\n"
        with pytest.raises(requests.exceptions.ChunkedEncodingError):  # cut, never ended as if complete
            list(pieces)
    time.sleep(0.3)
    assert [seen.target for seen in upstream.requests] == ["/sse?cut=1&gap=0.05"]  # the spare got no call


def test_a_long_upload_answered_503_after_it_was_read_is_relayed_not_sent_again(
    serve: Serve, upstream: Upstream
) -> None:
    base = serve([{"path": "/up", "targets": [{"url": f"{upstream.url}/status/503", "name": "busy"},
                                               {"url": f"{upstream.url}/echo", "name": "spare"}]}])  # fmt: skip
    answer = requests.post(f"{base}/up", data=pattern_bytes(5 * MiB), timeout=30)
    assert (answer.status_code, answer.json()) == (503, {"status": 503})
    time.sleep(0.2)
    ((target, length, digest),) = [(seen.target, seen.body_len, seen.body_sha256) for seen in upstream.requests]
    assert (target, length, digest) == ("/status/503", 5 * MiB, pattern_sha256(5 * MiB))  # it arrived once


def test_a_long_upload_is_sent_to_the_next_target_when_none_of_it_was_sent(serve: Serve, upstream: Upstream) -> None:
    with refusing() as refused:
        base = serve([{"path": "/up", "targets": [{"url": refused, "name": "down"},
                                                   {"url": f"{upstream.url}/echo", "name": "spare"}]}])  # fmt: skip
        answer = requests.post(f"{base}/up", data=pattern_bytes(5 * MiB), timeout=30)
    assert answer.status_code == 200
    assert (answer.json()["body_len"], answer.json()["body_sha256"]) == (5 * MiB, pattern_sha256(5 * MiB))


def test_a_refusing_target_cools_down_and_every_call_succeeds(serve: Serve, upstream: Upstream) -> None:
    with refusing() as refused:
        route = {
            "path": "/cool",
            "allowed_fails": 2,
            "cooldown_time": 2,
            "targets": [{"url": refused, "name": "down"}, {"url": f"{upstream.url}/echo", "name": "up"}],
        }
        base = serve([route])

        def refusals() -> float:
            return metric(scrape(base), "passthru_upstream_attempts_total", route="/cool", target="down",
                          outcome="refused")  # fmt: skip

        for _ in range(10):
            assert requests.get(f"{base}/cool", timeout=10).status_code == 200
        assert refusals() == 2  # after allowed_fails in a row, "down" is tried no more
        text = scrape(base)
        assert metric(text, "passthru_upstream_attempts_total", route="/cool", target="up", outcome="answered") == 10
        assert metric(text, "passthru_upstream_cooldowns_total", route="/cool", target="down") == 1
        ready = requests.get(f"{base}/health/readiness", timeout=10).json()
        assert ready["targets"]["/cool"] == [{"name": "down", "state": "cooldown", "seconds_left": 2},
                                             {"name": "up", "state": "ok"}]  # fmt: skip
        assert "127.0.0.1" not in json.dumps(ready)  # names only, never a URL
        time.sleep(2.1)  # the cooldown is over: "down" is tried again, and cools again
        for _ in range(10):
            assert requests.get(f"{base}/cool", timeout=10).status_code == 200
        assert refusals() == 4
        assert metric(scrape(base), "passthru_upstream_cooldowns_total", route="/cool", target="down") == 2


def test_weights_and_orders_across_gunicorn_workers(gunicorn: Callable[..., Gunicorn], upstream: Upstream) -> None:
    """Each worker picks by smooth weighted round robin: over 400 calls, 3:1 lands within one call per worker."""
    with refusing() as refused, refusing() as also_refused:
        server = gunicorn([
            {"path": "/w", "targets": [{"url": f"{upstream.url}/w/a", "name": "a", "weight": 3},
                                       {"url": f"{upstream.url}/w/b", "name": "b"},
                                       {"url": f"{upstream.url}/w/c", "name": "c", "order": 2}]},
            {"path": "/o", "targets": [{"url": refused, "name": "a"}, {"url": also_refused, "name": "b"},
                                       {"url": f"{upstream.url}/o/c", "name": "c", "order": 2}]},
        ], workers=2)  # fmt: skip
        for _ in range(400):
            assert requests.get(f"{server.url}/w", timeout=10).status_code == 200  # a new connection each
        for _ in range(40):
            assert requests.get(f"{server.url}/o", timeout=10).status_code == 200
    counts = Counter(seen.target for seen in upstream.requests)
    assert abs(counts["/w/a"] - 300) <= 2 and counts["/w/a"] + counts["/w/b"] == 400, counts
    assert counts["/w/c"] == 0  # order 2 gets nothing while order 1 answers
    assert counts["/o/c"] == 40  # and everything when no order-1 target does


def keeps_alive_then_closes(seen: list[tuple[int, str]]) -> Callable[[Conn], None]:
    """A RawUpstream script: it answers a connection's first request and keeps the connection open, then reads the
    second and closes without answering (an upstream whose idle timeout fires as a request arrives)."""

    def script(conn: Conn) -> None:
        number = id(conn)
        seen.append((number, read_body(conn)[1]))
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        conn.sock.settimeout(1)  # the test's next call comes at once; the connection ends soon after it
        head = []
        while (line := conn.reader.readline(65536)) not in (b"\r\n", b"\n", b""):
            head.append(line.rstrip(b"\r\n"))
        if head:
            seen.append((number, read_body(Conn(conn.sock, conn.reader, head, conn.stop))[1]))

    return script


@pytest.mark.parametrize(
    ("method", "body", "limit", "second"),
    [
        pytest.param("GET", b"", None, 200, id="no-body"),
        pytest.param("POST", BODY, None, 200, id="kept-body"),
        pytest.param("POST", BODY, 1000, 502, id="body-past-the-limit-is-not-sent-twice"),
    ],
)
def test_a_kept_alive_connection_closed_by_the_upstream_is_sent_again_on_a_fresh_one(
    serve: Serve, method: str, body: bytes, limit: int | None, second: int
) -> None:
    seen: list[tuple[int, str]] = []
    raw = RawUpstream(keeps_alive_then_closes(seen), seconds=5)
    try:
        limits = {} if limit is None else {"retry_body_limit": limit}
        route = f"/stale-{method}-{limit}"  # the metrics are the test process's: a route of its own
        base = serve([{"path": route, "target": f"{raw.url}/x", **limits}])  # one target, num_retries 0
        with requests.Session() as session:
            assert session.request(method, f"{base}{route}", data=body, timeout=10).status_code == 200
            assert session.request(method, f"{base}{route}", data=body, timeout=10).status_code == second
        stale = metric(scrape(base), "passthru_upstream_attempts_total", route=route, outcome="stale")
    finally:
        raw.close()
    if second == 200:
        (one, _), (same, _), (fresh, _) = seen  # the second call reached the upstream twice, on two connections
        assert one == same != fresh and {digest for _, digest in seen} == {sha(body)}
        assert stale == 1
    else:
        assert len(seen) == 2 and stale == 0


@pytest.mark.parametrize(
    ("head", "piece"),
    [
        pytest.param(b"Content-Length: 100\r\n", None, id="stalls-mid-body"),
        pytest.param(b"Content-Length: %d\r\n" % (4 * MiB), b"x" * 1024, id="long-body-trickling"),
        pytest.param(b"Transfer-Encoding: chunked\r\n", b"400\r\n" + b"x" * 1024 + b"\r\n", id="chunked-trickling"),
    ],
)
def test_a_failed_answer_is_dropped_within_bounds(
    serve: Serve, upstream: Upstream, head: bytes, piece: bytes | None
) -> None:
    """A dropped answer is read only when it is small and framed, and for DISCARD_SECONDS at most."""

    def script(conn: Conn) -> None:
        read_body(conn)
        conn.send(b"HTTP/1.1 503 Busy\r\n" + head + b"\r\n" + (piece or b"x" * 10))
        while not conn.stop.wait(0.1):  # a piece every 0.1 s, or none: never the end
            if piece:
                conn.send(piece)

    raw = RawUpstream(script, seconds=15)
    try:
        base = serve(
            [
                {
                    "path": "/drop",
                    "timeout": 30,
                    "targets": [{"url": f"{raw.url}/x", "name": "busy"}, {"url": f"{upstream.url}/echo", "name": "ok"}],
                }
            ]
        )
        started = time.monotonic()
        response = requests.post(f"{base}/drop", data=b"{}", timeout=30)
        assert response.status_code == 200 and response.json()["target"] == "/echo"
        assert time.monotonic() - started < 2.5  # at most DISCARD_SECONDS spent on the dropped answer
    finally:
        raw.close()


def test_the_spend_log_names_the_target_that_answered(serve: Serve, upstream: Upstream, tmp_path) -> None:
    master = "sk-attempts-master-1"
    base = serve([{"path": "/chat", "auth": True,
                   "targets": [{"url": f"{upstream.url}/status/503", "name": "busy"},
                               {"url": f"{upstream.url}/echo", "name": "spare"}]}],
                 master_key=master, database_url=f"sqlite:///{tmp_path / 'keys.db'}")  # fmt: skip
    auth = {"Authorization": f"Bearer {master}"}
    answer = requests.post(f"{base}/chat", data=b"{}", headers={**auth, "x-request-id": "two-attempts"}, timeout=10)
    assert answer.status_code == 200

    def entry() -> dict[str, Any] | None:
        logs = requests.get(f"{base}/spend/logs", headers=auth, timeout=10).json()
        return next((e for e in logs if e["request_id"] == "two-attempts"), None)

    assert wait_until(lambda: entry() is not None, 5)
    assert (entry() or {})["target"] == "spare"


def test_each_target_gets_the_sub_path_on_its_own_path_and_query(serve: Serve, upstream: Upstream) -> None:
    with refusing() as refused:
        base = serve([{"path": "/api", "include_subpath": True, "default_query_params": {"v": "1"},
                       "targets": [{"url": f"{refused}?tier=1", "name": "down"},
                                   {"url": f"{upstream.url}/base/?tier=2", "name": "up"}]}])  # fmt: skip
        answer = requests.get(f"{base}/api/models/x?q=a", timeout=10)
    assert answer.status_code == 200
    assert answer.json()["target"] == "/base/models/x?tier=2&q=a&v=1"
