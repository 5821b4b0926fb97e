"""The hot path: send the upstream request on the pooled Session and relay the answer as it arrives.

What is sent (target, headers, body) is built by upstream_request.py; this module's Forwarder owns the Session, each
route's pool, the call, the answer's headers and streamed body, and upstream failures turned into our errors.
Nothing here reads a body whole.
"""

from __future__ import annotations

import errno
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from werkzeug.wrappers import Response

from passthru import metrics
from passthru.config import HEADER_NAME, Endpoint
from passthru.errors import PassthruError, RequestError, UpstreamError, UpstreamTimeout
from passthru.exchange import Exchange
from passthru.upstream_request import (
    HOP_BY_HOP,
    CallerBody,
    Route,
    compile_route,
    connection_tokens,
    request_body,
    upstream_headers,
    upstream_target,
)
from passthru.usage import response_cost
from passthru.usage_tap import Tap, tap_for

log = logging.getLogger("passthru")

# The WSGI server writes its own Date and Server lines; relaying the upstream's would send each twice.
RESPONSE_DROP = HOP_BY_HOP | {"date", "server"}
# The most one read of the upstream's answer returns (less when less has arrived: an SSE event goes out alone).
# Big pieces matter for big bodies: each piece costs the same Python overhead, whatever its size (bench/).
CHUNK_SIZE = 1024 * 1024
# What a WSGI server writes as a header: a token name (config.HEADER_NAME), and a value of visible characters,
# spaces and tabs.
HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
# Uploads are read from the caller in pieces this big (urllib3's default is 16 KiB, and gunicorn's reader copies
# its read-ahead buffer on every read: small pieces cost far more CPU than the bytes themselves, bench/).
UPLOAD_BLOCK = 1024 * 1024
POOL_SIZE = 256  # connections kept per upstream host: at least the threads of any worker we ship


def new_session(upstream_hosts: int) -> requests.Session:
    """The Session of one worker process: it owns the connection pools that every route sends through.

    Requests go out on the adapter's urllib3 pool, not through Session.send: even with allow_redirects=False,
    Session.send reads a 3xx answer's whole body (to prepare the next hop), and it runs the shared cookie jar,
    environment proxies and .netrc; the adapter's own send builds a Response and a cookie jar per call. The pool
    does none of that, and nothing is shared between callers but idle connections.
    """
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=max(upstream_hosts, 1), pool_maxsize=POOL_SIZE, max_retries=0)
    # Made again with the upload block size, which HTTPAdapter's constructor cannot pass (the first one is unused).
    adapter.init_poolmanager(max(upstream_hosts, 1), POOL_SIZE, blocksize=UPLOAD_BLOCK)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class UpstreamBody:
    """The upstream's body relayed piece by piece as it arrives; closing it frees the upstream connection."""

    def __init__(self, raw: urllib3.BaseHTTPResponse, bodiless: bool, route: str, tap: Tap | None) -> None:
        self._raw = raw
        self._bodiless = bodiless
        self._route = route
        self._tap = tap
        self._done = False
        self._closed = False
        metrics.in_flight(route).inc()

    def __iter__(self) -> Iterator[bytes]:
        read1, tap = self._raw.read1, self._tap
        try:
            while True:
                # read1, not stream() or iter_content(): whatever has arrived, undecoded (gzip stays gzip).
                chunk = read1(CHUNK_SIZE, decode_content=False)
                if not chunk:
                    break
                yield chunk
                if tap is not None:  # after the caller has the chunk: the tap never holds an event back
                    tap.feed(chunk)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            kind = "timeout" if isinstance(exc, (urllib3.exceptions.TimeoutError, TimeoutError)) else "reset"
            metrics.UPSTREAM_ERRORS.labels(self._route, kind).inc()
            log.warning(
                "upstream %s mid-body on %s (%s); closing the client connection",
                kind,
                self._route,
                _describe(exc),
            )
            # The status is already sent: the only honest signal left is to end the connection uncleanly.
            # WSGI servers treat a connection reset as the client's problem and close quietly.
            raise ConnectionResetError(errno.ECONNRESET, "upstream broke off mid-body") from exc
        self._done = True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        metrics.in_flight(self._route).dec()
        if self._bodiless and not self._done:
            self._raw.drain_conn()  # nothing to read, but it marks the exchange finished
        elif not self._done:
            self._raw.close()  # half-read: this connection cannot carry another request
        self._raw.release_conn()


class UpstreamResponse(Response):
    # Relay the upstream's headers exactly: no Content-Type is invented when the upstream sent none.
    default_mimetype = None


class Forwarder:
    """The transport of one worker: its Session, whose adapter holds the pooled connections (TLS verified as requests
    verifies it); each route's pool, found once; and every call, its failures turned into passthru's errors."""

    def __init__(self, endpoints: Sequence[Endpoint], trusted_proxy: Callable[[str], bool]) -> None:
        self.session = new_session(len({urlsplit(endpoint.target).netloc for endpoint in endpoints}))
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
        exchange.trace.attempt(headers, route.pool, target)  # this attempt's traceparent; its span when recorded
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
            exchange.trace.failed(exc)
            raise _upstream_failure(exc, body, route) from exc
        exchange.upstream_seconds = time.perf_counter() - started
        status = upstream.status
        exchange.trace.answered(status)
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


def response_headers(headers: urllib3.HTTPHeaderDict) -> list[tuple[str, str]]:
    """The upstream's headers to relay, repeats kept; UpstreamError when one cannot be written as it is.

    A control character in a value, or a Content-Length that is not one plain number, would make the WSGI server
    fail mid-answer or send a framing the client reads differently from us: refused whole, as a 502.
    """
    skip = RESPONSE_DROP | connection_tokens(headers.get("Connection"))
    # RFC 9112 §6.3: with Transfer-Encoding the Content-Length is to be ignored, and relayed it would cut the body.
    if "transfer-encoding" in headers:
        skip = skip | {"content-length"}
    relayed = []
    length = None
    for name, value in headers.items():
        lower = name.lower()
        if lower in skip:
            continue
        if not HEADER_NAME.fullmatch(name) or not HEADER_VALUE.fullmatch(value):
            raise UpstreamError("the upstream answered with a malformed header")
        if lower == "content-length":
            if not value.strip().isdigit() or not value.isascii() or (length is not None and value != length):
                raise UpstreamError("the upstream answered with a malformed Content-Length")
            if length is not None:
                continue  # the same length twice: one line is enough
            length = value
        relayed.append((name, value))
    return relayed


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
    log.warning("upstream %s on %s: %s", kind, path, _describe(exc))
    if kind == "timeout":
        return UpstreamTimeout(f"the upstream did not answer within {route.seconds:g}s")
    return UpstreamError("the upstream could not be reached or broke the connection")


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and what caused it, a few links deep (urllib3 → http.client → socket)."""
    chain = [exc]
    while len(chain) < 8 and (cause := chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(cause)
    return chain


def _describe(exc: BaseException) -> str:
    """The exception's class chain, for logs: the library's text can carry the URL and so a secret."""
    return " <- ".join(type(link).__name__ for link in _chain(exc))
