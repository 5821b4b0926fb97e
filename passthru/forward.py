"""The hot path: send the caller's request upstream, to another of the route's targets after a failed attempt, and
hand the answer that counts to the relay.

What is sent (target, headers, body) is built by upstream_request.py, which target is tried is targets.py's pick,
and the answer is relayed by relay.py; this module's Forwarder owns the attempts and upstream failures turned into
our errors. Nothing here reads a body whole: only a failed attempt's small answer is read, and dropped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import urllib3
from werkzeug.wrappers import Response

from passthru import metrics
from passthru.config import Endpoint
from passthru.errors import RequestError, UpstreamError, UpstreamTimeout
from passthru.exchange import Exchange
from passthru.pools import StaleConnection, new_session
from passthru.relay import UpstreamBody, UpstreamResponse, chain, describe, response_headers
from passthru.targets import retry_after
from passthru.upstream_request import (
    CallerBody,
    Route,
    compile_route,
    request_body,
    upstream_headers,
    upstream_target,
)
from passthru.usage import response_cost
from passthru.usage_tap import tap_for

log = logging.getLogger("passthru")

# A failed attempt's answer is never relayed: read and dropped when it is this small and comes this soon, so that
# its connection can serve again; otherwise its connection is closed. Dropping an answer never holds a call long.
DISCARD_BYTES = 64 * 1024
DISCARD_SECONDS = 1.0
RETRY_AFTER_STATUSES = (429, 503)  # the statuses whose Retry-After says when the upstream takes calls again


class Forwarder:
    """The transport of one worker: its Session, whose adapter holds the pooled connections (TLS verified as requests
    verifies it); each route compiled once, with its targets' pools and its rotation; and every call's attempts,
    their failures turned into passthru's errors."""

    def __init__(self, endpoints: Sequence[Endpoint], trusted_proxy: Callable[[str], bool]) -> None:
        self.session = new_session(len({urlsplit(t.url).netloc for endpoint in endpoints for t in endpoint.targets}))
        self.routes = {endpoint.path: compile_route(endpoint, self.session, trusted_proxy) for endpoint in endpoints}

    def route(self, endpoint: Endpoint) -> Route:
        """The endpoint compiled for the hot path, bound to its targets' pools in this worker's Session."""
        return self.routes[endpoint.path]

    def cooling(self) -> dict[str, list[tuple[str, float]]]:
        """Each route's targets by name, with the seconds of cooldown each has left in this worker."""
        return {
            path: list(zip([d.name for d in route.destinations], route.rotation.cooling(), strict=True))
            for path, route in self.routes.items()
        }

    def forward(
        self, route: Route, subpath: str | None, exchange: Exchange, environ: dict[str, Any], drop: frozenset[str]
    ) -> Response:
        """Send the caller's request upstream and return the answer that counts, streaming, as a WSGI response."""
        body, length = request_body(environ, route.retry_body_limit)
        exchange.body = body
        method = environ["REQUEST_METHOD"]
        started = time.perf_counter()
        upstream = _attempts(route, subpath, exchange, environ, drop, body, length)
        exchange.upstream_seconds = time.perf_counter() - started
        if body is not None:
            body.settle()  # no attempt follows
        path, target, status = route.label, exchange.target or "", upstream.status
        try:
            relayed = response_headers(upstream.headers)
        except UpstreamError:
            upstream.close()  # the answer cannot be relayed: neither can this connection carry another one
            upstream.release_conn()
            metrics.UPSTREAM_ERRORS.labels(path, "malformed").inc()
            metrics.attempts(path, target, "malformed").inc()
            log.warning("upstream %s on %s answered with a header that cannot be relayed", target, path)
            raise
        metrics.attempts(path, target, str(status) if status in route.retry_on else "answered").inc()
        bodiless = method == "HEAD" or status in (204, 304) or status < 200
        headers_in = upstream.headers
        exchange.response_cost = response_cost(headers_in)
        if not bodiless:
            exchange.tap = tap_for(headers_in.get("Content-Type"), headers_in.get("Content-Encoding"), None)
        relay = UpstreamBody(upstream, bodiless, path, exchange.tap)
        response = UpstreamResponse(relay, status=status, headers=relayed, direct_passthrough=True)
        # For HEAD/204/304 werkzeug never iterates the body; for the rest the server closes it. Either way: freed.
        response.call_on_close(relay.close)
        return response


def _attempts(
    route: Route,
    subpath: str | None,
    exchange: Exchange,
    environ: dict[str, Any],
    drop: frozenset[str],
    body: CallerBody | None,
    length: str | None,
) -> urllib3.BaseHTTPResponse:
    """Attempts until one is answered with a status outside retry_on, or none is left: that answer (its target's
    name is the exchange's `target`).

    After a failed attempt the next goes to another target (the rotation's pick) while num_retries lasts and the
    body can be sent again; a kept-alive connection that broke before answering gets one more attempt, on top.
    """
    rotation, path = route.rotation, route.label
    retries, stale_retry = route.num_retries, True
    tried: tuple[int, ...] = ()
    method, query = environ["REQUEST_METHOD"], environ.get("QUERY_STRING", "")
    index = rotation.pick()
    while True:
        destination = route.destinations[index]
        exchange.target = destination.name
        exchange.attempts += 1
        headers = upstream_headers(route, destination, environ, drop, exchange.request_id)
        if length is not None:
            headers["Content-Length"] = length
        target = upstream_target(route, destination, subpath, query)
        exchange.trace.attempt(headers, destination.pool, target, destination.name)  # its traceparent; its span
        try:
            # No retries by urllib3 (this loop decides), no redirects (relayed, not followed), nothing decoded or
            # preloaded: the answer is relayed as it arrives, and its connection released when the body is done.
            upstream = destination.pool.urlopen(
                method,
                target,
                body=body,  # type: ignore[arg-type]  # urllib3 only calls body.read()
                headers=headers,
                retries=False,
                redirect=False,
                assert_same_host=False,
                timeout=route.timeout,
                preload_content=False,
                decode_content=False,
                release_conn=False,
                chunked=body is not None and length is None,
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            exchange.trace.failed(exc)
            if body is not None and body.broken:
                raise RequestError("the request body broke off or was malformed") from exc
            kind = _kind(exc)
            metrics.UPSTREAM_ERRORS.labels(path, kind).inc()
            if kind == "reset" and stale_retry and _kept_alive(exc) and _rewind(body):
                # The same target again: the upstream most likely closed an idle connection and never saw this.
                stale_retry = False
                metrics.attempts(path, destination.name, "stale").inc()
                log.info("kept-alive connection to %s on %s closed before answering; sending again",
                         destination.name, path)  # fmt: skip
                continue
            metrics.attempts(path, destination.name, kind).inc()
            _failed(route, index, None)
            if not (retries and _rewind(body)):
                log.warning("upstream %s on %s from %s: %s", kind, path, destination.name, describe(exc))
                if kind == "timeout":
                    raise UpstreamTimeout(f"the upstream did not answer within {route.seconds:g}s") from exc
                raise UpstreamError("the upstream could not be reached or broke the connection") from exc
            log.warning("upstream %s on %s from %s (%s); trying again", kind, path, destination.name, describe(exc))
        else:
            status = upstream.status
            exchange.trace.answered(status)
            if log.isEnabledFor(logging.DEBUG):  # --detailed_debug: names and sizes only, never a header value
                log.debug(
                    "forward %s %s -> %s%s (%s, attempt %d) headers=[%s] request_length=%s -> %s response_length=%s",
                    method, path, destination.shown, f" +/{subpath}" if subpath else "", destination.name,
                    exchange.attempts, ", ".join(headers), length or ("chunked" if body is not None else 0), status,
                    upstream.headers.get("Content-Length", "chunked/close"),
                )  # fmt: skip
            if status not in route.retry_on:
                rotation.succeeded(index)
                return upstream
            wait = retry_after(upstream.headers.get("Retry-After")) if status in RETRY_AFTER_STATUSES else None
            _failed(route, index, wait)
            if not (retries and _rewind(body)):
                return upstream  # relayed as it is: the last failure is the caller's answer
            metrics.attempts(path, destination.name, str(status)).inc()
            log.warning("upstream on %s from %s answered %d; trying again", path, destination.name, status)
            exchange.trace.dropped()
            _discard(upstream)
        retries, tried = retries - 1, (*tried, index)
        index = rotation.pick(tried)


def _kind(exc: BaseException) -> str:
    """What broke an attempt before its answer: refused, timeout or reset."""
    if isinstance(exc, urllib3.exceptions.NewConnectionError):  # before the timeouts: it subclasses one
        return "refused"
    if isinstance(exc, (urllib3.exceptions.TimeoutError, TimeoutError)):
        return "timeout"
    return "reset"


def _kept_alive(exc: BaseException) -> bool:
    """Whether the reset came on a kept-alive connection before any byte of the answer (pools.StaleConnection)."""
    return any(isinstance(link, StaleConnection) for link in chain(exc))


def _rewind(body: CallerBody | None) -> bool:
    """Whether the body can go out again, byte for byte, with the next attempt (and it is made ready to)."""
    return body is None or body.rewind()


def _failed(route: Route, index: int, wait: float | None) -> None:
    """A failed attempt counted against its target; the cooldown it may start, logged and counted."""
    seconds = route.rotation.failed(index, wait)
    if seconds:
        name = route.destinations[index].name
        metrics.COOLDOWNS.labels(route.label, name).inc()
        log.warning("target %s of %s cools down for %gs in this worker", name, route.label, seconds)


def _discard(upstream: urllib3.BaseHTTPResponse) -> None:
    """A failed attempt's answer, never relayed: read away when it is small and framed by a Content-Length (its
    connection then serves again), else closed with its connection. Either way bounded in bytes and time."""
    left = upstream.length_remaining
    sock = getattr(upstream.connection, "sock", None)
    if left is not None and left <= DISCARD_BYTES and sock is not None:
        sock.settimeout(DISCARD_SECONDS)  # the next request on this connection sets its own again (urllib3)
        upstream.drain_conn()  # a read that fails closes the connection
    else:
        upstream.close()
    upstream.release_conn()
