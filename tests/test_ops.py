"""Running it as a service: health and readiness, passthru's own paths, the start-up warning (metrics: test_metrics.py;
request ids and log lines: test_logs.py)."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from conftest import Gunicorn, StoreRelay
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
        assert body["targets"] == {"/e": [{"name": upstream.url.removeprefix("http://"), "state": "ok"}]}
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


def test_readiness_is_503_once_the_key_store_goes_away(
    postgres_url: str, store_relay: StoreRelay, serve: Serve, upstream: Upstream
) -> None:
    """A real PostgreSQL reached through a relay: ready while it answers, 503 once the store's host goes dark."""
    url = store_relay.url(postgres_url)
    base = serve([{"path": "/e", "target": f"{upstream.url}/echo"}], master_key="sk-ready-3", database_url=url)
    answer = requests.get(f"{base}/health/readiness", timeout=30)
    assert (answer.status_code, answer.json()["db"]) == (200, "connected"), answer.text
    store_relay.blackhole()  # the store goes away after start-up, with connections open in the pool
    answer = requests.get(f"{base}/health/readiness", timeout=30)
    assert answer.status_code == 503
    assert (answer.json()["status"], answer.json()["db"]) == ("unhealthy", "unreachable")
    assert requests.get(f"{base}/health/liveliness", timeout=10).status_code == 200
