"""Which route serves a request: its path resolved once, then the longest configured path that owns it.

werkzeug's URL map serves passthru's own paths (/health, /metrics, /key/*); everything else reaches one catch-all
rule, and the table here decides. A route is never chosen from the raw path and its dot segments resolved later
inside it: the path that picks the route, and so its auth, methods and cost, is the path sent upstream.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from flask import Blueprint, request
from flask.blueprints import BlueprintSetupState
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import BaseConverter
from werkzeug.wrappers import Response

from passthru.auth import Authenticator, digest, headers_carrying, read_key
from passthru.config import ALL_METHODS, BUILT_IN_PATHS, KEY_API_PATHS, Endpoint, Settings
from passthru.errors import RequestError
from passthru.exchange import of
from passthru.forward import Forwarder
from passthru.upstream_request import Route

SEGMENT_SAFE = "!$&'()*+,;=:@-._~"  # RFC 3986 pchar minus "%": a decoded segment is re-encoded with these kept
# What no segment may hold once decoded, even twice (as a careless upstream might decode): a slash or backslash
# would split it into two, and a control character has no place in a path (a CR or LF could forge a log line).
FORBIDDEN = re.compile(r"[/\\\x00-\x1f\x7f]")
DOTS = (".", "..")
# A path with nothing to resolve or re-encode: plain segments (none a dot segment, none empty), no escapes, no `;`.
# Most requests are such; they skip resolve_path's segment by segment work.
PLAIN_PATH = re.compile(r"(?:/(?!\.\.?(?:/|$))[A-Za-z0-9!$&'()*+,=:@._~-]+)*/?")


@dataclass(frozen=True)
class ResolvedPath:
    """A request path with its dot segments resolved and empty segments merged, as nginx and Envoy normalise."""

    decoded: tuple[str, ...]  # the segments as routes are compared (percent-decoded once, latin-1 as WSGI has it)
    encoded: tuple[str, ...]  # the same segments as they go upstream
    trailing_slash: bool


def raw_path(environ: Mapping[str, Any]) -> str:
    """The path as the client wrote it, escapes intact: PATH_INFO is decoded already, so `%2F` is a `/` there.

    gunicorn and werkzeug give the request target as RAW_URI (REQUEST_URI elsewhere). When it does not decode to
    PATH_INFO (a middleware rewrote the path, or the server has neither), PATH_INFO is taken as the literal path.
    """
    path_info: str = environ.get("PATH_INFO", "")
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI") or ""
    if not raw.startswith("/"):
        raw = urlsplit(raw).path  # absolute-form: http://host/path
    raw = raw.split("?", 1)[0]
    script = environ.get("SCRIPT_NAME", "")
    if script and raw.startswith(script):
        raw = raw[len(script) :]
    if unquote(raw, encoding="latin-1") == path_info:
        return raw
    return path_info.replace("%", "%25")


def resolve_path(raw: str) -> ResolvedPath:
    """Resolve `.` and `..` (raw or escaped, any case) and merge `//`; RequestError for what cannot be resolved.

    Refused: a `..` above the root; a segment that hides a slash, backslash or control character in an escape, or
    that a second decoding would turn into one of those or into a dot segment; a dot segment with `;parameters`,
    which Tomcat and Jetty read as a dot segment.
    """
    if PLAIN_PATH.fullmatch(raw):
        segments = tuple(raw.strip("/").split("/")) if len(raw) > 1 else ()
        return ResolvedPath(segments, segments, len(raw) > 1 and raw.endswith("/"))
    return resolve_path_slowly(raw)


def resolve_path_slowly(raw: str) -> ResolvedPath:
    """resolve_path without its shortcut for plain paths, segment by segment (what the shortcut must agree with)."""
    decoded: list[str] = []
    encoded: list[str] = []
    parts = raw.split("/")
    for part in parts:
        segment = unquote(part, encoding="latin-1")
        if segment == "..":
            if not decoded:
                raise RequestError("the path climbs above /", param="path")
            decoded.pop()
            encoded.pop()
            continue
        if segment in ("", "."):
            continue
        twice = unquote(segment, encoding="latin-1")
        if twice in DOTS or FORBIDDEN.search(twice):
            raise RequestError("the path has an encoded slash, dot segment or control character", param="path")
        if ";" in segment and segment.split(";", 1)[0] in DOTS:
            raise RequestError("the path has a dot segment with parameters", param="path")
        decoded.append(segment)
        # Re-encoded as RFC 3986 writes a segment; a plain one (the usual case) is already written so.
        plain = part == segment and part.isascii() and part.isalnum()
        encoded.append(part if plain else quote(segment.encode("latin-1"), SEGMENT_SAFE))
    # "/a/", "/a/." and "/a/b/.." all end in a slash once resolved (RFC 3986 §5.2.4).
    trailing = bool(decoded) and len(parts) > 1 and unquote(parts[-1]) in ("", *DOTS)
    return ResolvedPath(tuple(decoded), tuple(encoded), trailing)


def _key(segments: tuple[str, ...] | list[str]) -> str:
    return "/" + "/".join(segments)


def _loose(segment: str) -> str:
    """A segment as a lenient upstream may read it: any letter case, `;parameters` dropped (Tomcat, Jetty)."""
    return segment.split(";", 1)[0].casefold()


@dataclass(frozen=True)
class Served:
    """One route as the table serves it: what to forward, the key check when auth is on, the methods allowed."""

    endpoint: Endpoint  # what the key check weighs: the route's path (allowed_routes) and cost
    route: Route
    authenticator: Authenticator | None  # None on an auth: false route
    methods: frozenset[str]


@dataclass(frozen=True)
class RouteTable:
    """Configured paths (decoded) → their route: exact paths, and the include_subpath ones as prefixes."""

    exact: Mapping[str, Served]
    prefixes: Mapping[str, Served]
    loose_exact: Mapping[str, Served]
    loose_prefixes: Mapping[str, Served]

    def find(self, path: ResolvedPath) -> tuple[Served, str | None]:
        """The route that owns the path and the sub-path it forwards (None: the route's own path); 404, 400."""
        found = _lookup(path.decoded, path.encoded, path.trailing_slash, self.exact, self.prefixes)
        # Another spelling of the same path (another letter case, a `;parameter`) must not name another route:
        # an upstream that reads it leniently would serve the narrower route's target under the broader's policy.
        loose = [_loose(segment) for segment in path.decoded]
        if loose != list(path.decoded):
            other = _lookup(loose, path.encoded, path.trailing_slash, self.loose_exact, self.loose_prefixes)
            if (other[0].route if other else None) is not (found[0].route if found else None):
                raise RequestError("the path names another route in another spelling", param="path")
        if found is None:
            raise NotFound()
        return found


def _lookup(
    decoded: tuple[str, ...] | list[str],
    encoded: tuple[str, ...],
    trailing: bool,
    exact: Mapping[str, Served],
    prefixes: Mapping[str, Served],
) -> tuple[Served, str | None] | None:
    served = exact.get(_key(decoded))
    if served is not None:
        # /api/admin/ is /api/admin's: its sub-path "" when it has sub-paths, else nothing (never a broader route's).
        if not trailing:
            return served, None
        return (served, "") if served.route.include_subpath else None
    for depth in range(len(decoded) - 1, -1, -1) if prefixes else ():
        served = prefixes.get(_key(decoded[:depth]))
        if served is not None:
            return served, "/".join(encoded[depth:]) + ("/" if trailing else "")
    return None


def _any_path_but(own: tuple[str, ...]) -> type[BaseConverter]:
    """A converter for every path, empty and slash-led ones too, except passthru's own paths: the route table, not
    werkzeug, reads and resolves it; and a wrong method on /key/generate stays werkzeug's 405 with its Allow."""
    exclude = "|".join(re.escape(path.lstrip("/")) for path in own)

    class AnyPath(BaseConverter):
        regex = f"(?!(?:{exclude})$).*"
        part_isolating = False

    return AnyPath


def build_table(settings: Settings, forwarder: Forwarder, authenticator: Authenticator | None) -> RouteTable:
    """Each endpoint compiled and bound to its key check, under its decoded path (config.py refuses clashes)."""
    exact: dict[str, Served] = {}
    prefixes: dict[str, Served] = {}
    loose_exact: dict[str, Served] = {}
    loose_prefixes: dict[str, Served] = {}
    for endpoint in settings.endpoints:
        methods = set(endpoint.methods) | ({"HEAD"} if "GET" in endpoint.methods else set())
        served = Served(
            endpoint,
            forwarder.route(endpoint),
            authenticator if endpoint.auth else None,
            frozenset(methods),
        )
        segments = [unquote(part, encoding="latin-1") for part in endpoint.path.split("/") if part]
        exact[_key(segments)] = served
        loose_exact[_key([_loose(s) for s in segments])] = served
        if endpoint.include_subpath:
            prefixes[_key(segments)] = served
            loose_prefixes[_key([_loose(s) for s in segments])] = served
    return RouteTable(exact, prefixes, loose_exact, loose_prefixes)


def build_blueprint(settings: Settings, forwarder: Forwarder, authenticator: Authenticator | None) -> Blueprint:
    """A fresh Blueprint whose one catch-all rule hands every path werkzeug does not know to the route table."""
    blueprint = Blueprint("passthru", __name__)
    # The master key is stripped from relayed headers on every route, authenticated or not.
    proxy_keys = (digest(settings.master_key),) if settings.master_key else ()
    view = partial(_serve, build_table(settings, forwarder, authenticator), forwarder, proxy_keys)
    converter = _any_path_but(BUILT_IN_PATHS + (KEY_API_PATHS if settings.master_key else ()))

    def add_converter(state: BlueprintSetupState) -> None:
        state.app.url_map.converters["passthru_any"] = converter

    blueprint.record_once(add_converter)
    blueprint.add_url_rule(
        "/<passthru_any:anything>",
        "route",
        view,
        methods=ALL_METHODS,
        provide_automatic_options=False,
        merge_slashes=False,
        strict_slashes=False,
    )
    return blueprint


def _serve(table: RouteTable, forwarder: Forwarder, proxy_keys: tuple[bytes, ...], anything: str) -> Response:
    environ = request.environ
    served, subpath = table.find(resolve_path(raw_path(environ)))
    route = served.route
    exchange = of(environ)
    exchange.route = route.label
    if environ["REQUEST_METHOD"] not in served.methods:
        # This route's 405: a method it does not serve never falls through to a broader route's sub-path.
        raise MethodNotAllowed(valid_methods=sorted(served.methods))
    drop: frozenset[str] = frozenset()
    if served.authenticator is not None:
        found = read_key(environ)
        exchange.on_finish = served.authenticator.admit(found[0] if found else None, served.endpoint)
        if found:
            proxy_keys = (*proxy_keys, digest(found[0]))
    if route.forward_headers and proxy_keys:
        drop = headers_carrying(environ, proxy_keys)
    return forwarder.forward(route, subpath, exchange, environ, drop)
