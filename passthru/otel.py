"""Spans exported over OTLP/HTTP with the OpenTelemetry SDK, when export is on; imported only then, so a worker that
does not export never loads the SDK. A request's trace is begun by the sampler (tracing.py); when it is recorded, its
spans are made once the exchange ends, from what the exchange recorded: a SERVER span for the request and a CLIENT
span for each attempt upstream, with the stable HTTP and the GenAI semantic conventions, every text masked as logs
mask it. They wait in a bounded queue for the worker's one exporting thread (otel_batches.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from opentelemetry.sdk.resources import PROCESS_PID, SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from passthru import __version__, tracing
from passthru.exchange import UNMATCHED, Exchange
from passthru.logs import MASK, Redact, printable
from passthru.otel_batches import EXIT_SECONDS, SpanBatches
from passthru.otel_settings import OtelSettings
from passthru.tracing import Trace, UpstreamSpan
from passthru.usage import model_from_prefix

# The HTTP conventions' known methods; any other is "_OTHER", with the method itself in http.request.method_original.
KNOWN_METHODS = frozenset({"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"})
DEFAULT_PORTS = {"http": 80, "https": 443}
FIRST_BYTE = "passthru.first_byte"  # the event at the answer's first body byte: the time to first byte (or token)
SAMPLED = TraceFlags(TraceFlags.SAMPLED)


class Export:
    """This worker's export: each request's trace begun with the sampler; a recorded exchange's spans made when it
    ends, and queued."""

    def __init__(
        self,
        settings: OtelSettings,
        secrets: frozenset[str],
        trusted_proxy: Callable[[str], bool],
    ) -> None:
        self.sampler = settings.sampler
        self.trusted_proxy = trusted_proxy
        self.mask = Redact(secrets).mask
        self.resource = _resource(settings.service_name)
        self.scope = InstrumentationScope("passthru", __version__)
        self.batches = SpanBatches(settings)  # its thread starts here: in the worker, after the fork

    def begin(self, environ: dict[str, Any]) -> Trace:
        """The request's trace, recorded when the sampler says so; then what its server span keeps of the request."""
        trace = tracing.begin(environ, self.sampler)
        if trace.recorded:
            peer = environ.get("REMOTE_ADDR", "")
            forwarded = environ.get("HTTP_X_FORWARDED_FOR") if self.trusted_proxy(peer) else None
            # Behind a trusted front (nginx), the client is the address the front added last: those before it are
            # the client's own claim.
            trace.arrival = {"client.address": forwarded.rsplit(",", 1)[-1].strip() if forwarded else peer,
                             "url.scheme": environ.get("wsgi.url_scheme", "http")}  # fmt: skip
            agent = environ.get("HTTP_USER_AGENT")
            if agent:
                trace.arrival["user_agent.original"] = agent
        return trace

    def record(self, exchange: Exchange) -> None:
        """A finished exchange's spans, queued: the request's SERVER span, and a CLIENT span per attempt upstream."""
        trace = exchange.trace
        if not trace.recorded:
            return
        clock = _Clock()
        ids = int(trace.trace_id, 16)
        own = SpanContext(ids, int(trace.span_id, 16), False, SAMPLED)
        caller = None if trace.parent_id is None else SpanContext(ids, int(trace.parent_id, 16), True, SAMPLED)
        method = exchange.method if exchange.method in KNOWN_METHODS else "_OTHER"
        name = "HTTP" if method == "_OTHER" else method
        attributes: dict[str, Any] = {"http.request.method": method, "url.path": printable(exchange.path),
                                      "passthru.request_id": exchange.request_id, **(trace.arrival or {})}  # fmt: skip
        if method == "_OTHER":
            attributes["http.request.method_original"] = printable(exchange.method)
        if exchange.route != UNMATCHED:
            attributes["http.route"] = exchange.route
            name = f"{name} {exchange.route}"
        if exchange.status:
            attributes["http.response.status_code"] = exchange.status
        failed = exchange.status >= 500  # a server span's errors are its 5xx; a 4xx is the caller's
        if failed:
            attributes["error.type"] = str(exchange.status)
        end = exchange.started + exchange.seconds
        start, stop = clock(exchange.started), clock(end)
        spans = [self._span(name, own, caller, SpanKind.SERVER, attributes, failed, start, stop)]
        for resend, upstream in enumerate(trace.upstream):
            spans.append(self._client(exchange, upstream, resend, own, method, clock, end))
        self.batches.add(spans)

    def _client(self, exchange: Exchange, upstream: UpstreamSpan, resend: int, parent: SpanContext, method: str,
                clock: _Clock, end: float) -> ReadableSpan:  # fmt: skip
        """One attempt's CLIENT span; the attempt whose answer was relayed ends with it, and carries its GenAI usage."""
        pool = upstream.pool
        port = pool.port or DEFAULT_PORTS[pool.scheme]
        url = _url(pool.scheme, pool.host, port, upstream.target)
        attributes: dict[str, Any] = {"http.request.method": method, "server.address": pool.host, "server.port": port,
                                      "url.full": url}  # fmt: skip
        if resend:
            attributes["http.request.resend_count"] = resend
        if upstream.name is not None:
            attributes["passthru.target"] = upstream.name
        error = upstream.error
        if upstream.status is not None:
            attributes["http.response.status_code"] = upstream.status
            if upstream.status >= 400:
                error = str(upstream.status)
        if error is not None:
            attributes["error.type"] = error
        events: tuple[Event, ...] = ()
        if upstream.ended is None:  # the attempt whose answer was relayed
            if exchange.first_byte is not None:
                events = (Event(FIRST_BYTE, timestamp=clock(exchange.first_byte)),)
            attributes.update(_gen_ai(exchange))
        own = SpanContext(parent.trace_id, int(upstream.span_id, 16), False, SAMPLED)
        start, stop = clock(upstream.started), clock(end if upstream.ended is None else upstream.ended)
        return self._span(method, own, parent, SpanKind.CLIENT, attributes, error is not None, start, stop, events)

    def _span(self, name: str, context: SpanContext, parent: SpanContext | None, kind: SpanKind,
              attributes: dict[str, Any], failed: bool, start: int, end: int,
              events: tuple[Event, ...] = ()) -> ReadableSpan:  # fmt: skip
        """A finished span, its texts masked as log lines are. Made whole here, not through the SDK's Tracer: the ids
        and times are passthru's own, taken as the call went, and the span is complete when the exchange ends."""
        masked = {key: self.mask(value) if isinstance(value, str) else value for key, value in attributes.items()}
        return ReadableSpan(
            self.mask(name), context, parent, self.resource, masked, events, (), kind,
            status=Status(StatusCode.ERROR) if failed else Status(StatusCode.UNSET), start_time=start, end_time=end,
            instrumentation_scope=self.scope,
        )  # fmt: skip

    def close(self, timeout: float = EXIT_SECONDS) -> None:
        """Export what is queued, within `timeout`, and stop (an app thrown away; a worker exiting does it itself)."""
        self.batches.close(timeout)


class _Clock:
    """The exchange's times, taken on time.perf_counter() (monotonic), as the wall clock's nanoseconds that spans
    carry: one reading of each clock converts them all."""

    def __init__(self) -> None:
        self.wall, self.now = time.time_ns(), time.perf_counter()

    def __call__(self, moment: float) -> int:
        return self.wall - int((self.now - moment) * 1e9)


def _url(scheme: str, host: str, port: int, target: str) -> str:
    """The attempt's URL, its query's names kept and their values masked (a query may carry a key)."""
    netloc = f"[{host}]" if ":" in host else host
    if port != DEFAULT_PORTS[scheme]:
        netloc = f"{netloc}:{port}"
    path, _, query = target.partition("?")
    if not query:
        return f"{scheme}://{netloc}{path}"
    masked = "&".join(f"{pair.partition('=')[0]}={MASK}" if "=" in pair else pair for pair in query.split("&"))
    return f"{scheme}://{netloc}{path}?{masked}"


def _gen_ai(exchange: Exchange) -> dict[str, Any]:
    """The GenAI conventions' models and token counts of the answer, as pricing.meter read them."""
    found: dict[str, Any] = {}
    body = exchange.body
    requested = model_from_prefix(body.head) if body is not None and body.head else None
    if requested is not None:
        found["gen_ai.request.model"] = requested
    if exchange.model is not None:  # the answer's own, else the request's (pricing.meter)
        found["gen_ai.response.model"] = exchange.model
    if exchange.usage is not None:
        found["gen_ai.usage.input_tokens"] = exchange.usage.prompt_tokens
        found["gen_ai.usage.output_tokens"] = exchange.usage.completion_tokens
    return found


def _resource(service_name: str | None) -> Resource:
    """service.name (the setting, else OTEL_RESOURCE_ATTRIBUTES' as the SDK reads it, else "passthru"), the version,
    and the worker's process id: which worker served a span."""
    attributes: dict[str, Any] = {SERVICE_VERSION: __version__, PROCESS_PID: os.getpid()}
    if service_name is not None:
        attributes[SERVICE_NAME] = service_name
    resource = Resource.create(attributes)
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "passthru"}))
    return resource
