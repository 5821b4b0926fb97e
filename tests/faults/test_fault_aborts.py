"""Clients that walk away: 200 downloads and 200 uploads aborted midway leave no upstream socket open, no file
descriptor behind in the worker, no exception in the log, and a worker that serves the next call byte for byte.

tests/test_gunicorn.py (`test_client_aborts_close_their_upstream_connections`) covers 20 aborted downloads;
here it is 200 of each direction, half of them ended with a TCP reset instead of a FIN, and the worker's own
descriptors are counted too.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import socket
import struct
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Gunicorn, start_gunicorn, write_config
from upstream import Upstream, pattern_bytes, start_upstream, wait_until
from wire import MiB, open_fds, port_of, workers

ABORTS = 200


@dataclass
class Rig:
    server: Gunicorn
    upstream: Upstream  # its own, so that every upstream socket counted belongs to this gunicorn
    worker: int
    fds: int  # the worker's open descriptors after warming up, with one upstream connection pooled


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    directory: Path = tmp_path_factory.mktemp("aborts")
    own = start_upstream()
    try:
        entries = [{"path": "/bytes", "target": f"{own.url}/bytes", "timeout": 10},
                   {"path": "/upload", "target": f"{own.url}/echo", "timeout": 10}]  # fmt: skip
        server = start_gunicorn(write_config(directory, entries), directory / "gunicorn.log",
                                env={"GUNICORN_CMD_ARGS": "--log-level debug"})  # fmt: skip
        try:
            _download_and_upload_one(server)
            assert wait_until(lambda: own.open_connections() == 1, 5), own.open_connections()
            worker = workers(server, 1)[0]
            yield Rig(server, own, worker, open_fds(worker))
        finally:
            server.stop()
    finally:
        own.stop()


def _download_and_upload_one(server: Gunicorn) -> None:
    """One whole exchange each way, checked byte for byte: what the worker must still do after the aborts."""
    with closing(http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=10)) as conn:
        conn.request("GET", "/bytes?size=300000")
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, pattern_bytes(300000))
        body = b"u" * 300000
        conn.request("POST", "/upload", body=body, headers={"Content-Length": str(len(body))})
        resp = conn.getresponse()
        echo = json.loads(resp.read())
        assert resp.status == 200
        assert (echo["body_len"], echo["body_sha256"]) == (len(body), hashlib.sha256(body).hexdigest())


def _abort(sock: socket.socket, i: int) -> None:
    """Every other abort is a TCP reset (linger 0) rather than a FIN, as a killed client sends."""
    if i % 2:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _assert_nothing_left(rig: Rig) -> None:
    # Every aborted exchange closed its upstream connection; none went back to the pool half-done.
    assert wait_until(lambda: rig.upstream.open_connections() == 0, 10), rig.upstream.open_connections()
    assert workers(rig.server, 1) == [rig.worker]  # the same worker, never restarted
    # Closed on passthru's side too: no descriptor kept (the pooled connection of the baseline was closed too).
    assert wait_until(lambda: open_fds(rig.worker) <= rig.fds, 5), (open_fds(rig.worker), rig.fds)
    _download_and_upload_one(rig.server)
    log = rig.server.output()
    for noise in ("Traceback", "[ERROR]", "[WARNING]", " ERROR ", " WARNING "):
        assert noise not in log, noise


def _statuses(rig: Rig, request: str) -> Counter[str]:
    """The statuses of the access lines for `request` ("GET /bytes"): written once each exchange is over."""
    return Counter(re.findall(rf"passthru: {request} (\d+) ", rig.server.output()))


def test_200_downloads_aborted_midway(rig: Rig) -> None:
    for i in range(ABORTS):
        sock = socket.create_connection(("127.0.0.1", port_of(rig.server)), timeout=10)
        try:
            sock.sendall(b"GET /bytes?size=%d HTTP/1.1\r\nHost: t\r\n\r\n" % (100 * MiB))
            got = b""
            while len(got) < 256 * 1024:  # well into the body, with megabytes still to come
                piece = sock.recv(65536)
                assert piece, "passthru closed before sending any body"
                got += piece
            assert got.startswith(b"HTTP/1.1 200 ")
        finally:
            _abort(sock, i)
    _assert_nothing_left(rig)
    statuses = _statuses(rig, "GET /bytes")
    assert set(statuses) == {"200"} and statuses["200"] >= ABORTS, statuses  # each logged once it was cut


def test_200_uploads_aborted_midway(rig: Rig) -> None:
    piece = b"u" * 65536
    for i in range(ABORTS):
        sock = socket.create_connection(("127.0.0.1", port_of(rig.server)), timeout=10)
        try:
            if i % 4 < 2:  # a declared 100 MiB, or chunked: 256 KiB sent either way, then gone
                sock.sendall(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (100 * MiB))
                for _ in range(4):
                    sock.sendall(piece)
            else:
                sock.sendall(b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
                for _ in range(4):
                    sock.sendall(b"10000\r\n" + piece + b"\r\n")
        finally:
            _abort(sock, i)
    _assert_nothing_left(rig)
    # The caller's fault, a 400 (answered to no one): never blamed on the upstream as a 502. A reset that arrives
    # before gunicorn read the request head leaves no request at all, so the FIN-ended half is the floor.
    statuses = _statuses(rig, "POST /upload")
    assert set(statuses) == {"200", "400"} and statuses["400"] >= ABORTS // 2, statuses
    assert rig.upstream.requests[-1].body_len == 300000  # only the whole upload after the aborts arrived
    assert all(r.target != "/echo" or r.body_len == 300000 for r in rig.upstream.requests)
