"""Processes dying and reloading under load: a worker killed with SIGKILL is replaced by the master and only the
calls it was holding fail; a stream in flight through `kill -HUP` finishes whole on the old worker.

`kill -HUP` during a load of 1,000 requests with zero failures is tests/test_reload.py's
`test_reload_under_load_fails_no_request`, and is not repeated here.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass

from conftest import Gunicorn
from upstream import Upstream, wait_until
from wire import children, port_of, workers

ACCESS = re.compile(r"\[(\d+)\] \[([0-9a-f]{32})\] passthru: GET /sse ")
CLIENTS = 8


@dataclass
class Call:
    started: float
    ended: float
    outcome: str  # "ok", or what went wrong


def _served_by(server: Gunicorn) -> dict[str, int]:
    """request id → pid of the worker that wrote its access line (written once the answer is complete)."""
    return {match.group(2): int(match.group(1)) for match in ACCESS.finditer(server.output())}


def _call(port: int, calls: dict[str, Call], lock: threading.Lock) -> None:
    """One event stream on a fresh connection, with our own request id so the log says which worker served it."""
    request_id = uuid.uuid4().hex
    started = time.monotonic()
    try:
        with closing(http.client.HTTPConnection("127.0.0.1", port, timeout=10)) as conn:
            conn.request("GET", "/sse?n=3&gap=0.05", headers={"x-request-id": request_id, "Connection": "close"})
            resp = conn.getresponse()
            body = resp.read()
            outcome = "ok" if resp.status == 200 and body.count(b"data: ") == 3 else f"{resp.status} {body[:80]!r}"
    except (OSError, http.client.HTTPException) as exc:
        outcome = type(exc).__name__
    with lock:
        calls[request_id] = Call(started, time.monotonic(), outcome)


def test_a_worker_killed_under_load_is_replaced_and_only_its_calls_fail(
    gunicorn: Callable[..., Gunicorn], upstream: Upstream
) -> None:
    server = gunicorn([{"path": "/sse", "target": f"{upstream.url}/sse", "timeout": 10}], workers=2)
    port = port_of(server)
    calls: dict[str, Call] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def load() -> None:
        for _ in range(2000):
            if stop.is_set():
                return
            _call(port, calls, lock)

    # Both workers booted and serving before the load starts (a worker imports the app when it starts).
    for _ in range(200):
        if len(set(_served_by(server).values())) == 2:
            break
        _call(port, calls, lock)
    assert len(set(_served_by(server).values())) == 2, server.output()[-2000:]
    calls.clear()
    original = workers(server, 2)
    clients = [threading.Thread(target=load) for _ in range(CLIENTS)]
    try:
        for client in clients:
            client.start()
        assert wait_until(lambda: len(calls) >= 40, 15), len(calls)
        # The victim is the worker that finished a call most recently: the one most likely to hold calls now.
        victim = list(_served_by(server).values())[-1]
        os.kill(victim, signal.SIGKILL)
        # Reaped by the master: from here on it holds nothing and accepts nothing.
        assert wait_until(lambda: victim not in children(server.process.pid), 10)
        dead_at = time.monotonic()
        assert wait_until(lambda: len(children(server.process.pid)) == 2, 15), server.output()[-2000:]
        assert wait_until(lambda: sum(c.started > dead_at for c in list(calls.values())) >= 40, 15)
    finally:
        stop.set()
        for client in clients:
            client.join(20)
    assert not any(client.is_alive() for client in clients)

    served_by = _served_by(server)
    survivors = set(workers(server, 2))
    assert victim not in survivors and len(survivors & set(original)) == 1  # one original left, one new
    failed = {rid: call for rid, call in calls.items() if call.outcome != "ok"}
    # Only calls the victim held can fail: in flight when it died, never logged by a surviving worker.
    assert len(failed) <= CLIENTS, failed
    for rid, call in failed.items():
        assert call.started < dead_at, (rid, call)
        assert served_by.get(rid) not in survivors, (rid, call)
    # Every call the other workers served succeeded, during the kill and after it.
    assert all(calls[rid].outcome == "ok" for rid, pid in served_by.items() if pid in survivors and rid in calls)
    assert all(call.outcome == "ok" for call in calls.values() if call.started > dead_at)
    log = server.output()
    assert log.count("Booting worker") == 3, log[-3000:]
    assert "Traceback" not in log


def test_a_stream_in_flight_finishes_whole_through_a_reload(
    gunicorn: Callable[..., Gunicorn], upstream: Upstream
) -> None:
    server = gunicorn([{"path": "/sse", "target": f"{upstream.url}/sse", "timeout": 10}])
    old = workers(server, 1)[0]
    request_id = uuid.uuid4().hex
    with closing(http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=10)) as conn:
        conn.request("GET", "/sse?n=10&gap=0.2", headers={"x-request-id": request_id})
        resp = conn.getresponse()
        assert resp.status == 200
        events = [resp.readline()]
        server.process.send_signal(signal.SIGHUP)  # after the first event: two seconds of stream still to come
        assert wait_until(lambda: server.output().count("Booting worker") == 2, 10), server.output()
        body = resp.read()  # http.client raises IncompleteRead if the chunked stream is cut
    events += body.splitlines(keepends=True)
    assert [e for e in events if e.startswith(b"data:")] == [f"data: {i}\n".encode() for i in range(10)]
    # The old worker finished it (its access line, complete), then left; the new one serves what comes next.
    assert wait_until(lambda: _served_by(server).get(request_id) == old, 5), server.output()[-2000:]
    assert wait_until(lambda: len(now := children(server.process.pid)) == 1 and now != [old], 10)
    with closing(http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=10)) as conn:
        conn.request("GET", "/sse?n=2&gap=0.05")
        assert conn.getresponse().read().count(b"data: ") == 2
    assert " incomplete" not in server.output()
    assert "Traceback" not in server.output()
