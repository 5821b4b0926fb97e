"""Running it as a service: health and readiness, passthru's own paths, the start-up warning (metrics: test_metrics.py;
request ids and log lines: test_logs.py)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from conftest import Gunicorn
from upstream import Upstream, wait_until

from passthru.config import parse_settings
from passthru.errors import ConfigError

Serve = Callable[..., str]


def test_health_paths(serve: Serve, upstream: Upstream) -> None:
    base = serve([{"path": "/e", "target": f"{upstream.url}/echo", "headers": {"X": "secret-value-123"}}])
    assert requests.get(f"{base}/health/liveliness", timeout=10).json() == "I'm alive!"
    for path in ("/health/readiness", "/health"):
        body = requests.get(f"{base}{path}", timeout=10).json()
        assert body["status"] == "healthy" and body["routes"] == 1 and body["version"]
        assert upstream.url not in json.dumps(body) and "secret-value-123" not in json.dumps(body)


@pytest.mark.parametrize(
    ("entry", "clash"),
    [
        pytest.param({"path": "/metrics"}, "/metrics", id="exact"),
        pytest.param({"path": "/health", "include_subpath": True}, "/health", id="prefix"),
        pytest.param({"path": "/", "include_subpath": True}, "/health", id="catch-all"),
    ],
)
def test_built_in_paths_cannot_be_taken(entry: dict[str, object], clash: str) -> None:
    raw = {"general_settings": {"pass_through_endpoints": [{"target": "http://a.test", **entry}]}}
    with pytest.raises(ConfigError, match=f"path: clashes with passthru's built-in route {clash}"):
        parse_settings(raw, "cfg.yaml", {})


def test_start_up_warning_is_said_once(gunicorn: Callable[..., Gunicorn], upstream: Upstream,
                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("WARN_KEY", "wk-secret-0042")
    route = {"path": "/open", "target": f"{upstream.url}/echo", "headers": {"Authorization": "os.environ/WARN_KEY"}}
    server = gunicorn([route], workers=3)
    assert wait_until(lambda: server.output().count("Booting worker") == 3, 10)
    assert requests.get(f"{server.url}/open", timeout=10).status_code == 200
    assert server.output().count("route /open injects secrets from the environment") == 1
    assert "wk-secret-0042" not in server.output()


def test_readiness_reports_the_key_store(serve: Serve, upstream: Upstream, tmp_path: Path) -> None:
    entry = {"path": "/e", "target": f"{upstream.url}/echo"}
    ready = serve([entry], master_key="sk-ready-1", database_url=f"sqlite:///{tmp_path / 'keys.db'}")
    body = requests.get(f"{ready}/health/readiness", timeout=10).json()
    assert (body["status"], body["db"]) == ("healthy", "connected")
    assert requests.get(f"{serve([entry])}/health/readiness", timeout=10).json()["db"] == "not configured"


def test_readiness_is_503_when_the_key_store_cannot_be_reached(serve: Serve, upstream: Upstream) -> None:
    """A real PostgreSQL URL whose port refuses connections (bound, never listening): not ready, and says why."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        base = serve([{"path": "/e", "target": f"{upstream.url}/echo"}], master_key="sk-ready-2",
                     database_url=f"postgresql://postgres:pw-ready-2@127.0.0.1:{port}/test")  # fmt: skip
        for _ in range(2):  # the second probe comes within the cool-off after a failed opening: 503 at once
            answer = requests.get(f"{base}/health/readiness", timeout=30)
            assert answer.status_code == 503
            assert (answer.json()["status"], answer.json()["db"]) == ("unhealthy", "unreachable")
            assert "pw-ready-2" not in answer.text and str(port) not in answer.text
        assert requests.get(f"{base}/health/liveliness", timeout=10).status_code == 200


class Relay:
    """A TCP relay from a port on 127.0.0.1 to `target`, that can be cut: the listener and every relayed
    connection closed at once, as when a database server goes away."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.live: list[socket.socket] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection(self.target, timeout=5)
            server.settimeout(None)
            client.settimeout(None)
            with self.lock:
                self.live += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.stop.set()
        self.listener.close()
        self.acceptor.join(5)
        with self.lock:
            for sock in self.live:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


def test_readiness_is_503_once_the_key_store_goes_away(postgres_url: str, serve: Serve, upstream: Upstream) -> None:
    """A real PostgreSQL reached through a relay: ready while it answers, 503 once the relay is cut."""
    relay = Relay(("127.0.0.1", 5432))
    try:
        url = postgres_url.replace("@127.0.0.1:5432/", f"@127.0.0.1:{relay.port}/")
        base = serve([{"path": "/e", "target": f"{upstream.url}/echo"}], master_key="sk-ready-3", database_url=url)
        answer = requests.get(f"{base}/health/readiness", timeout=30)
        assert (answer.status_code, answer.json()["db"]) == (200, "connected"), answer.text
        relay.cut()  # the store goes away after start-up, with connections open in the pool
        answer = requests.get(f"{base}/health/readiness", timeout=30)
        assert answer.status_code == 503
        assert (answer.json()["status"], answer.json()["db"]) == ("unhealthy", "unreachable")
        assert requests.get(f"{base}/health/liveliness", timeout=10).status_code == 200
    finally:
        relay.cut()
