"""The hot path: send the upstream request on the pooled Session and hand the answer to the relay.

What is sent (target, headers, body) is built by upstream_request.py, and the answer is relayed by relay.py; this
module's Forwarder owns the call and upstream failures turned into our errors. Nothing here reads a body whole.
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
from passthru.errors import PassthruError, RequestError, UpstreamError, UpstreamTimeout
from passthru.exchange import Exchange
from passthru.pools import new_session
from passthru.relay import UpstreamBody, UpstreamResponse, describe, response_headers
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


class Forwarder:
    """The transport of one worker: its Session, whose adapter holds the pooled connections (TLS verified as requests
    verifies it); each route's pool, found once; and every call, its failures turned into passthru's errors."""

    def __init__(self, endpoints: Sequence[Endpoint], trusted_proxy: Callable[[str], bool]) -> None:
        self.session = new_session(len({urlsplit(t.url).netloc for endpoint in endpoints for t in endpoint.targets}))
        self.trusted_proxy = trusted_proxy

    def route(self, endpoint: Endpoint) -> Route:
        """The endpoint compiled for the hot path, bound to its target host's pool in this worker's Session."""
        return compile_route(endpoint, self.session, self.trusted_proxy)

    def forward(
        self, route: Route, subpath: str | None, exchange: Exchange, environ: dict[str, Any], drop: frozenset[str]
    ) -> Response:
        """Send the caller's request upstream and return the upstream's answer, streaming, as a WSGI response."""
        body, length = request_body(environ)
        exchange.body = body
        path = route.label
        method = environ["REQUEST_METHOD"]
        target = upstream_target(route, subpath, environ.get("QUERY_STRING", ""))
        headers = upstream_headers(route, environ, drop, exchange.request_id)
        if length is not None:
            headers["Content-Length"] = length
        started = time.perf_counter()
        try:
            # No retries (a body cannot be sent twice), no redirects (relayed, not followed), nothing decoded or
            # preloaded: the answer is relayed as it arrives, and its connection is released when the body is done.
            upstream = route.pool.urlopen(
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
            raise _upstream_failure(exc, body, route) from exc
        exchange.upstream_seconds = time.perf_counter() - started
        status = upstream.status
        if log.isEnabledFor(logging.DEBUG):  # --detailed_debug: names and sizes only, never a header value
            log.debug(
                "forward %s %s -> %s%s headers=[%s] request_length=%s -> %s response_length=%s",
                method, path, route.target_shown, f" +/{subpath}" if subpath else "", ", ".join(headers),
                length or ("chunked" if body is not None else 0), status,
                upstream.headers.get("Content-Length", "chunked/close"),
            )  # fmt: skip
        try:
            relayed = response_headers(upstream.headers)
        except UpstreamError:
            upstream.close()  # the answer cannot be relayed: neither can this connection carry another one
            upstream.release_conn()
            metrics.UPSTREAM_ERRORS.labels(path, "malformed").inc()
            log.warning("upstream on %s answered with a header that cannot be relayed", path)
            raise
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


def _upstream_failure(exc: BaseException, body: CallerBody | None, route: Route) -> PassthruError:
    """The answer for a call that failed before the upstream's headers arrived; counted and logged here."""
    if body is not None and body.broken:
        return RequestError("the request body broke off or was malformed")
    if isinstance(exc, urllib3.exceptions.NewConnectionError):  # before the timeouts: it subclasses one
        kind = "refused"
    elif isinstance(exc, (urllib3.exceptions.TimeoutError, TimeoutError)):
        kind = "timeout"
    else:
        kind = "reset"
    path = route.label
    metrics.UPSTREAM_ERRORS.labels(path, kind).inc()
    log.warning("upstream %s on %s: %s", kind, path, describe(exc))
    if kind == "timeout":
        return UpstreamTimeout(f"the upstream did not answer within {route.seconds:g}s")
    return UpstreamError("the upstream could not be reached or broke the connection")
