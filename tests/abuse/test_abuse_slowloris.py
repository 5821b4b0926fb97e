"""Slow clients against the shipped gunicorn configs (one worker; `threads` and `worker_connections` from
deploy/gunicorn.conf.py): what they can hold, for how long, and the nginx front (tests/abuse/README.md).

passthru's gthread worker reads request heads in its poller and gives a connection a thread only once its head is
whole; a head not whole within $PASSTHRU_HEADER_TIMEOUT (5 s by default) is dropped. The gevent worker reads each
head in a greenlet under the same deadline. So 1,000 connections trickling heads a byte a second cost connections,
not threads: a normal request is still answered at once, throughout. Before, `threads` of them stopped the worker.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT
from gunicorn.config import Config
from trickle import Trickle
from wire import Evidence, OneWorker, RawUpstream, Recorder, exchange, one_worker, open_fds, workers

from passthru.server.heads import DEFAULT_HEADER_TIMEOUT, HEADER_TIMEOUT_VARIABLE
from passthru.server.worker import head_limits


def shipped(setting: str) -> int:
    """A number from deploy/gunicorn.conf.py, read as text: running it would set PROMETHEUS_MULTIPROC_DIR here."""
    found = re.search(rf"^{setting} = (\d+)$", (ROOT / "deploy" / "gunicorn.conf.py").read_text(), re.M)
    assert found, f"deploy/gunicorn.conf.py no longer sets {setting} to a number"
    return int(found[1])


THREADS = shipped("threads")
KEEPALIVE = shipped("keepalive")
MASTER = "sk-slow-master-" + secrets.token_hex(12)
UPSTREAM_KEY = "up-slow-key-" + secrets.token_hex(12)
NORMAL = f"GET /open HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {MASTER}\r\n\r\n".encode()
KEPT_ALIVE = f"GET /open HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {MASTER}\r\n\r\n".encode()
SLOW_HEAD = f"GET /open HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {MASTER}\r\n".encode()  # never finished
TRICKLERS = 1000  # the count: connections trickling heads a byte a second from this machine
GEVENT_HEADER_TIMEOUT = 2.0  # the gevent rig's $PASSTHRU_HEADER_TIMEOUT: below keepalive, so it is what applies
# How late a connection may be closed after its head deadline: gthread checks deadlines each pass of its poller
# (at least once a second), and this machine is shared.
LATE = 2.5
EVIDENCE = Evidence()


Rig = OneWorker


@contextlib.contextmanager
def serving(directory: Path, conf: str, env: dict[str, str]) -> Iterator[Rig]:
    """One gunicorn worker under `conf`, passthru's /open route (auth on) to an upstream that answers 200."""
    upstream = RawUpstream(Recorder())
    entries = [{"path": "/open", "target": f"{upstream.url}/open", "auth": True,
                "headers": {"Authorization": "bearer os.environ/UPSTREAM_KEY"}}]  # fmt: skip
    try:
        with one_worker(directory, entries, {"MK": MASTER, "UPSTREAM_KEY": UPSTREAM_KEY, **env}, EVIDENCE,
                        conf=conf) as served:  # fmt: skip
            yield served
    finally:
        upstream.close()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """deploy/gunicorn.conf.py as shipped: passthru's gthread worker, the default header timeout."""
    with serving(tmp_path_factory.mktemp("slowloris"), "deploy/gunicorn.conf.py", {}) as served:
        yield served


@pytest.fixture(scope="module")
def gevent_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """deploy/gunicorn.gevent.conf.py, with a header timeout shorter than the default (and than keepalive)."""
    from test_deploy import require_gevent

    require_gevent()
    env = {HEADER_TIMEOUT_VARIABLE: str(GEVENT_HEADER_TIMEOUT)}
    with serving(tmp_path_factory.mktemp("slowloris-gevent"), "deploy/gunicorn.gevent.conf.py", env) as served:
        yield served


def probe_throughout(rig: Rig, trickle: Trickle, seconds: float, label: str) -> list[int]:
    """A normal request every half second for `seconds` while `trickle` runs: each must be answered 200 within 1 s,
    with the trickle holding nine in ten of its connections or more. Returns the worker's open files at each."""
    files: list[int] = []
    end = time.monotonic() + seconds
    for i in range(int(seconds / 0.5) + 1):  # bounded, whatever the clock does
        if time.monotonic() >= end:
            break
        assert trickle.error is None, trickle.error
        holding = trickle.open_now
        reply = EVIDENCE.answer(f"{label} {i}", exchange(rig.port, NORMAL, timeout=3))
        files.append(open_fds(rig.worker))
        assert reply.status == 200 and reply.seconds < 1, (f"probe {i}", reply)
        assert holding >= 0.9 * trickle.count, f"the trickle held {holding} of {trickle.count} connections"
        time.sleep(max(0.0, 0.5 - reply.seconds))
    return files


def assert_dropped_at(trickle: Trickle, deadline: float) -> None:
    """Every connection the server closed had been open about `deadline` seconds; none was left open longer."""
    closed = trickle.closed_by_server
    assert len(closed) >= trickle.count, f"{len(closed)} of {trickle.count} closed by the server"
    assert min(closed) > deadline - 0.5, f"closed before the deadline: {sorted(closed)[:5]}"
    longest = max(closed + trickle.still_open)
    assert longest < deadline + LATE, f"open for {longest:.1f} s, past the {deadline} s deadline"


def test_idle_connections_hold_no_thread_and_are_closed_at_the_header_timeout(rig: Rig) -> None:
    """More connections than threads that never send a byte: a normal request is answered at once (gthread alone
    gave each a thread for its first 5 s), and each is closed once the header timeout has passed."""
    seconds = DEFAULT_HEADER_TIMEOUT + LATE + 1
    with Trickle(rig.port, THREADS + 16, b"", burst=0, interval=3600, seconds=seconds) as idle:
        started = time.monotonic()
        idle.wait_open(10)
        time.sleep(0.5)  # every one accepted and waiting
        probe_throughout(rig, idle, 1.5, "normal beside idle connections")
        time.sleep(max(0.0, started + seconds - time.monotonic()))  # until every first one has been dropped
    assert idle.error is None and idle.answered == 0
    assert_dropped_at(idle, DEFAULT_HEADER_TIMEOUT)
    assert workers(rig.server, 1) == [rig.worker]


def test_a_thousand_trickled_heads_leave_the_worker_answering(rig: Rig) -> None:
    """The issue's case: 1,000 connections trickling heads a byte a second to one worker of 128 threads, each
    opened again as soon as the worker drops it. Every normal request is answered within 1 s throughout, the
    worker holds the connections itself (not its listen queue), and drops each head at the header timeout."""
    with Trickle(rig.port, TRICKLERS, SLOW_HEAD, seconds=14) as slow:
        slow.wait_open(15)
        files = probe_throughout(rig, slow, 12, "normal beside 1,000 slow heads")
    assert slow.error is None and slow.answered == 0
    assert max(files) >= TRICKLERS, f"the worker held {max(files)} files at most"
    assert_dropped_at(slow, DEFAULT_HEADER_TIMEOUT)
    assert workers(rig.server, 1) == [rig.worker]


@pytest.mark.parametrize(
    "pipelined", [True, False], ids=["next-head-sent-with-the-request", "next-head-after-the-answer"]
)
def test_kept_alive_connections_trickling_their_next_head_hold_no_thread(rig: Rig, pipelined: bool) -> None:
    """More kept-alive connections than threads, each answered once and then trickling its next head: its first
    byte sent with the first request (read ahead by the thread that answered) or a second after the answer (seen
    by the poller). No thread waits for them, and each is dropped at the header timeout."""
    burst = len(KEPT_ALIVE) + 1 if pipelined else len(KEPT_ALIVE)
    late = 0.0 if pipelined else 1.0  # the next head's first byte, after the connection opened
    with Trickle(
        rig.port, THREADS + 16, KEPT_ALIVE + SLOW_HEAD, burst=burst, seconds=DEFAULT_HEADER_TIMEOUT + 5
    ) as kept:
        kept.wait_open(10)
        probe_throughout(rig, kept, DEFAULT_HEADER_TIMEOUT + 2, "normal beside kept-alive slow heads")
    assert kept.error is None and kept.answered >= THREADS + 16  # the first request of each was answered
    assert_dropped_at(kept, DEFAULT_HEADER_TIMEOUT + late)
    assert workers(rig.server, 1) == [rig.worker]


def _past_the_line_limit() -> bytes:
    line_limit, _ = head_limits(Config())
    return b"GET /open?" + b"a" * (line_limit + 5 - len(b"GET /open?"))


def _past_the_head_limit(head: bytes = b"GET /open HTTP/1.1\r\nHost: t\r\n") -> bytes:
    _, head_limit = head_limits(Config())
    line = b"X-Big: " + b"b" * 8000 + b"\r\n"
    head += line * ((head_limit - len(head)) // len(line))
    return head + b"X-Last: " + b"c" * (head_limit + 1 - len(head) - len(b"X-Last: "))


@pytest.mark.parametrize(
    "head, status",
    [
        pytest.param(_past_the_line_limit(), 414, id="request-line"),
        pytest.param(_past_the_head_limit(), 431, id="head"),
    ],
)
def test_a_head_past_gunicorns_size_limits_is_refused_at_once(rig: Rig, head: bytes, status: int) -> None:
    """A head that grows past what gunicorn's parser would read (its limit_request_* settings), with no end in
    sight and the connection kept open: refused with gunicorn's answer as soon as it is that long."""
    reply = EVIDENCE.answer(f"unfinished head of {len(head)} bytes", exchange(rig.port, head, timeout=4))
    assert (reply.status, reply.ended) == (status, "closed"), reply
    assert reply.seconds < 2, reply.seconds
    assert reply.header("Content-Type") == ["application/json"]


def test_gevent_workers_answer_beside_a_thousand_trickled_heads_and_drop_them(gevent_rig: Rig) -> None:
    """deploy/gunicorn.gevent.conf.py: a greenlet per connection, and worker_connections above 1,000, so the same
    1,000 trickled heads leave the worker answering; each is dropped at $PASSTHRU_HEADER_TIMEOUT (set to 2 s)."""
    with Trickle(gevent_rig.port, TRICKLERS, SLOW_HEAD, seconds=13) as slow:
        slow.wait_open(15)
        files = probe_throughout(gevent_rig, slow, 11, "gevent: normal beside 1,000 slow heads")
    assert slow.error is None and slow.answered == 0
    assert max(files) >= TRICKLERS, f"the worker held {max(files)} files at most"
    assert_dropped_at(slow, GEVENT_HEADER_TIMEOUT)
    assert workers(gevent_rig.server, 1) == [gevent_rig.worker]


def test_nginx_in_front_takes_slow_heads_off_the_worker(rig: Rig, tmp_path: Path) -> None:
    """deploy/nginx.conf as shipped: nginx reads whole heads itself (client_header_timeout) before it opens a
    connection to passthru, so more slow clients than passthru has threads cost passthru nothing."""
    from test_deploy import nginx_binary, require, start_nginx

    require(nginx_binary() is not None, "nginx", "apt-get install -y nginx-light")
    nginx = start_nginx(tmp_path / "nginx", rig.port)
    for log in (nginx.log, nginx.log.with_name("access.log")):  # its output holds its error log too
        EVIDENCE.log(log)
    try:
        front = int(nginx.url.rsplit(":", 1)[1])
        with Trickle(front, THREADS + 36, SLOW_HEAD, interval=0.5, seconds=10) as slow:
            slow.wait_open(10)
            time.sleep(1)
            for i in range(3):
                reply = EVIDENCE.answer(f"normal through nginx {i}", exchange(front, NORMAL, timeout=5))
                assert reply.status == 200 and reply.seconds < 1, reply
                time.sleep(0.5)
            assert slow.open_now == THREADS + 36
    finally:
        nginx.stop()
    assert workers(rig.server, 1) == [rig.worker]


def test_the_readme_states_the_settings_the_config_ships() -> None:
    """tests/abuse/README.md explains these measurements with the shipped numbers, and must say them right."""
    readme = (ROOT / "tests" / "abuse" / "README.md").read_text()
    for setting in ("threads", "worker_connections", "keepalive"):
        assert f"`{setting} = {shipped(setting)}`" in readme, setting
    assert f"`{HEADER_TIMEOUT_VARIABLE}` ({DEFAULT_HEADER_TIMEOUT:g} s)" in readme


def test_no_secret_in_any_answer_or_log(rig: Rig) -> None:
    """Runs last in this module, over everything it saw; run alone, it makes its own evidence: a normal request, a
    head dropped at the deadline and a head refused as too large, each carrying the master key."""
    normal = EVIDENCE.answer("normal, for the leak check", exchange(rig.port, NORMAL, timeout=5))
    refused = EVIDENCE.answer("too large, for the leak check", exchange(rig.port, _past_the_head_limit(SLOW_HEAD)))
    assert (normal.status, refused.status) == (200, 431)
    with Trickle(rig.port, 4, SLOW_HEAD, burst=len(SLOW_HEAD), seconds=DEFAULT_HEADER_TIMEOUT + LATE) as dropped:
        dropped.wait_open(5)
        for _ in range(int((DEFAULT_HEADER_TIMEOUT + LATE) / 0.1)):  # bounded: until the worker dropped them
            if len(dropped.closed_by_server) >= 4:
                break
            time.sleep(0.1)
    assert len(dropped.closed_by_server) >= 4
    assert "request head not whole" in rig.server.output()  # the debug line of a dropped head, in the log checked
    assert EVIDENCE.leaks([MASTER, UPSTREAM_KEY]) == []
    assert "Traceback" not in rig.server.output()
