"""Running it as a service: health and readiness, passthru's own paths, the start-up warning (metrics: test_metrics.py;
request ids and log lines: test_logs.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from conftest import Gunicorn
from upstream import Upstream, wait_until

from passthru.app import create_app
from passthru.config import parse_settings
from passthru.errors import ConfigError, KeyStoreError
from passthru.keys import SqlKeyStore

Serve = Callable[..., str]


def test_health_paths(serve: Serve, upstream: Upstream) -> None:
    base = serve([{"path": "/e", "target": f"{upstream.url}/echo", "headers": {"X": "secret-value-123"}}])
    assert requests.get(f"{base}/health/liveliness").json() == "I'm alive!"
    for path in ("/health/readiness", "/health"):
        body = requests.get(f"{base}{path}").json()
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
    assert requests.get(f"{server.url}/open").status_code == 200
    assert server.output().count("route /open injects secrets from the environment") == 1
    assert "wk-secret-0042" not in server.output()


def test_readiness_reports_the_key_store(serve: Serve, upstream: Upstream, tmp_path: Path) -> None:
    entry = {"path": "/e", "target": f"{upstream.url}/echo"}
    ready = serve([entry], master_key="sk-ready-1", database_url=f"sqlite:///{tmp_path / 'keys.db'}")
    body = requests.get(f"{ready}/health/readiness").json()
    assert (body["status"], body["db"]) == ("healthy", "connected")
    assert requests.get(f"{serve([entry])}/health/readiness").json()["db"] == "not configured"


def test_readiness_is_503_when_the_key_store_is_unreachable(
    upstream: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = parse_settings(
        {"general_settings": {"master_key": "sk-ready-2", "database_url": f"sqlite:///{tmp_path / 'k.db'}",
                              "pass_through_endpoints": [{"path": "/e", "target": f"{upstream.url}/echo"}]}},
        "cfg.yaml", {},
    )  # fmt: skip
    client = create_app(settings).test_client()

    def unreachable(self: object) -> None:
        raise KeyStoreError("the key store is unavailable; try again shortly")

    monkeypatch.setattr(SqlKeyStore, "ping", unreachable)  # the store went away after start-up
    answer = client.get("/health/readiness")
    assert answer.status_code == 503
    assert answer.get_json()["db"] == "unreachable"
    assert client.get("/health/liveliness").status_code == 200
