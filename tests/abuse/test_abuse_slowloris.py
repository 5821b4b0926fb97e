"""Slow clients against the shipped gunicorn config (one gthread worker, `threads` from deploy/gunicorn.conf.py):
what they can pin, for how long, and the nginx front that takes them off passthru (tests/abuse/README.md).

Measured on gunicorn 27: a new connection holds a thread for up to 5 s waiting for its first byte, then waits in
the worker's poller and is closed after `keepalive`. But once a connection has sent its first byte, the thread
reads the rest of the head from a blocking socket with no deadline: as many slow heads as there are threads
stop the worker from answering anyone, for as long as they last (still pinned after 40 s when measured; the
worker's heartbeat keeps beating, so the master never restarts it). No gunicorn setting bounds that read.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, Gunicorn, start_gunicorn, write_config
from gunicorn.workers.gthread import DEFAULT_WORKER_DATA_TIMEOUT
from wire import Evidence, RawUpstream, Recorder, Reply, exchange, port_of, workers


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
SLOW_HEAD = f"GET /open HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {MASTER}\r\n".encode()  # never finished
EVIDENCE = Evidence()


@dataclass
class Rig:
    server: Gunicorn
    port: int
    worker: int


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    directory: Path = tmp_path_factory.mktemp("slowloris")
    upstream = RawUpstream(Recorder())
    entries = [{"path": "/open", "target": f"{upstream.url}/open", "auth": True,
                "headers": {"Authorization": "bearer os.environ/UPSTREAM_KEY"}}]  # fmt: skip
    env = {"MK": MASTER, "UPSTREAM_KEY": UPSTREAM_KEY, "GUNICORN_CMD_ARGS": "--log-level debug"}
    try:
        server = start_gunicorn(write_config(directory, entries, master_key="os.environ/MK"),
                                directory / "gunicorn.log", env)  # fmt: skip
        EVIDENCE.log(server.log)
        try:
            yield Rig(server, port_of(server), workers(server, 1)[0])
        finally:
            server.stop()
    finally:
        upstream.close()


@contextlib.contextmanager
def slow_clients(port: int, count: int, first: bytes, trickle: bytes | None) -> Iterator[list[socket.socket]]:
    """`count` connections that send `first`, then `trickle` every half second (or nothing), until the end."""
    socks: list[socket.socket] = []
    stop = threading.Event()

    def drip() -> None:
        for _ in range(240):  # two minutes at most
            if stop.wait(0.5):
                return
            for sock in list(socks):
                with contextlib.suppress(OSError):
                    sock.sendall(trickle)  # type: ignore[arg-type]

    dripper = threading.Thread(target=drip, daemon=True)
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            socks.append(sock)
            if first:
                sock.sendall(first)
        if trickle is not None:
            dripper.start()
        yield socks
    finally:
        stop.set()
        if dripper.is_alive():
            dripper.join(5)
        for sock in socks:
            sock.close()


def normal(rig: Rig, label: str, timeout: float) -> Reply:
    return EVIDENCE.answer(label, exchange(rig.port, NORMAL, timeout=timeout))


def test_idle_connections_are_parked_and_then_closed(rig: Rig) -> None:
    """More connections than threads that never send a byte: a normal request waits at most gunicorn's first-data
    window, and every idle connection is closed by the worker within about two of them plus `keepalive`."""
    with slow_clients(rig.port, THREADS + 16, b"", None) as idle:
        reply = normal(rig, "normal beside idle connections", timeout=DEFAULT_WORKER_DATA_TIMEOUT + 3)
        assert reply.status == 200, reply
        assert reply.seconds < DEFAULT_WORKER_DATA_TIMEOUT + 2, reply.seconds
        reply = normal(rig, "normal beside parked connections", timeout=5)
        assert reply.status == 200 and reply.seconds < 1, reply
        deadline = time.monotonic() + 2 * DEFAULT_WORKER_DATA_TIMEOUT + KEEPALIVE + 8
        for sock in idle:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            assert sock.recv(1) == b"", "an idle connection got an answer"  # closed (a timeout fails the test)
    assert workers(rig.server, 1) == [rig.worker]


def test_slow_heads_on_fewer_connections_than_threads_leave_the_worker_serving(rig: Rig) -> None:
    with slow_clients(rig.port, THREADS - 16, SLOW_HEAD, b"X-Slow: x\r\n"):
        time.sleep(1)
        for i in range(3):
            reply = normal(rig, f"normal beside slow heads {i}", timeout=5)
            assert reply.status == 200 and reply.seconds < 1, reply
            time.sleep(0.5)
    assert workers(rig.server, 1) == [rig.worker]


def test_slow_heads_on_every_thread_pin_the_worker_until_they_go(rig: Rig) -> None:
    """The limit the nginx front exists for (tests/abuse/README.md), measured so that a change shows."""
    with slow_clients(rig.port, THREADS, SLOW_HEAD, None) as slow:
        # Past gunicorn's first-data window and its keepalive: no timer of gunicorn's applies to these reads.
        time.sleep(max(DEFAULT_WORKER_DATA_TIMEOUT, KEEPALIVE) + 1)
        with socket.create_connection(("127.0.0.1", rig.port), timeout=5) as waiting:
            waiting.sendall(NORMAL)
            waiting.settimeout(2)
            with pytest.raises(TimeoutError):
                waiting.recv(1)
                pytest.fail("answered while every thread held a slow head: the limit documented in "
                            "tests/abuse/README.md is gone; update it and this test")  # fmt: skip
            for sock in slow[:8]:  # a few slow clients go: their threads are free, the waiting request is served
                sock.close()
            waiting.settimeout(3)
            data = b""
            while piece := waiting.recv(65536):
                data += piece
            EVIDENCE.answers.append(("normal after slow heads went", data))
    assert data.startswith(b"HTTP/1.1 200 "), data[:200]
    assert workers(rig.server, 1) == [rig.worker]


def test_nginx_in_front_takes_slow_heads_off_the_worker(rig: Rig, tmp_path: Path) -> None:
    """deploy/nginx.conf as shipped: nginx reads whole heads itself (client_header_timeout) before it opens a
    connection to passthru, so more slow clients than passthru has threads cost passthru nothing."""
    from test_deploy import nginx_binary, require, start_nginx

    require(nginx_binary() is not None, "nginx", "apt-get install -y nginx-light")
    nginx = start_nginx(tmp_path / "nginx", rig.port)
    for name in ("access.log", "error.log", "stderr.log"):
        EVIDENCE.log(nginx.directory / name)
    try:
        front = int(nginx.url.rsplit(":", 1)[1])
        with slow_clients(front, THREADS + 36, SLOW_HEAD, b"X-Slow: x\r\n"):
            time.sleep(1)
            for i in range(3):
                reply = EVIDENCE.answer(f"normal through nginx {i}", exchange(front, NORMAL, timeout=5))
                assert reply.status == 200 and reply.seconds < 1, reply
                time.sleep(0.5)
    finally:
        nginx.stop()
    assert workers(rig.server, 1) == [rig.worker]


def test_no_secret_in_any_answer_or_log(rig: Rig) -> None:
    """Runs last in this module."""
    assert EVIDENCE.leaks([MASTER, UPSTREAM_KEY]) == []
    assert "Traceback" not in rig.server.output()
