"""otel.py and otel_batches.py: spans exported over OTLP/HTTP to a real collector on loopback (tests/rig/otlp.py
decodes them with opentelemetry-proto) — their parent/child links, their attributes and never a secret in them; a
collector that is down or slow costs spans, counted and logged once, never a call; gunicorn workers export after
the fork and flush on reload and stop."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import Gunicorn, importable, require
from prometheus_client import REGISTRY
from test_attempts import refusing
from test_deploy import processes, require_gevent
from upstream import Answer, Upstream, wait_until

FIXTURES = Path(__file__).parent / "fixtures" / "usage"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
MASTER = "sk-master-otel-1234"
SECRET = "upstream-secret-5678"  # injected from the environment into a header, the target's query and its path
TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])")
Traced = Callable[..., str]


@pytest.fixture(autouse=True)
def _otel_installed() -> None:
    require(importable("opentelemetry.sdk") and importable("opentelemetry.exporter.otlp.proto.http"),
            "the OpenTelemetry packages", "pip install -r requirements-otel.txt")  # fmt: skip


@pytest.fixture
def collector() -> Iterator[Any]:
    from otlp import Collector  # after the check above: the rig decodes with opentelemetry-proto

    started = Collector()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def traced(serve: Callable[..., str], monkeypatch: pytest.MonkeyPatch) -> Traced:
    """traced(entries, environ, **general) → the URL of passthru (conftest's serve) with these OTEL_* variables;
    it exports every 50 ms unless told."""

    def start(entries: list[dict[str, Any]], environ: dict[str, str], **general: Any) -> str:
        for name, value in {"OTEL_BSP_SCHEDULE_DELAY": "50", **environ}.items():
            monkeypatch.setenv(name, value)
        return serve(entries, **general)

    return start


def by_kind(spans: list[Any], kind: str) -> list[Any]:
    return [span for span in spans if span.kind == kind]


def no_secret_in(spans: list[Any], *secrets: str) -> None:
    for span in spans:
        texts = [span.name, *map(str, span.attributes.values()), *map(str, span.resource.values())]
        texts += [event for event, _ in span.events]
        for secret in secrets:
            assert not any(secret in text for text in texts), (secret, span)


def test_a_continued_trace_is_exported_with_its_links(traced: Traced, collector: Any, upstream: Upstream) -> None:
    base = traced([{"path": "/e", "target": f"{upstream.url}/echo", "include_subpath": True}],
                     {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url})  # fmt: skip
    headers = {
        "traceparent": f"00-{TRACE}-{PARENT}-01",
        "x-request-id": "otel-1",
        "user-agent": "tester/1",
        "x-forwarded-for": "10.6.6.6, 203.0.113.7",  # from 127.0.0.1, a trusted front by default: its last address
    }
    response = requests.post(f"{base}/e/sub?stream=1", json={"model": "m"}, headers=headers, timeout=10)
    assert wait_until(lambda: len(collector.spans) == 2, 5), collector.spans
    (server,), (client,) = by_kind(collector.spans, "SERVER"), by_kind(collector.spans, "CLIENT")
    back = TRACEPARENT.fullmatch(response.headers["traceparent"])
    sent = TRACEPARENT.fullmatch(upstream.requests[-1].header("traceparent") or "")
    assert back and sent
    assert server.trace_id == client.trace_id == TRACE
    assert (server.parent_id, server.span_id) == (PARENT, back[2])  # under the caller's span; the one it was told
    assert (client.parent_id, client.span_id) == (server.span_id, sent[2])  # the upstream's parent is the attempt
    assert server.name == "POST /e" and client.name == "POST" and not server.error and not client.error
    assert server.attributes == {
        "http.request.method": "POST", "http.route": "/e", "url.path": "/e/sub", "url.scheme": "http",
        "http.response.status_code": 200, "client.address": "203.0.113.7", "user_agent.original": "tester/1",
        "passthru.request_id": "otel-1",
    }  # fmt: skip
    port = int(upstream.url.rsplit(":", 1)[1])
    assert client.attributes == {
        "http.request.method": "POST", "server.address": "127.0.0.1", "server.port": port,
        "url.full": f"http://127.0.0.1:{port}/echo/sub?stream=***", "http.response.status_code": 200,
        "passthru.target": f"127.0.0.1:{port}",  # the target's default name: its host
        "gen_ai.request.model": "m", "gen_ai.response.model": "m",
    }  # fmt: skip
    assert server.start <= client.start < client.end <= server.end
    (first_byte,) = client.events
    assert first_byte[0] == "passthru.first_byte" and client.start < first_byte[1] <= client.end
    assert server.resource["service.name"] == "passthru" and server.scope == "passthru"


def test_gen_ai_usage_and_time_to_first_byte(traced: Traced, collector: Any, upstream: Upstream) -> None:
    upstream.answers["chat"] = Answer("application/json", (FIXTURES / "openai_chat.json").read_bytes())
    upstream.answers["stream"] = Answer("text/event-stream", (FIXTURES / "openai_chat_stream.sse").read_bytes(),
                                        stream=True)  # fmt: skip
    base = traced([{"path": "/chat", "target": f"{upstream.url}/answer/chat"},
                      {"path": "/stream", "target": f"{upstream.url}/answer/stream?gap=0.2"}],
                     {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{collector.url}/v1/traces"})  # fmt: skip
    requests.post(f"{base}/chat", json={"model": "gpt-4o"}, timeout=10)
    assert wait_until(lambda: len(collector.spans) == 2, 5)
    (client,) = by_kind(collector.spans, "CLIENT")
    assert {k: v for k, v in client.attributes.items() if k.startswith("gen_ai.")} == {
        "gen_ai.request.model": "gpt-4o", "gen_ai.response.model": "gpt-4o-2024-08-06",
        "gen_ai.usage.input_tokens": 1117, "gen_ai.usage.output_tokens": 46,
    }  # fmt: skip
    collector.spans.clear()
    requests.post(f"{base}/stream", json={"model": "gpt-4o-mini", "stream": True}, timeout=10)
    assert wait_until(lambda: len(collector.spans) == 2, 5)
    (client,) = by_kind(collector.spans, "CLIENT")
    (first_byte,) = client.events
    # The first event went out at once, the rest 0.2 s apart: the span runs to the last, well after the first byte.
    assert client.start < first_byte[1] < client.end - 0.3e9, client
    assert client.attributes["gen_ai.usage.output_tokens"] > 0


def test_sampling(traced: Traced, collector: Any, upstream: Upstream) -> None:
    """The default sampler (parentbased_always_on) follows a caller's flag and records the traces passthru starts."""
    base = traced([{"path": "/e", "target": f"{upstream.url}/echo"}], {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url})
    unsampled = requests.get(f"{base}/e", headers={"traceparent": f"00-{TRACE}-{PARENT}-00"}, timeout=10)
    started = requests.get(f"{base}/e", timeout=10)
    assert wait_until(lambda: len(collector.spans) == 2, 5)
    time.sleep(0.2)
    assert {span.trace_id for span in collector.spans} == {TRACEPARENT.fullmatch(started.headers["traceparent"])[1]}  # type: ignore[index]
    assert unsampled.headers["traceparent"].endswith("-00") and started.headers["traceparent"].endswith("-01")
    assert (upstream.requests[0].header("traceparent") or "").endswith("-00")
    assert (upstream.requests[1].header("traceparent") or "").endswith("-01")


def test_span_names_statuses_and_errors(traced: Traced, collector: Any, upstream: Upstream) -> None:
    refused = f"http://127.0.0.1:{upstream_port_closed()}"
    base = traced([{"path": "/e", "target": f"{upstream.url}/echo"},
                      {"path": "/teapot", "target": f"{upstream.url}/status/418"},
                      {"path": "/down", "target": refused}],
                     {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url})  # fmt: skip
    for method, path, status in [("GET", "/nowhere", 404), ("BREW", "/e", 405), ("GET", "/teapot", 418),
                                 ("GET", "/down", 502), ("GET", "/health", 200)]:  # fmt: skip
        assert requests.request(method, f"{base}{path}", timeout=10).status_code == status
    assert wait_until(lambda: len(collector.spans) == 7, 5), collector.spans
    servers = {span.attributes["url.path"]: span for span in by_kind(collector.spans, "SERVER")}
    clients = {span.attributes["url.full"].rsplit("/", 1)[1]: span for span in by_kind(collector.spans, "CLIENT")}
    assert servers["/nowhere"].name == "GET" and "http.route" not in servers["/nowhere"].attributes
    # A method no route serves is refused (405) before any route is chosen.
    assert (servers["/e"].name, servers["/e"].attributes["http.request.method_original"]) == ("HTTP", "BREW")
    assert servers["/health"].name == "GET /health" and not clients.keys() & {"health"}
    assert not servers["/teapot"].error and clients["418"].error  # a 4xx is the caller's, not the server's
    assert clients["418"].attributes["error.type"] == "418"
    assert servers["/down"].error and servers["/down"].attributes["error.type"] == "502"
    (down,) = [
        span for span in by_kind(collector.spans, "CLIENT") if "http.response.status_code" not in span.attributes
    ]
    assert down.error and down.attributes["error.type"] == "NewConnectionError"


def upstream_port_closed() -> int:
    from conftest import free_port

    return free_port()


def test_no_secret_in_any_span(
    traced: Traced, collector: Any, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UPSTREAM_SECRET", SECRET)
    route = {"path": "/e", "target": f"{upstream.url}/os.environ/UPSTREAM_SECRET/x?key=os.environ/UPSTREAM_SECRET",
             "headers": {"Authorization": "Bearer os.environ/UPSTREAM_SECRET"}, "auth": True,
             "forward_headers": True}  # fmt: skip
    base = traced([route], {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url}, master_key=MASTER)
    virtual = "sk-callers-own-key-in-the-path"
    headers = {"Authorization": f"Bearer {MASTER}", "user-agent": f"agent {MASTER}", "x-request-id": "id-1"}
    assert requests.post(f"{base}/e?api_key={MASTER}", data=b"{}", headers=headers, timeout=10).status_code == 200
    requests.get(f"{base}/nowhere/{virtual}", headers={"user-agent": virtual}, timeout=10)
    assert wait_until(lambda: len(collector.spans) == 3, 5)
    no_secret_in(collector.spans, SECRET, MASTER, virtual)
    (client,) = by_kind(collector.spans, "CLIENT")
    assert client.attributes["url.full"].endswith("/***/x?key=***&api_key=***")
    for span in collector.spans:
        assert not {"authorization", "http.request.header.authorization"} & set(span.attributes)


def test_a_collector_down_costs_spans_never_calls(
    traced: Traced, upstream: Upstream, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    port = upstream_port_closed()
    base = traced([{"path": "/e", "target": f"{upstream.url}/echo"}],
                     {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_BSP_MAX_QUEUE_SIZE": "8",
                      "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "4", "OTEL_EXPORTER_OTLP_TIMEOUT": "1000"})  # fmt: skip
    before = {reason: dropped(reason) for reason in ("queue_full", "export_failed")}
    took = timed_calls(base, 60)
    assert max(took) < 1.0, took
    assert wait_until(lambda: dropped("export_failed") > before["export_failed"], 5)
    assert dropped("queue_full") > before["queue_full"]  # 60 calls' spans, 8 at most queued while exports fail
    seen = ""

    def said() -> list[str]:
        nonlocal seen
        seen += capsys.readouterr().err
        return [line for line in seen.splitlines() if "spans not exported" in line]

    assert wait_until(lambda: len(said()) == 1, 5), seen
    timed_calls(base, 20)  # more lost spans within the minute: no second line
    time.sleep(1.5)
    (line,) = said()
    assert f"to http://127.0.0.1:{port}/v1/traces" in line and "export_failed" in line
    assert "the last failure: ConnectionError: " in line and "Connection refused" in line, line
    # The exporter's own lines (one per failed batch, one per retry) are kept in, whatever the handlers of the root.
    assert not [record for record in caplog.records if record.name.startswith("opentelemetry")]
    assert "opentelemetry" not in seen


def test_a_collector_that_answers_after_10_s_costs_no_call(traced: Traced, upstream: Upstream) -> None:
    from otlp import Collector

    slow = Collector(delay=10.0)
    try:
        base = traced([{"path": "/e", "target": f"{upstream.url}/echo"}],
                         {"OTEL_EXPORTER_OTLP_ENDPOINT": slow.url, "OTEL_BSP_MAX_QUEUE_SIZE": "8",
                          "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "2"})  # fmt: skip
        before = dropped("queue_full")
        took = timed_calls(base, 60)
        assert max(took) < 1.0 and sum(took) < 10, took
        assert dropped("queue_full") > before
    finally:
        slow.stop()


def timed_calls(base: str, count: int) -> list[float]:
    took = []
    for _ in range(count):
        started = time.monotonic()
        assert requests.get(f"{base}/e", timeout=10).status_code == 200
        took.append(time.monotonic() - started)
    return took


def dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("passthru_trace_spans_dropped_total", {"reason": reason}) or 0.0


@pytest.mark.parametrize("conf", ["deploy/gunicorn.conf.py", "deploy/gunicorn.gevent.conf.py"])
def test_gunicorn_workers_export_after_the_fork_and_flush_on_reload_and_stop(
    gunicorn: Callable[..., Gunicorn], collector: Any, upstream: Upstream, conf: str
) -> None:
    """Two workers, each exporting its own spans (process.pid); spans still queued (the export interval is a minute)
    reach the collector when a reload stops the old workers, and when gunicorn stops."""
    if "gevent" in conf:
        require_gevent()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "60000",
           "OTEL_SERVICE_NAME": "gateway", "UPSTREAM_SECRET": SECRET}  # fmt: skip
    route = {"path": "/e", "target": f"{upstream.url}/echo?k=os.environ/UPSTREAM_SECRET", "auth": True,
             "headers": {"x-api-key": "os.environ/UPSTREAM_SECRET"}}  # fmt: skip
    server = gunicorn([route], env=env, workers=2, conf=conf, master_key=MASTER)
    headers = {"Authorization": f"Bearer {MASTER}", "traceparent": f"00-{TRACE}-{PARENT}-01"}
    answers = [requests.get(f"{server.url}/e", headers=headers, timeout=10) for _ in range(6)]
    assert all(answer.status_code == 200 for answer in answers)
    time.sleep(0.5)
    assert collector.spans == []  # queued in the workers for a minute yet
    workers = {pid for pid, _, ppid, _ in processes() if ppid == server.process.pid}
    server.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: len(collector.spans) == 12, 15), (collector.spans, server.output())
    requests.get(f"{server.url}/e", headers={"Authorization": f"Bearer {MASTER}"}, timeout=10)  # a new worker's
    server.stop()
    assert wait_until(lambda: len(collector.spans) == 14, 5), server.output()
    spans = collector.spans
    assert {span.resource["process.pid"] for span in spans[:12]} <= workers
    assert server.process.pid not in {span.resource["process.pid"] for span in spans}
    assert {span.resource["service.name"] for span in spans} == {"gateway"}
    for answer in answers:
        own = TRACEPARENT.fullmatch(answer.headers["traceparent"])
        assert own is not None
        (mine,) = [span for span in spans if span.span_id == own[2]]
        (child,) = [span for span in spans if span.parent_id == own[2]]
        assert (mine.kind, mine.parent_id, mine.trace_id, child.kind) == ("SERVER", PARENT, TRACE, "CLIENT")
    no_secret_in(spans, SECRET, MASTER)


def test_a_failover_is_a_client_span_per_attempt(traced: Traced, collector: Any, upstream: Upstream) -> None:
    """A route with several targets (issue 15): the refused attempt and the one whose 503 was dropped end when they
    failed; each attempt after the first is a resend; each upstream got its own attempt's span id as parent."""
    with refusing() as down:
        route = {"path": "/f", "num_retries": 2, "targets": [
            {"url": down, "name": "first", "order": 1},
            {"url": f"{upstream.url}/status/503", "name": "second", "order": 2},
            {"url": f"{upstream.url}/echo", "name": "third", "order": 3}]}  # fmt: skip
        base = traced([route], {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url})
        assert requests.post(f"{base}/f", json={}, timeout=10).status_code == 200
        assert wait_until(lambda: len(collector.spans) == 4, 5), collector.spans
    (server,) = by_kind(collector.spans, "SERVER")
    attempts = sorted(by_kind(collector.spans, "CLIENT"), key=lambda span: span.start)
    assert [span.attributes["passthru.target"] for span in attempts] == ["first", "second", "third"]
    assert [span.attributes.get("http.request.resend_count") for span in attempts] == [None, 1, 2]
    assert [span.attributes.get("error.type") for span in attempts] == ["NewConnectionError", "503", None]
    assert [span.attributes.get("http.response.status_code") for span in attempts] == [None, 503, 200]
    assert attempts[0].end <= attempts[1].start and attempts[1].end <= attempts[2].start
    assert attempts[2].end == server.end and {span.parent_id for span in attempts} == {server.span_id}
    sent = [TRACEPARENT.fullmatch(got.header("traceparent") or "") for got in upstream.requests]
    assert [match[2] for match in sent if match] == [attempts[1].span_id, attempts[2].span_id]


def test_each_attempt_is_a_client_span_and_later_ones_are_resends(collector: Any) -> None:
    """What an attempt loop across targets (issue 15) gives: a failed attempt ends when it fails, the next one is
    a resend, each with its target's name; the last one ends with the answer."""
    import urllib3

    from passthru.exchange import Exchange
    from passthru.otel import Export
    from passthru.otel_settings import OtelSettings
    from passthru.tracing import Sampler

    settings = OtelSettings(f"{collector.url}/v1/traces", "shown", (), None, Sampler(1.0, True), 5.0, 0.05, 100, 10)
    export = Export(settings, frozenset(), lambda peer: False)
    try:
        trace = export.begin({"REMOTE_ADDR": "10.0.0.1", "HTTP_X_FORWARDED_FOR": "203.0.113.9"})
        exchange = Exchange("POST", "/r", "id-9", time.perf_counter(), trace, route="/r", status=200)
        pool = urllib3.HTTPSConnectionPool("api.example", 8443)
        trace.attempt({}, pool, "/v1/x", name="primary")
        trace.failed(ConnectionResetError())
        trace.attempt({}, pool, "/v1/x", name="fallback")
        trace.answered(200)
        exchange.seconds = time.perf_counter() - exchange.started
        export.record(exchange)
        assert wait_until(lambda: len(collector.spans) == 3, 5)
    finally:
        export.close()
    (server,) = by_kind(collector.spans, "SERVER")
    first, second = sorted(by_kind(collector.spans, "CLIENT"), key=lambda span: span.start)
    assert server.attributes["client.address"] == "10.0.0.1"  # X-Forwarded-For from a peer not trusted: ignored
    assert first.attributes == {"http.request.method": "POST", "server.address": "api.example", "server.port": 8443,
                                "url.full": "https://api.example:8443/v1/x", "passthru.target": "primary",
                                "error.type": "ConnectionResetError"}  # fmt: skip
    assert first.error and first.end <= second.start and second.end == server.end
    assert second.attributes["http.request.resend_count"] == 1 and second.attributes["passthru.target"] == "fallback"
    assert first.parent_id == second.parent_id == server.span_id != first.span_id != second.span_id
