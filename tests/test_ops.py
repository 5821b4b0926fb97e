"""Running it as a service: health, metrics (across gunicorn workers), request ids, JSON logs."""

from __future__ import annotations

import json
import re
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


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in text.splitlines():
        match = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if match and match.group(1) == name:
            found = ",".join(sorted((match.group(2) or "").split(",")))
            if all(part in found.split(",") for part in wanted.split(",") if part):
                total += float(match.group(3))
    return total


def scrape(base: str) -> str:
    return requests.get(f"{base}/metrics").text


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


def test_request_id_round_trip(serve: Serve, upstream: Upstream) -> None:
    base = serve([{"path": "/e", "target": f"{upstream.url}/echo"}])
    response = requests.get(f"{base}/e", headers={"x-request-id": "req-abc.123"})
    assert response.headers["x-request-id"] == "req-abc.123"
    assert response.headers["x-litellm-call-id"] == "req-abc.123"
    assert upstream.requests[-1].header("x-request-id") == "req-abc.123"
    # An id that does not look like one is replaced, and the new one is used everywhere.
    response = requests.get(f"{base}/e", headers={"x-request-id": "bad id\twith spaces"})
    fresh = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", fresh) and response.headers["x-litellm-call-id"] == fresh
    assert upstream.requests[-1].header("x-request-id") == fresh
    # Errors answered by passthru itself carry the id too.
    assert requests.get(f"{base}/nowhere").headers["x-request-id"]


def test_upstream_request_id_is_kept_under_its_own_name(serve: Serve, upstream: Upstream) -> None:
    base = serve([{"path": "/own", "target": f"{upstream.url}/headers?x-request-id=upstream-id-42"},
                  {"path": "/same", "target": f"{upstream.url}/headers?x-request-id=mine"},
                  {"path": "/none", "target": f"{upstream.url}/headers"}])  # fmt: skip
    response = requests.get(f"{base}/own", headers={"x-request-id": "mine"})
    assert upstream.requests[-1].header("x-request-id") == "mine"
    assert response.headers["x-request-id"] == response.headers["x-litellm-call-id"] == "mine"
    assert response.headers["x-upstream-request-id"] == "upstream-id-42"
    # An upstream that echoes our id, or sends none, has nothing of its own to keep.
    for path in ("/same", "/none"):
        response = requests.get(f"{base}{path}", headers={"x-request-id": "mine"})
        assert response.headers["x-request-id"] == "mine"
        assert "x-upstream-request-id" not in response.headers, path


def test_metrics_single_process(serve: Serve, upstream: Upstream) -> None:
    base = serve([{"path": "/metered", "target": f"{upstream.url}/echo"}])
    before = metric(requests.get(f"{base}/metrics").text, "passthru_requests_total", route="/metered")
    for _ in range(3):
        requests.post(f"{base}/metered", data=b"x" * 100)
    labels = {"route": "/metered", "status": "2xx", "method": "POST"}
    assert wait_until(lambda: metric(scrape(base), "passthru_requests_total", **labels) == before + 3, 5)
    text = scrape(base)
    assert metric(text, "passthru_request_body_bytes_total", route="/metered") >= 300
    assert metric(text, "passthru_upstream_latency_seconds_count", route="/metered") >= 3


def test_metrics_can_require_the_master_key(serve: Serve, upstream: Upstream) -> None:
    base = serve([{"path": "/e", "target": f"{upstream.url}/echo"}], master_key="sk-m", metrics_require_auth=True)
    assert requests.get(f"{base}/metrics").status_code == 401
    assert requests.get(f"{base}/metrics", headers={"Authorization": "Bearer sk-m"}).status_code == 200


def test_metrics_total_across_gunicorn_workers(gunicorn: Callable[..., Gunicorn], upstream: Upstream) -> None:
    server = gunicorn([{"path": "/m", "target": f"{upstream.url}/echo"}], workers=3)
    for _ in range(30):  # a new connection each: they spread over the workers
        assert requests.get(f"{server.url}/m").status_code == 200
    assert wait_until(lambda: metric(scrape(server.url), "passthru_requests_total", route="/m") == 30, 5)

    def scrapers() -> set[str]:
        return {line.split("[")[1] for line in server.output().splitlines() if "GET /metrics 200" in line}

    # Whichever worker answers the scrape, it reports the total of all of them. The kernel decides which worker
    # accepts each new connection: scrape until two different ones have answered (bounded).
    for n in range(60):
        assert metric(scrape(server.url), "passthru_requests_total", route="/m", status="2xx") == 30
        if n >= 11 and len(scrapers()) >= 2:
            break
    assert wait_until(lambda: len(scrapers()) >= 2, 5)  # the scrapes above were answered by more than one worker
    requests.get(f"{server.url}/m?x=1")
    assert wait_until(
        lambda: metric(requests.get(f"{server.url}/metrics").text, "passthru_requests_total", route="/m") == 31,
        5,
    )


def test_upstream_errors_are_counted_by_kind(serve: Serve, upstream: Upstream) -> None:
    base = serve(
        [
            {"path": "/slow", "target": f"{upstream.url}/stall?phase=headers&seconds=3", "timeout": 0.3},
            {"path": "/reset", "target": f"{upstream.url}/reset?phase=headers"},
        ]
    )
    before = scrape(base)
    assert requests.get(f"{base}/slow").status_code == 504
    assert requests.get(f"{base}/reset").status_code == 502
    after = scrape(base)
    for route, kind in (("/slow", "timeout"), ("/reset", "reset")):
        labels = {"route": route, "kind": kind}
        assert (
            metric(after, "passthru_upstream_errors_total", **labels)
            == metric(before, "passthru_upstream_errors_total", **labels) + 1
        )


def test_request_id_in_every_log_line_about_the_request(gunicorn: Callable[..., Gunicorn], upstream: Upstream) -> None:
    server = gunicorn([{"path": "/r", "target": f"{upstream.url}/reset?phase=headers"}])
    assert requests.get(f"{server.url}/r", headers={"x-request-id": "trace-77"}).status_code == 502
    # The upstream's failure is logged when it happens, the access line when the answer is done.
    assert wait_until(lambda: "GET /r 502" in server.output() and "upstream reset on /r" in server.output(), 5)
    lines = [line for line in server.output().splitlines() if "GET /r 502" in line or "upstream reset on /r" in line]
    assert len(lines) == 2
    assert all("[trace-77]" in line for line in lines), lines


def test_json_logs_parse(gunicorn: Callable[..., Gunicorn], upstream: Upstream) -> None:
    server = gunicorn([{"path": "/e", "target": f"{upstream.url}/echo"}], env={"JSON_LOGS": "true"})
    requests.get(f"{server.url}/e/x")  # 404
    response = requests.get(f"{server.url}/e", headers={"x-request-id": "json-1"})
    assert response.status_code == 200
    assert wait_until(lambda: "json-1" in server.output(), 5)
    lines = [line for line in server.output().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line, gunicorn's own included
    access = [e for e in entries if e.get("request_id") == "json-1"]
    assert access and access[-1]["status"] == 200 and access[-1]["path"] == "/e" and access[-1]["method"] == "GET"
    assert any(e["logger"] == "gunicorn.error" for e in entries)


def test_metric_labels_stay_bounded(serve: Serve, upstream: Upstream) -> None:
    base = serve([{"path": "/e", "target": f"{upstream.url}/echo"}])
    for method in ("BREW", "WHEN", "PROPFIND"):
        requests.request(method, f"{base}/nowhere-{method}")
    # A request is counted when the server closes its answer, just after the caller has read it.
    assert wait_until(lambda: metric(scrape(base), "passthru_requests_total", route="(none)", method="other") >= 3, 5)
    text = scrape(base)
    assert 'method="BREW"' not in text and "nowhere" not in text


def test_built_in_paths_are_counted_under_their_own_path(serve: Serve, upstream: Upstream, tmp_path: Path) -> None:
    base = serve([{"path": "/e", "target": f"{upstream.url}/echo"}], master_key="sk-m",
                 database_url=f"sqlite:///{tmp_path / 'keys.db'}")  # fmt: skip
    # One process's registry, shared by every app the tests build: the counts are compared, not read.
    series = {"/health/liveliness": "2xx", "/key/info": "4xx", "(none)": "2xx"}
    before = scrape(base)
    requests.get(f"{base}/health/liveliness")
    requests.get(f"{base}/key/info")  # 401 without the master key: still the key API's request

    def counted(text: str, route: str) -> float:
        return metric(text, "passthru_requests_total", route=route, status=series[route], method="GET")

    assert wait_until(lambda: counted(scrape(base), "/key/info") == counted(before, "/key/info") + 1, 5)
    after = scrape(base)
    assert counted(after, "/health/liveliness") == counted(before, "/health/liveliness") + 1
    assert counted(after, "(none)") == counted(before, "(none)")  # the scrapes are /metrics's own
    assert metric(after, "passthru_requests_total", route="/metrics") > metric(before, "passthru_requests_total",
                                                                               route="/metrics")  # fmt: skip


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
