"""One Exchange per request: made when the request arrives, filled in by the stages it passes, finished once when its
answer's body is done (or the client went away). Each owner then records its own part from it: the call's slots let go
of (limits.release), the usage and spend (pricing.meter), metrics, the key store's spend entry, the heap trim, the
exported spans, the access line — bound at start-up in app.py, in that order. Its trace (tracing.py) is begun with it,
and its answer names passthru's span.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from passthru.logs import REQUEST_IDS, log, printable
from passthru.tracing import Trace

if TYPE_CHECKING:
    from passthru.limits import Held
    from passthru.pricing import Pricing
    from passthru.usage import Usage
    from passthru.usage_tap import Tap

ENVIRON_KEY = "passthru.exchange"
UNMATCHED = "(none)"  # the route of requests that matched no route
# A caller's x-request-id is kept when it looks like an id; anything else (long, spaces, control) is replaced.
SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
# Set by passthru on every answer, in place of the upstream's: the request id (under LiteLLM's name too), and the
# traceparent of passthru's span.
ANSWER_IDS = ("x-request-id", "x-litellm-call-id", "traceparent")

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
Begin = Callable[[dict[str, Any]], Trace]  # a request's trace from its environ: tracing.begin, or otel's when exporting


class Counted(Protocol):
    """What the exchange reads of the caller's body (upstream_request.CallerBody): the bytes read from it so far,
    and the first of them, where a JSON request names its model."""

    received: int
    head: bytes


@dataclass(eq=False, slots=True)
class Exchange:
    """One request and its answer, as each stage leaves them; read by the recorders when it is finished."""

    method: str
    path: str  # PATH_INFO, decoded as the WSGI server gives it
    request_id: str
    started: float  # time.perf_counter() at arrival
    trace: Trace  # its trace context: the ids sent upstream and back, its attempts' spans
    route: str = UNMATCHED  # the route's path (or passthru's own path) that served it: the metrics label
    body: Counted | None = None  # the caller's body as it is streamed upstream
    upstream_seconds: float | None = None  # until the headers of the answer that counts arrived, retries included
    target: str | None = None  # the name of the target that answered, or the last one tried
    attempts: int = 0  # attempts sent upstream
    pricing: Pricing | None = None  # the route's prices: set on pass-through calls only, which are metered
    caller: str | None = None  # the token of the key that made the call (the master key's hash for its calls)
    precharged: float = 0.0  # what the key store charged the key at admission
    held: Held | None = None  # the slots the call holds on this host until its answer ends (limits.py)
    tap: Tap | None = None  # reads the usage from a JSON or SSE answer as it is relayed (usage.py)
    response_cost: float | None = None  # the upstream's x-litellm-response-cost
    usage: Usage | None = None  # set when finished (pricing.meter): the tokens the answer reported
    model: str | None = None  # set when finished (pricing.meter): the answer's model, else the request's
    spend: float | None = None  # set when finished (pricing.meter): what the call cost
    status: int = 0  # the answer's status, once started
    length: int | None = None  # the answer's Content-Length, when it has one
    sent: int = 0  # answer body bytes the server took
    first_byte: float | None = None  # time.perf_counter() when the answer's first body byte went out
    complete: bool = False  # the whole answer went out (not cut off by the upstream or the client)
    seconds: float = 0.0  # arrival to the end of the answer, set when finished

    @property
    def received(self) -> int:
        """Request body bytes read from the caller."""
        return 0 if self.body is None else self.body.received


Recorder = Callable[[Exchange], None]


def of(environ: dict[str, Any]) -> Exchange:
    """The exchange of the request this WSGI environ belongs to."""
    exchange: Exchange = environ[ENVIRON_KEY]
    return exchange


class Exchanges:
    """WSGI middleware: an Exchange for each request, with its id; its recorders run once its answer is done."""

    def __init__(self, app: WSGIApp, recorders: tuple[Recorder, ...], begin: Begin) -> None:
        self.app = app
        self.recorders = recorders
        self.begin = begin

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        started = time.perf_counter()
        request_id = environ.get("HTTP_X_REQUEST_ID", "")
        if not SANE_REQUEST_ID.match(request_id):
            # Not uuid4: os.urandom lets go of the GIL, a wait behind every busy thread (random is reseeded per fork).
            request_id = f"{random.getrandbits(128):032x}"
        trace = self.begin(environ)
        method, path = environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", "")
        exchange = Exchange(method, path, request_id, started, trace)
        environ[ENVIRON_KEY] = exchange
        REQUEST_IDS.set((request_id, trace.trace_id))

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            exchange.status = int(status.split(" ", 1)[0])
            ours = [("x-request-id", request_id), ("x-litellm-call-id", request_id),
                    ("traceparent", trace.traceparent())]  # fmt: skip  # so that the caller can find the trace
            for name, value in headers:
                lower = name.lower()
                # The upstream's own id (an API provider's, for its support desk) stays available under a new name.
                if lower == "x-request-id" and value != request_id:
                    ours.append(("x-upstream-request-id", value))
                elif lower == "content-length" and value.isdigit():
                    exchange.length = int(value)
            kept = [(name, value) for name, value in headers if name.lower() not in ANSWER_IDS]
            return start_response(status, kept + ours, exc_info)

        return _Relayed(self.app(environ, start), exchange, self.recorders)


class _Relayed:
    """The answer's body, counted as it goes out; the exchange is finished when the server closes it."""

    def __init__(self, body: Iterable[bytes], exchange: Exchange, recorders: tuple[Recorder, ...]) -> None:
        self.body = body
        self.exchange = exchange
        self.recorders = recorders

    def __iter__(self) -> Iterator[bytes]:
        exchange = self.exchange
        # The call's slots (limits.py) are let go of as its last byte is handed to the server, not once the server is
        # done: a client that sends its next call as soon as it has an answer must find them free. Its last byte is
        # the one that completes the Content-Length; without one, the end comes after the body (a final chunk, or
        # the connection closed), so the body's end is early enough.
        held = exchange.held
        last = exchange.length if held is not None and exchange.length is not None else -1
        for chunk in self.body:
            if not exchange.sent and chunk:
                exchange.first_byte = time.perf_counter()
            exchange.sent += len(chunk)
            if held is not None and exchange.sent >= last >= 0:
                held.release()
            yield chunk
        if held is not None:
            held.release()
        exchange.complete = True

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            exchange = self.exchange
            exchange.seconds = time.perf_counter() - exchange.started
            for record in self.recorders:
                try:
                    record(exchange)
                except Exception as exc:  # the answer is gone; one owner failing must not stop the others
                    log.warning("%s not recorded for %s: %s", getattr(record, "__name__", record),
                                printable(exchange.path), exc, exc_info=log.isEnabledFor(logging.DEBUG))  # fmt: skip
            REQUEST_IDS.set(None)
