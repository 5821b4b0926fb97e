"""Prometheus metrics, summed across gunicorn workers by prometheus_client's multiprocess mode.

Multiprocess mode is on when PROMETHEUS_MULTIPROC_DIR is set before this module is imported (deploy/gunicorn.conf.py
sets it in the master and empties it at start); without it (`flask run`, tests) the process's own registry is used.
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

from flask import Blueprint, Response, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import REGISTRY as PROCESS_REGISTRY
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from passthru.auth import Authenticator
from passthru.config import ALL_METHODS
from passthru.exchange import Exchange, of

# A metrics file starts with 4 bytes saying how much of it is used, then 4 of padding (prometheus_client's layout).
_HEADER_BYTES = 8
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

REQUESTS = Counter("passthru_requests", "Requests answered", ["route", "method", "status"])
DURATION = Histogram(
    "passthru_request_duration_seconds", "Time to the answer's last byte", ["route"], buckets=LATENCY_BUCKETS
)
UPSTREAM_LATENCY = Histogram(
    "passthru_upstream_latency_seconds", "Time until the upstream's headers arrived", ["route"],
    buckets=LATENCY_BUCKETS,
)  # fmt: skip
BYTES_IN = Counter("passthru_request_body_bytes", "Request body bytes read from callers", ["route"])
BYTES_OUT = Counter("passthru_response_body_bytes", "Response body bytes sent to callers", ["route"])
IN_FLIGHT = Gauge(
    "passthru_streams_in_flight", "Upstream answers being relayed now", ["route"], multiprocess_mode="livesum"
)
UPSTREAM_ERRORS = Counter("passthru_upstream_errors", "Upstream failures", ["route", "kind"])
# Outcomes: answered, a status of the route's retry_on (429, 503, ...), refused, timeout, reset, stale, malformed.
ATTEMPTS = Counter("passthru_upstream_attempts", "Attempts sent upstream", ["route", "target", "outcome"])
COOLDOWNS = Counter("passthru_upstream_cooldowns", "Times a target began to cool down", ["route", "target"])
TOKENS = Counter("passthru_tokens", "Tokens the answers reported", ["route", "model", "kind"])
SPEND = Counter("passthru_spend", "What pass-through calls cost (pricing.py)", ["route"])
# Calls refused with 429, by the limit that refused them: a route's rpm_limit or max_parallel_requests, or a key's
# (key_rpm_limit, key_tpm_limit, key_max_parallel_requests). Five values at most: refusals cannot grow the series.
LIMITED = Counter("passthru_limited", "Calls refused by a rate limit (429)", ["route", "limit"])
# reason: queue_full (the collector is slower than the calls) or export_failed (down, refusing, or out of time).
SPANS_DROPPED = Counter("passthru_trace_spans_dropped", "Spans not exported (otel.py)", ["reason"])


# Label values come from callers too (any method name on any path): anything else is counted as "other", so a
# caller cannot grow the number of series without bound.
METHODS = frozenset(ALL_METHODS)
# Models are named by answers, so by upstreams and callers: those in model_prices always have their own series, the
# first MODELS others a worker sees too, and the rest count as "other".
MODELS = 50
_models: set[str] = set()


@lru_cache(maxsize=1024)
def _series(route: str, method: str, status_class: str) -> tuple[Any, Any, Any, Any, Any]:
    """The labelled series of one kind of request, looked up once (labels() costs a lock and a dict each time)."""
    return (
        REQUESTS.labels(route, method, status_class),
        DURATION.labels(route),
        UPSTREAM_LATENCY.labels(route),
        BYTES_OUT.labels(route),
        BYTES_IN.labels(route),
    )


@lru_cache(maxsize=256)
def in_flight(route: str) -> Any:
    """The in-flight gauge of one route (looked up once)."""
    return IN_FLIGHT.labels(route)


@lru_cache(maxsize=1024)
def attempts(route: str, target: str, outcome: str) -> Any:
    """The attempts counter of one route, target and outcome (looked up once; the labels are the config's)."""
    return ATTEMPTS.labels(route, target, outcome)


def record(exchange: Exchange) -> None:
    """Count one finished exchange (called once, when its answer has been sent or cut off)."""
    method = exchange.method
    requests, duration, upstream, bytes_out, bytes_in = _series(
        exchange.route, method if method in METHODS else "other", f"{exchange.status // 100}xx"
    )
    requests.inc()
    duration.observe(exchange.seconds)
    if exchange.upstream_seconds is not None:
        upstream.observe(exchange.upstream_seconds)
    if exchange.sent:
        bytes_out.inc(exchange.sent)
    received = exchange.received
    if received:
        bytes_in.inc(received)
    if exchange.pricing is None:
        return
    usage = exchange.usage
    if usage is not None:
        tokens_in, tokens_out = _tokens(exchange.route, _model(exchange.model, exchange.pricing.models))
        tokens_in.inc(usage.prompt_tokens)
        tokens_out.inc(usage.completion_tokens)
    if exchange.spend:
        _spend(exchange.route).inc(exchange.spend)


def _model(model: str | None, priced: Mapping[str, object]) -> str:
    """The model's label: its name when priced or among the first MODELS seen, else "other"."""
    if model is None:
        return "unknown"
    if model in priced or model in _models:
        return model
    if len(_models) < MODELS:
        _models.add(model)  # threads may add a few past MODELS at once: bounded all the same
        return model
    return "other"


@lru_cache(maxsize=1024)
def _tokens(route: str, model: str) -> tuple[Any, Any]:
    return TOKENS.labels(route, model, "input"), TOKENS.labels(route, model, "output")


@lru_cache(maxsize=256)
def _spend(route: str) -> Any:
    return SPEND.labels(route)


def limited(route: str, limit: str) -> None:
    """Count a call refused by a limit (errors.RateLimited.limit)."""
    LIMITED.labels(route, limit).inc()


def labelled(blueprint: Blueprint) -> Blueprint:
    """Count the blueprint's requests under their own path (/metrics, /health, /key/generate), not as unmatched."""

    @blueprint.before_request
    def label() -> None:
        if request.url_rule is not None:
            of(request.environ).route = request.url_rule.rule

    return blueprint


def build_blueprint(authenticator: Authenticator | None, metrics_dir: str | None) -> Blueprint:
    """GET /metrics in Prometheus text format, summed over every worker's files in `metrics_dir` (gunicorn), else
    this process's own; behind the master key when an authenticator is given (metrics_require_auth)."""
    blueprint = Blueprint("metrics", __name__)
    registry = registry_of(metrics_dir)

    @blueprint.get("/metrics")
    def metrics() -> Response:
        if authenticator is not None:
            authenticator.require_master(request.environ)
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)

    return blueprint


def registry_of(metrics_dir: str | None) -> CollectorRegistry:
    """Where the samples are read: every worker's files in `metrics_dir` (gunicorn), else this process's own (the
    /metrics answer, and the admin page's routes)."""
    if metrics_dir is None:
        return PROCESS_REGISTRY
    registry = CollectorRegistry()
    registry.register(_AllWorkers(metrics_dir))  # reads the folder's files at each scrape
    return registry


class _AllWorkers(Collector):
    """prometheus_client's multiprocess collector, minus the files a worker is still creating.

    A worker creates its file, then sizes it (prometheus_client's MmapedDict): a scrape in between would read an
    empty file and fail the whole /metrics answer with a 500. Such a file holds no sample yet; the next scrape
    reads it.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def collect(self) -> Iterable[Metric]:
        files = []
        for path in glob.glob(os.path.join(self.directory, "*.db")):
            with contextlib.suppress(FileNotFoundError):  # a dead worker's live gauge, removed meanwhile
                if os.path.getsize(path) >= _HEADER_BYTES:
                    files.append(path)
        return MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call,no-any-return]
