"""/metrics: each series the README lists, counted across gunicorn workers, with bounded labels."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from conftest import Gunicorn
from upstream import Upstream, wait_until

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
    return requests.get(f"{base}/metrics", timeout=10).text


def plant_requests(directory: Path, route: str, count: int) -> None:
    """Write a metrics file into `directory` as a gunicorn worker would: `count` answered requests on `route`."""
    code = (
        "from prometheus_client import Counter\n"
        "counter = Counter('passthru_requests', '', ['route', 'method', 'status'])\n"
        f"counter.labels({route!r}, 'GET', '2xx').inc({count})"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=30)


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


def test_a_scrape_while_a_worker_creates_its_file_is_answered(
    serve: Serve, upstream: Upstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker creates its metrics file, then sizes it: a scrape that finds it empty still answers, from the rest."""
    directory = tmp_path / "metrics"
    directory.mkdir()
    plant_requests(directory, "/planted", 7)
    (directory / "counter_4242.db").touch()  # created by a worker that has not sized it yet
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    response = requests.get(f"{serve([])}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert metric(response.text, "passthru_requests_total", route="/planted") == 7
