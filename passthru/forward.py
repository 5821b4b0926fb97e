"""The hot path: build the upstream request, send it on the pooled Session, relay the answer as it arrives.

Everything that depends only on the config is computed once in `compile_route`; per request this module reads the
WSGI environ, never the config. Bodies stream both ways; nothing here reads a body whole.
"""

from __future__ import annotations

import errno
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from ipaddress import ip_address, ip_network
from typing import IO, Any
from urllib.parse import quote, unquote, unquote_plus, urlencode, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from werkzeug.wrappers import Response

from passthru import metrics
from passthru.config import Endpoint
from passthru.errors import ConfigError, PassthruError, RequestError, UpstreamError, UpstreamTimeout

log = logging.getLogger("passthru")

# RFC 9110 §7.6.1 connection-specific fields, plus the pre-standard Proxy-Connection and Keep-Alive.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te", "trailer",
     "transfer-encoding", "upgrade"}
)  # fmt: skip
# Never copied from the caller: framing is redone for the body we send, Host is the target's, Expect: 100-continue
# was already answered by the WSGI server, and X-Forwarded-* and X-Request-Id are set by passthru.
REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "expect", "x-forwarded-for", "x-forwarded-proto",
                             "x-forwarded-host", "x-request-id"}  # fmt: skip
# The WSGI server writes its own Date and Server lines; relaying the upstream's would send each twice.
RESPONSE_DROP = HOP_BY_HOP | {"date", "server"}
# Without forward_headers only these caller headers go upstream (environ key, header name).
DEFAULT_FORWARDED = (
    ("CONTENT_TYPE", "Content-Type"),
    ("HTTP_CONTENT_ENCODING", "Content-Encoding"),
    ("HTTP_ACCEPT", "Accept"),
    ("HTTP_ACCEPT_ENCODING", "Accept-Encoding"),
)
# The most one read of the upstream's answer returns (less when less has arrived: an SSE event goes out alone).
# Big pieces matter for big bodies: each piece costs the same Python overhead, whatever its size (bench/).
CHUNK_SIZE = 1024 * 1024
# What a WSGI server writes as a header: a token name, and a value of visible characters, spaces and tabs.
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
# Uploads are read from the caller in pieces this big (urllib3's default is 16 KiB, and gunicorn's reader copies
# its read-ahead buffer on every read: small pieces cost far more CPU than the bytes themselves, bench/).
UPLOAD_BLOCK = 1024 * 1024
POOL_SIZE = 256  # connections kept per upstream host: at least the threads of any worker we ship
SEGMENT_SAFE = "!$&'()*+,;=:@-._~"  # RFC 3986 pchar minus "%": a decoded segment is re-encoded with these kept
# Characters a query may carry as they are; anything else (non-ASCII, controls, space) is percent-encoded.
QUERY_SAFE = "!#$%&'()*+,-./:;=?@[]^_`{|}~"


@dataclass(frozen=True)
class Route:
    """An Endpoint turned into what the hot path needs, computed once at start-up."""

    endpoint: Endpoint
    pool: urllib3.HTTPConnectionPool  # the target host's pool in the Session's adapter; TLS verified as requests does
    path: str  # the target's path, without its query
    query: str  # the target's own query, put before the caller's
    default_query: tuple[tuple[str, str], ...]  # (name, "name=value" encoded)
    headers: tuple[tuple[str, str], ...]
    header_names: frozenset[str]  # lower-case names of `headers`: the caller's are overridden
    timeout: urllib3.Timeout
    trusted_proxy: Callable[[str], bool]  # whether a peer address may tell us X-Forwarded-* (nginx in front)


def compile_route(endpoint: Endpoint, session: requests.Session, trusted_proxy: Callable[[str], bool]) -> Route:
    """Split the target, find its connection pool and pre-encode everything that does not change per request."""
    parts = urlsplit(endpoint.target)
    adapter = session.get_adapter(endpoint.target)
    assert isinstance(adapter, HTTPAdapter)
    probe = requests.PreparedRequest()
    probe.prepare(method="GET", url=endpoint.target)
    # The pool requests itself would pick, with its TLS settings (verified, certifi's CA bundle).
    pool = adapter.get_connection_with_tls_context(probe, verify=True)
    assert isinstance(pool, urllib3.HTTPConnectionPool)
    return Route(
        endpoint=endpoint,
        pool=pool,
        path=parts.path or "/",
        query=parts.query,
        default_query=tuple((k, urlencode([(k, v)])) for k, v in endpoint.default_query_params),
        headers=endpoint.headers,
        header_names=frozenset(name.lower() for name, _ in endpoint.headers),
        timeout=urllib3.Timeout(connect=endpoint.timeout, read=endpoint.timeout),
        trusted_proxy=trusted_proxy,
    )


def proxy_trust(spec: str) -> Callable[[str], bool]:
    """Parse FORWARDED_ALLOW_IPS (gunicorn's setting, same meaning): addresses or networks, or * for any."""
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    if "*" in parts:
        return lambda address: True
    try:
        networks = tuple(ip_network(part, strict=False) for part in parts)
    except ValueError as exc:
        raise ConfigError(f"FORWARDED_ALLOW_IPS: {spec!r} is not a list of IP addresses or networks") from exc

    @lru_cache(maxsize=1024)
    def trusted(address: str) -> bool:
        try:
            peer = ip_address(address)
        except ValueError:
            return False
        return any(peer in network for network in networks)

    return trusted


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


def upstream_target(route: Route, subpath: str | None, query_string: str) -> str:
    """The request target upstream: the target's path + cleaned sub-path, then the target's query, the caller's
    query as sent, and the default params the caller left out."""
    url = route.path
    if subpath is not None:
        url = url.rstrip("/") + "/" + clean_subpath(subpath)
    query = encode_query(query_string)
    if route.query:
        query = f"{route.query}&{query}" if query else route.query
    if route.default_query:
        present = {unquote_plus(pair.split("=", 1)[0]) for pair in query.split("&") if pair}
        extra = "&".join(encoded for name, encoded in route.default_query if name not in present)
        if extra:
            query = f"{query}&{extra}" if query else extra
    return f"{url}?{query}" if query else url


def clean_subpath(subpath: str) -> str:
    """Resolve dot segments inside the route and re-encode each segment; refuse what could climb out of it.

    The WSGI server has already percent-decoded the path once, so %2e%2e arrives here as `..` and %2F as `/`.
    """
    kept: list[str] = []
    for segment in subpath.split("/"):
        if ";" in segment and segment.split(";", 1)[0] in (".", ".."):
            # `..;x` is a dot segment to Tomcat and Jetty (a path parameter after `;`): it would climb out.
            raise RequestError("the path has a dot segment with parameters", param="path")
        if segment == "..":
            if not kept:
                raise RequestError("the path leaves the route's prefix", param="path")
            kept.pop()
        elif segment != ".":
            decoded = unquote(segment)  # a second decoding, as a careless upstream might do
            if "\\" in decoded or "/" in decoded or decoded in (".", "..") or not decoded.isprintable():
                raise RequestError("the path has an encoded slash, dot segment or control character", param="path")
            kept.append(quote(segment, safe=SEGMENT_SAFE))
    return "/".join(kept)


def encode_query(query_string: str) -> str:
    """The caller's query as sent: repeated keys, order, empty values and escapes kept (urllib3 upper-cases hex)."""
    if query_string.isascii() and query_string.isprintable() and " " not in query_string:
        return query_string
    # WSGI hands the query over as latin-1 text; bytes the request line may not carry raw are escaped.
    return quote(query_string.encode("latin-1"), safe=QUERY_SAFE)


def upstream_headers(route: Route, environ: Mapping[str, Any], drop: frozenset[str]) -> CaseInsensitiveDict[str]:
    """The headers sent upstream: the caller's (all, or the default few), then the route's, then X-Forwarded-*."""
    headers: CaseInsensitiveDict[str] = CaseInsensitiveDict()
    if route.endpoint.forward_headers:
        skip = REQUEST_DROP | route.header_names | drop | _connection_tokens(environ.get("HTTP_CONNECTION"))
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
            if value and name.lower() not in route.header_names:
                headers[name] = value
    for name, value in route.headers:
        headers[name] = value
    if "passthru.request_id" in environ:
        headers["X-Request-Id"] = environ["passthru.request_id"]
    peer = environ.get("REMOTE_ADDR", "")
    forwarded_for, proto, host = None, None, None
    if route.trusted_proxy(peer):  # a trusted front (nginx) speaks for the real client; anyone else does not
        forwarded_for = environ.get("HTTP_X_FORWARDED_FOR")
        proto = environ.get("HTTP_X_FORWARDED_PROTO")
        host = environ.get("HTTP_X_FORWARDED_HOST")
    headers["X-Forwarded-For"] = f"{forwarded_for}, {peer}" if forwarded_for else peer
    headers["X-Forwarded-Proto"] = proto or environ.get("wsgi.url_scheme", "http")
    host = host or environ.get("HTTP_HOST")
    if host:
        headers["X-Forwarded-Host"] = host
    return headers


def _connection_tokens(value: str | None) -> frozenset[str]:
    if not value:
        return frozenset()
    return frozenset(token.strip().lower() for token in value.split(",") if token.strip())


class CallerBody:
    """The caller's body, read as urllib3 asks for it: counted, bounded by its Content-Length when it has one.

    Whatever the WSGI server raises while reading (client gone, a bad chunk size) becomes one OSError that
    forward() recognises by `broken`, so it answers 400 instead of blaming the upstream.
    """

    def __init__(self, stream: IO[bytes], length: int | None) -> None:
        self._stream = stream
        self._left = length
        self.received = 0
        self.broken = False

    def read(self, size: int = -1) -> bytes:
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
        self.received += len(data)
        return data


def request_body(environ: Mapping[str, Any]) -> tuple[CallerBody | None, str | None]:
    """The body to send upstream and its Content-Length (None: no body, or sent chunked); refuse bad framing.

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
        return CallerBody(stream, None), None
    if length is None:
        return None, None
    if not length.isdigit() or not length.isascii():
        raise RequestError("Content-Length must be a number", param="Content-Length")
    if int(length) == 0:
        return None, "0"
    return CallerBody(stream, int(length)), str(int(length))


class UpstreamBody:
    """The upstream's body relayed piece by piece as it arrives; closing it frees the upstream connection."""

    def __init__(self, raw: urllib3.BaseHTTPResponse, bodiless: bool, route: str) -> None:
        self._raw = raw
        self._bodiless = bodiless
        self._route = route
        self._done = False
        self._closed = False
        metrics.in_flight(route).inc()

    def __iter__(self) -> Iterator[bytes]:
        read1 = self._raw.read1
        try:
            while True:
                # read1, not stream() or iter_content(): whatever has arrived, undecoded (gzip stays gzip).
                chunk = read1(CHUNK_SIZE, decode_content=False)
                if not chunk:
                    break
                yield chunk
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


def forward(route: Route, subpath: str | None, environ: dict[str, Any], drop: frozenset[str]) -> Response:
    """Send the caller's request upstream and return the upstream's answer, streaming, as a WSGI response."""
    body, length = request_body(environ)
    environ["passthru.body"] = body
    path = route.endpoint.path
    method = environ["REQUEST_METHOD"]
    target = upstream_target(route, subpath, environ.get("QUERY_STRING", ""))
    headers = upstream_headers(route, environ, drop)
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
    environ["passthru.upstream_seconds"] = time.perf_counter() - started
    status = upstream.status
    if log.isEnabledFor(logging.DEBUG):  # --detailed_debug: names and sizes only, never a header value
        log.debug(
            "forward %s %s -> %s%s headers=[%s] request_length=%s -> %s response_length=%s",
            method, path, route.endpoint.target_shown, f" +/{subpath}" if subpath else "", ", ".join(headers),
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
    relay = UpstreamBody(upstream, method == "HEAD" or status in (204, 304) or status < 200, path)
    response = UpstreamResponse(relay, status=status, headers=relayed, direct_passthrough=True)
    # For HEAD/204/304 werkzeug never iterates the body; for the rest the server closes it. Either way: freed.
    response.call_on_close(relay.close)
    return response


def response_headers(headers: urllib3.HTTPHeaderDict) -> list[tuple[str, str]]:
    """The upstream's headers to relay, repeats kept; UpstreamError when one cannot be written as it is.

    A control character in a value, or a Content-Length that is not one plain number, would make the WSGI server
    fail mid-answer or send a framing the client reads differently from us: refused whole, as a 502.
    """
    skip = RESPONSE_DROP | _connection_tokens(headers.get("Connection"))
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
    path = route.endpoint.path
    metrics.UPSTREAM_ERRORS.labels(path, kind).inc()
    log.warning("upstream %s on %s: %s", kind, path, _describe(exc))
    if kind == "timeout":
        return UpstreamTimeout(f"the upstream did not answer within {route.endpoint.timeout:g}s")
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
