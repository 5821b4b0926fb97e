"""A real OTLP/HTTP collector on 127.0.0.1 for tests: each POST /v1/traces decoded with opentelemetry-proto, its spans
kept as plain records. It can answer late, as a collector that is slow."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

KINDS = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT"}


@dataclass(frozen=True)
class Span:
    """One span as the collector got it."""

    name: str
    kind: str
    trace_id: str  # hex
    span_id: str
    parent_id: str  # "" for a root span
    attributes: dict[str, Any]
    events: tuple[tuple[str, int], ...]  # (name, time in ns)
    start: int  # ns since the epoch
    end: int
    error: bool  # status code ERROR
    resource: dict[str, Any]
    scope: str


def _value(value: AnyValue) -> Any:
    return getattr(value, value.WhichOneof("value") or "string_value")


def decode(body: bytes) -> list[Span]:
    """The spans of one ExportTraceServiceRequest."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(Span(
                    span.name, KINDS.get(span.kind, str(span.kind)), span.trace_id.hex(), span.span_id.hex(),
                    span.parent_span_id.hex(), {kv.key: _value(kv.value) for kv in span.attributes},
                    tuple((event.name, event.time_unix_nano) for event in span.events), span.start_time_unix_nano,
                    span.end_time_unix_nano, span.status.code == 2, resource, scope_spans.scope.name,
                ))  # fmt: skip
    return spans


class Collector:
    """An OTLP/HTTP receiver on a free port; `delay` seconds before each answer (a slow collector)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.spans: list[Span] = []
        self.headers: list[dict[str, str]] = []  # of each export request
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802  # http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                time.sleep(collector.delay)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                collector.headers.append({k.lower(): v for k, v in self.headers.items()})
                collector.spans.extend(decode(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
