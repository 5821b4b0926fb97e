"""What goes upstream: the target path and query, the caller's headers filtered, X-Forwarded-*, the body.

Everything that depends only on the config is computed once in `compile_route`; per request this module reads the
WSGI environ, never the config. forward.py sends what is built here; relay.py relays the answer.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import quote, unquote_plus, urlencode, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict

from passthru.config import Endpoint
from passthru.config_targets import Target
from passthru.errors import RequestError
from passthru.targets import Rotation
from passthru.usage import PREFIX_CAP

# RFC 9110 §7.6.1 connection-specific fields, plus the pre-standard Proxy-Connection and Keep-Alive.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te", "trailer",
     "transfer-encoding", "upgrade"}
)  # fmt: skip
# Never copied from the caller: framing is redone for the body we send, Host is the target's, Expect: 100-continue
# was already answered by the WSGI server, and X-Forwarded-*, X-Request-Id and the trace context (each attempt's
# traceparent, and the caller's tracestate only when its traceparent was valid: tracing.py) are set by passthru.
REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "expect", "x-forwarded-for", "x-forwarded-proto",
                             "x-forwarded-host", "x-request-id", "traceparent", "tracestate"}  # fmt: skip
# Headers that name the client's address, as some fronts (CDNs, load balancers) set them; an upstream may trust them
# for rate limits or logs. From a peer that is not a trusted front they are someone's claim, and never relayed.
CLIENT_ADDRESS = frozenset({"forwarded", "x-real-ip", "true-client-ip", "x-client-ip", "cf-connecting-ip",
                            "fastly-client-ip"})  # fmt: skip
# Without forward_headers only these caller headers go upstream (environ key, header name).
DEFAULT_FORWARDED = (
    ("CONTENT_TYPE", "Content-Type"),
    ("HTTP_CONTENT_ENCODING", "Content-Encoding"),
    ("HTTP_ACCEPT", "Accept"),
    ("HTTP_ACCEPT_ENCODING", "Accept-Encoding"),
    # The caller's key for deduplication, unchanged on every attempt: an upstream that supports it answers a retry
    # of a request it already served with that first answer.
    ("HTTP_IDEMPOTENCY_KEY", "Idempotency-Key"),
)
# Characters a query may carry as they are; anything else (non-ASCII, controls, space) is percent-encoded.
QUERY_SAFE = "!#$%&'()*+,-./:;=?@[]^_`{|}~"


@dataclass(frozen=True)
class Destination:
    """One of a route's targets, compiled: where one attempt goes and what it carries."""

    name: str  # what logs, metrics and readiness show of it
    shown: str  # its URL with environment-derived parts masked, for debug lines
    pool: urllib3.HTTPConnectionPool  # the target host's pool in the Session's adapter; TLS verified as requests does
    path: str  # the target's path, without its query
    query: str  # the target's own query, put before the caller's
    headers: tuple[tuple[str, str], ...]  # the route's headers with the target's merged over them
    header_names: frozenset[str]  # lower-case names of `headers`: the caller's are overridden


@dataclass(frozen=True)
class Route:
    """An Endpoint turned into what the hot path needs, computed once at start-up: nothing per request reads the
    Endpoint itself."""

    label: str  # the route's path on passthru: its name in metrics, logs and spend entries
    destinations: tuple[Destination, ...]  # its targets, in the config's order
    rotation: Rotation  # which destination the next attempt goes to; their cooldowns, in this worker
    num_retries: int
    retry_on: frozenset[int]
    retry_body_limit: int
    forward_headers: bool
    include_subpath: bool
    seconds: float  # the route's timeout, for the 504's message
    default_query: tuple[tuple[str, str], ...]  # (name, "name=value" encoded)
    timeout: urllib3.Timeout
    trusted_proxy: Callable[[str], bool]  # whether a peer address may tell us X-Forwarded-* (nginx in front)


def compile_route(endpoint: Endpoint, session: requests.Session, trusted_proxy: Callable[[str], bool]) -> Route:
    """Each target split and bound to its connection pool, everything that does not change per request pre-encoded,
    and the route's rotation made."""
    retries = endpoint.retries
    return Route(
        label=endpoint.path,
        destinations=tuple(_destination(target, session) for target in endpoint.targets),
        rotation=Rotation(
            [t.weight for t in endpoint.targets],
            [t.order for t in endpoint.targets],
            retries.allowed_fails,
            retries.cooldown_time,
        ),
        num_retries=retries.num_retries,
        retry_on=retries.retry_on,
        retry_body_limit=retries.retry_body_limit,
        forward_headers=endpoint.forward_headers,
        include_subpath=endpoint.include_subpath,
        seconds=endpoint.timeout,
        default_query=tuple((k, urlencode([(k, v)])) for k, v in endpoint.default_query_params),
        timeout=urllib3.Timeout(connect=endpoint.timeout, read=endpoint.timeout),
        trusted_proxy=trusted_proxy,
    )


def _destination(target: Target, session: requests.Session) -> Destination:
    parts = urlsplit(target.url)
    adapter = session.get_adapter(target.url)
    assert isinstance(adapter, HTTPAdapter)
    probe = requests.PreparedRequest()
    probe.prepare(method="GET", url=target.url)
    # The pool requests itself would pick, with its TLS settings (verified, certifi's CA bundle).
    pool = adapter.get_connection_with_tls_context(probe, verify=True)
    assert isinstance(pool, urllib3.HTTPConnectionPool)
    return Destination(
        name=target.name,
        shown=target.url_shown,
        pool=pool,
        path=parts.path or "/",
        query=parts.query,
        headers=target.headers,
        header_names=frozenset(name.lower() for name, _ in target.headers),
    )


def upstream_target(route: Route, destination: Destination, subpath: str | None, query_string: str) -> str:
    """The request target upstream: the target's path + the sub-path (resolved and encoded by routes.py), then the
    target's query, the caller's query as sent, and the route's default params the caller left out."""
    url = destination.path
    if subpath is not None:
        url = url.rstrip("/") + "/" + subpath
    query = encode_query(query_string)
    if destination.query:
        query = f"{destination.query}&{query}" if query else destination.query
    if route.default_query:
        present = {unquote_plus(pair.split("=", 1)[0]) for pair in query.split("&") if pair}
        extra = "&".join(encoded for name, encoded in route.default_query if name not in present)
        if extra:
            query = f"{query}&{extra}" if query else extra
    return f"{url}?{query}" if query else url


def encode_query(query_string: str) -> str:
    """The caller's query as sent: repeated keys, order, empty values and escapes kept (urllib3 upper-cases hex)."""
    if query_string.isascii() and query_string.isprintable() and " " not in query_string:
        return query_string
    # WSGI hands the query over as latin-1 text; bytes the request line may not carry raw are escaped.
    return quote(query_string.encode("latin-1"), safe=QUERY_SAFE)


def upstream_headers(
    route: Route,
    destination: Destination,
    environ: Mapping[str, Any],
    drop: frozenset[str],
    request_id: str | None = None,
) -> CaseInsensitiveDict[str]:
    """The headers sent upstream: the caller's (all, or the default few), then the target's (the route's merged
    with its own), the request id, then X-Forwarded-*."""
    headers: CaseInsensitiveDict[str] = CaseInsensitiveDict()
    peer = environ.get("REMOTE_ADDR", "")
    trusted = route.trusted_proxy(peer)  # a trusted front (nginx) speaks for the real client; anyone else does not
    if route.forward_headers:
        skip = REQUEST_DROP | destination.header_names | drop | connection_tokens(environ.get("HTTP_CONNECTION"))
        if not trusted:
            skip = skip | CLIENT_ADDRESS
        for key, value in environ.items():
            if key.startswith("HTTP_"):
                name = key[5:].replace("_", "-").title()
            elif key == "CONTENT_TYPE":
                name = "Content-Type"
            else:
                continue
            if name.lower() not in skip:
                headers[name] = value
    else:
        for key, name in DEFAULT_FORWARDED:
            value = environ.get(key)
            if value and name.lower() not in destination.header_names:
                headers[name] = value
    for name, value in destination.headers:
        headers[name] = value
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    forwarded_for, proto, host = None, None, None
    if trusted:
        forwarded_for = environ.get("HTTP_X_FORWARDED_FOR")
        proto = environ.get("HTTP_X_FORWARDED_PROTO")
        host = environ.get("HTTP_X_FORWARDED_HOST")
    headers["X-Forwarded-For"] = f"{forwarded_for}, {peer}" if forwarded_for else peer
    headers["X-Forwarded-Proto"] = proto or environ.get("wsgi.url_scheme", "http")
    host = host or environ.get("HTTP_HOST")
    if host:
        headers["X-Forwarded-Host"] = host
    return headers


def connection_tokens(value: str | None) -> frozenset[str]:
    """The lower-case field names a Connection header lists: hop-by-hop for this one message."""
    if not value:
        return frozenset()
    return frozenset(token.strip().lower() for token in value.split(",") if token.strip())


class CallerBody:
    """The caller's body, read as urllib3 asks for it: counted, bounded by its Content-Length when it has one, and
    kept while it is at most `keep` bytes, so that another attempt can send it again byte for byte.

    Nothing is read ahead of what an attempt sends: a retry sends the kept bytes again, then reads on from the
    caller. Whatever the WSGI server raises while reading (client gone, a bad chunk size) becomes one OSError that
    forward() recognises by `broken`, so it answers 400 instead of blaming the upstream.
    """

    def __init__(self, stream: IO[bytes], length: int | None, keep: int) -> None:
        self._stream = stream
        self._left = length
        self._keep = keep
        self._kept: list[bytes] | None = []  # all that was read from the caller; None once past `keep`, or settled
        self._again: list[bytes] | None = None  # kept pieces this attempt still sends again, the next one last
        self.received = 0
        self.broken = False
        self.head = b""  # the body's first bytes, for its "model" (pricing.meter): a bounded copy, never the body

    def read(self, size: int = -1) -> bytes:
        if self._again:
            piece = self._again.pop()
            if 0 <= size < len(piece):
                self._again.append(piece[size:])
                piece = piece[:size]
            return piece
        if self._left is not None:
            if self._left <= 0:
                return b""
            size = self._left if size < 0 else min(size, self._left)
        try:
            data = self._stream.read(size)
        except Exception as exc:  # each server has its own "client went away" and framing errors
            self.broken = True
            raise OSError(errno.ECONNABORTED, "the caller's body broke off") from exc
        if self._left is not None:
            if not data:
                self.broken = True
                raise OSError(errno.ECONNABORTED, "the caller's body ended before its Content-Length")
            self._left -= len(data)
        if len(self.head) < PREFIX_CAP:
            self.head += data[: PREFIX_CAP - len(self.head)]
        self.received += len(data)
        if self._kept is not None:
            if self.received <= self._keep:
                self._kept.append(data)  # a reference, not a copy: bytes do not change
            else:
                self._kept = None  # too long to keep: it can be sent again only if nothing of it was read
        return data

    def rewind(self) -> bool:
        """Start the body over for another attempt; False when what was read of it is no longer all kept."""
        if self.broken or (self._kept is None and self.received):
            return False
        self._again = self._kept[::-1] if self._kept else None
        return True

    def settle(self) -> None:
        """No other attempt follows: the kept bytes can go (an answer may stream for minutes)."""
        self._kept = None


def request_body(environ: Mapping[str, Any], keep: int) -> tuple[CallerBody | None, str | None]:
    """The body to send upstream, kept up to `keep` bytes, and its Content-Length (None: no body, or sent chunked);
    refuse bad framing.

    Only Content-Length is ever set here: urllib3 sends a body without one chunked, so the two never go together.
    """
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH") or None
    encoding = environ.get("HTTP_TRANSFER_ENCODING")
    if encoding is not None:
        if length is not None:
            raise RequestError("a request must not carry both Content-Length and Transfer-Encoding")
        if encoding.strip().lower() != "chunked":
            raise RequestError("only the chunked Transfer-Encoding is supported")
        return CallerBody(stream, None, keep), None
    if length is None:
        return None, None
    if not length.isdigit() or not length.isascii():
        raise RequestError("Content-Length must be a number", param="Content-Length")
    if int(length) == 0:
        return None, "0"
    return CallerBody(stream, int(length), keep), str(int(length))
