"""The spans a worker has made and not yet exported, and the one thread that exports them in batches.

Request threads only append to a bounded queue: a collector that is down or slow costs spans, never a call's time.
Spans lost (queue full, export failed) are counted in passthru_trace_spans_dropped_total and said in one log line a
minute at most, with why the last export failed; the SDK's exporter would log each failed batch, so its lines are
kept in. The SDK's BatchSpanProcessor would drop a full queue's oldest span without a count; this queue is the spend
log writer's (keystore/spend.py) shape instead. A worker that exits cleanly (stop, reload) exports what it holds.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import deque
from typing import Any

import requests
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult

from passthru import metrics
from passthru.otel_settings import OtelSettings

log = logging.getLogger("passthru")
SAY_EVERY = 60.0  # seconds between two lines about lost spans
EXIT_SECONDS = 5.0  # how long an exiting worker gives its queued spans (within gunicorn's graceful_timeout)


class _Session(requests.Session):
    """The exporter's HTTP session (the SDK takes one), which keeps why its last request failed: the SDK's exporter
    says only that it did."""

    failure: str | None = None

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        try:
            response = super().send(request, **kwargs)
        except requests.RequestException as exc:
            self.failure = f"{type(exc).__name__}: {exc}"  # the URL it names is masked in logs where it is a secret
            raise
        if not response.ok:
            self.failure = f"the collector answered {response.status_code}"
        return response


class SpanBatches:
    """The queue of spans to export and its thread, started with it: in the worker, after gunicorn forked."""

    def __init__(self, settings: OtelSettings) -> None:
        self._session = _Session()
        self.exporter = OTLPSpanExporter(endpoint=settings.endpoint, headers=dict(settings.headers),
                                         timeout=settings.timeout, session=self._session)  # fmt: skip
        self.endpoint_shown = settings.endpoint_shown
        self.queue_size, self.batch_size, self.delay = settings.queue_size, settings.batch_size, settings.delay
        self._queue: deque[ReadableSpan] = deque()  # append and popleft are atomic: no lock needed
        self._wake = threading.Event()
        self._closed = False
        self._lock = threading.Lock()  # guards the drop counts: request threads and the exporting one add to them
        self._dropped: dict[str, int] = {}  # by reason, since the last line about them
        self._said_at = -SAY_EVERY
        sdk = logging.getLogger("opentelemetry.exporter")  # a line per failed batch, and per retry: said here instead
        if not sdk.handlers:
            sdk.addHandler(logging.NullHandler())  # no handler at all would be logging's last resort: stderr
        sdk.propagate = False
        self._thread = threading.Thread(target=self._run, name="passthru-spans", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def add(self, spans: list[ReadableSpan]) -> None:
        """Queue one exchange's spans; drop them (counted) when the queue is full."""
        if len(self._queue) + len(spans) > self.queue_size:
            self._drop(len(spans), "queue_full")
            return
        self._queue.extend(spans)
        if len(self._queue) >= self.batch_size:
            self._wake.set()

    def _run(self) -> None:
        closing = False
        while not closing:
            self._wake.wait(self.delay)
            self._wake.clear()
            closing = self._closed  # read before the round: what was queued when the worker began to exit goes in it
            self._export()

    def _export(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(self.batch_size, len(self._queue)))]
            try:
                result = self.exporter.export(batch)
            except Exception as exc:  # the spans are lost all the same; the thread must go on
                self._session.failure = f"{type(exc).__name__} while exporting"
                result = SpanExportResult.FAILURE
            if result is not SpanExportResult.SUCCESS:
                self._drop(len(batch), "export_failed")
        if self._dropped and time.monotonic() - self._said_at >= SAY_EVERY:
            self._say()

    def _drop(self, count: int, reason: str) -> None:
        metrics.SPANS_DROPPED.labels(reason).inc(count)
        with self._lock:
            self._dropped[reason] = self._dropped.get(reason, 0) + count

    def _say(self) -> None:
        with self._lock:
            dropped, self._dropped = self._dropped, {}
        self._said_at = time.monotonic()
        log.warning("traces: %d spans not exported to %s (%s); the last failure: %s. Said once a minute at most",
                    sum(dropped.values()), self.endpoint_shown,
                    ", ".join(f"{reason} {count}" for reason, count in sorted(dropped.items())),
                    self._session.failure or "none yet: the queue was full")  # fmt: skip

    def close(self, timeout: float = EXIT_SECONDS) -> None:
        """Export what is queued, within `timeout`, then stop: the worker exits, or the app is thrown away."""
        atexit.unregister(self.close)
        self._closed = True
        self._wake.set()
        self._thread.join(timeout)
        self.exporter.shutdown()  # type: ignore[no-untyped-call]  # the SDK leaves it unannotated
        if self._dropped:
            self._say()
