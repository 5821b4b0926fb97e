"""/metrics: each series the README lists, counted across gunicorn workers, with bounded labels."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from conftest import Gunicorn
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
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
    before = metric(requests.get(f"{base}/metrics", timeout=10).text, "passthru_requests_total", route="/metered")
    for _ in range(3):
        requests.post(f"{base}/metered", data=b"x" * 100, timeout=10)
    labels = {"route": "/metered", "status": "2xx", "method": "POST"}
    assert wait_until(lambda: metric(scrape(base), "passthru_requests_total", **labels) == before + 3, 5)
    text = scrape(base)
    assert metric(text, "passthru_request_body_bytes_total", route="/metered") >= 300
    assert metric(text, "passthru_upstream_latency_seconds_count", route="/metered") >= 3


def test_metrics_can_require_the_master_key(serve: Serve, upstream: Upstream) -> None:
    base = serve([{"path": "/e", "target": f"{upstream.url}/echo"}], master_key="sk-m", metrics_require_auth=True)
    assert requests.get(f"{base}/metrics", timeout=10).status_code == 401
    assert requests.get(f"{base}/metrics", headers={"Authorization": "Bearer sk-m"}, timeout=10).status_code == 200


def test_metrics_total_across_gunicorn_workers(gunicorn: Callable[..., Gunicorn], upstream: Upstream) -> None:
    server = gunicorn([{"path": "/m", "target": f"{upstream.url}/echo"}], workers=3)
    for _ in range(30):  # a new connection each: they spread over the workers
        assert requests.get(f"{server.url}/m", timeout=10).status_code == 200
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
    requests.get(f"{server.url}/m?x=1", timeout=10)
    assert wait_until(
        lambda: (
            metric(requests.get(f"{server.url}/metrics", timeout=10).text, "passthru_requests_total", route="/m") == 31
        ),
        5,
    )


KINDS = ("refused", "timeout", "reset", "malformed")


@pytest.mark.parametrize(
    ("kind", "target", "status"),
    [
        pytest.param("refused", None, 502, id="refused"),  # None: a port bound and never listening
        pytest.param("timeout", "/stall?phase=headers&seconds=3", 504, id="timeout"),
        pytest.param("reset", "/reset?phase=headers", 502, id="reset"),
        pytest.param("malformed", "/headers?X-Evil=a%01b", 502, id="malformed"),  # a header no server can write
    ],
)
def test_upstream_errors_are_counted_by_kind(
    serve: Serve, upstream: Upstream, kind: str, target: str | None, status: int
) -> None:
    route = f"/errors-{kind}"  # one process's registry, shared by the tests: a route of its own
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/x" if target is None else f"{upstream.url}{target}"
        base = serve([{"path": route, "target": url, "timeout": 0.3}])
        before = scrape(base)
        assert requests.get(f"{base}{route}", timeout=10).status_code == status
        after = scrape(base)
    for each in KINDS:  # counted once, under its own kind only
        labels = {"route": route, "kind": each}
        delta = metric(after, "passthru_upstream_errors_total", **labels) - metric(
            before, "passthru_upstream_errors_total", **labels
        )
        assert delta == (1 if each == kind else 0), each


def test_metric_labels_stay_bounded(serve: Serve, upstream: Upstream) -> None:
    base = serve([{"path": "/e", "target": f"{upstream.url}/echo"}])
    for method in ("BREW", "WHEN", "PROPFIND"):
        requests.request(method, f"{base}/nowhere-{method}", timeout=10)
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
    requests.get(f"{base}/health/liveliness", timeout=10)
    requests.get(f"{base}/key/info", timeout=10)  # 401 without the master key: still the key API's request

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


def test_request_duration_runs_to_the_last_byte(serve: Serve, upstream: Upstream) -> None:
    """Three events 0.3 s apart: the headers come at once (upstream latency), the answer ends 0.6 s later."""
    base = serve([{"path": "/timed", "target": f"{upstream.url}/sse?n=3&gap=0.3"}])
    before = scrape(base)
    assert requests.get(f"{base}/timed", timeout=10).text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"

    def delta(name: str, **labels: str) -> float:
        return metric(scrape(base), name, route="/timed", **labels) - metric(before, name, route="/timed", **labels)

    # Recorded when the server closes the answer, just after the client has read it.
    assert wait_until(lambda: delta("passthru_request_duration_seconds_count") == 1, 5)
    assert 0.55 <= delta("passthru_request_duration_seconds_sum") < 5
    assert delta("passthru_request_duration_seconds_bucket", le="0.5") == 0
    assert delta("passthru_request_duration_seconds_bucket", le="1.0") == 1
    assert delta("passthru_upstream_latency_seconds_sum") < 0.3  # the headers, not the body
    assert delta("passthru_upstream_latency_seconds_bucket", le="0.25") == 1


def test_response_body_bytes_are_counted_as_sent(serve: Serve, upstream: Upstream) -> None:
    base = serve([{"path": "/sized", "target": f"{upstream.url}/bytes", "include_subpath": True}])
    before = metric(scrape(base), "passthru_response_body_bytes_total", route="/sized")
    assert len(requests.get(f"{base}/sized?size=12345", timeout=10).content) == 12345
    assert len(requests.get(f"{base}/sized?size=1000&framing=chunked", timeout=10).content) == 1000
    requests.head(f"{base}/sized?size=5000", timeout=10)  # no body: nothing sent

    def counted() -> float:
        return metric(scrape(base), "passthru_response_body_bytes_total", route="/sized") - before

    assert wait_until(lambda: counted() >= 13345, 5)
    assert counted() == 13345


def test_streams_in_flight_while_an_answer_is_relayed(serve: Serve, upstream: Upstream) -> None:
    base = serve([{"path": "/stream", "target": f"{upstream.url}/sse?n=5&gap=0.3"}])

    def in_flight() -> float:
        return metric(scrape(base), "passthru_streams_in_flight", route="/stream")

    assert in_flight() == 0
    with requests.get(f"{base}/stream", stream=True, timeout=10) as response:
        events = response.iter_lines()
        assert next(events) == b"data: 0"
        assert in_flight() == 1  # headers sent, the body still coming
        assert [line for line in events if line] == [b"data: 1", b"data: 2", b"data: 3", b"data: 4"]
    assert wait_until(lambda: in_flight() == 0, 5)


def test_counters_of_an_earlier_run_are_emptied_at_start(
    gunicorn: Callable[..., Gunicorn], upstream: Upstream, tmp_path: Path
) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    plant_requests(directory, "/earlier-run", 1000)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    earlier = generate_latest(registry).decode()
    assert metric(earlier, "passthru_requests_total", route="/earlier-run") == 1000  # it would be summed in
    server = gunicorn(
        [{"path": "/e", "target": f"{upstream.url}/echo"}], env={"PROMETHEUS_MULTIPROC_DIR": str(directory)}
    )
    assert requests.get(f"{server.url}/e", timeout=10).status_code == 200
    assert wait_until(lambda: metric(scrape(server.url), "passthru_requests_total", route="/e") == 1, 5)
    assert "/earlier-run" not in scrape(server.url)
