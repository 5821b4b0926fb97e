"""The answer's way back: the upstream's headers checked and filtered, its body relayed piece by piece as it arrives.

forward.py makes the call and hands its answer over; from here on the status is sent and nothing changes it.
"""

from __future__ import annotations

import errno
import logging
import re
from collections.abc import Iterator

import urllib3
from werkzeug.wrappers import Response

from passthru import metrics
from passthru.config_targets import HEADER_NAME
from passthru.errors import UpstreamError
from passthru.upstream_request import HOP_BY_HOP, connection_tokens
from passthru.usage_tap import Tap

log = logging.getLogger("passthru")

# The WSGI server writes its own Date and Server lines; relaying the upstream's would send each twice.
RESPONSE_DROP = HOP_BY_HOP | {"date", "server"}
# The most one read of the upstream's answer returns (less when less has arrived: an SSE event goes out alone).
# Big pieces matter for big bodies: each piece costs the same Python overhead, whatever its size (bench/).
CHUNK_SIZE = 1024 * 1024
# What a WSGI server writes as a header: a token name (config_targets.HEADER_NAME), and a value of visible characters,
# spaces and tabs.
HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


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
                describe(exc),
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


def chain(exc: BaseException) -> list[BaseException]:
    """The exception and what caused it, a few links deep (urllib3 → http.client → socket)."""
    links = [exc]
    while len(links) < 8 and (cause := links[-1].__cause__ or links[-1].__context__) is not None:
        links.append(cause)
    return links


def describe(exc: BaseException) -> str:
    """The exception's class chain, for logs: the library's text can carry the URL and so a secret."""
    return " <- ".join(type(link).__name__ for link in chain(exc))
