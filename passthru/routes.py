"""Which route serves a request: its path resolved once (paths.py), then the longest configured path that owns it.

werkzeug's URL map serves passthru's own paths (/health, /metrics, /key/*); everything else reaches one catch-all
rule, and the table here decides. A route is never chosen from the raw path and its dot segments resolved later
inside it: the path that picks the route, and so its auth, methods and cost, is the path sent upstream.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from urllib.parse import unquote

from flask import Blueprint, request
from flask.blueprints import BlueprintSetupState
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import BaseConverter
from werkzeug.wrappers import Response

from passthru import metrics
from passthru.auth import Authenticator, digest, headers_carrying, read_key
from passthru.config import ALL_METHODS, BUILT_IN_PATHS, KEY_API_PATHS, UI_PATH, Endpoint, Settings
from passthru.errors import RateLimited, RequestError
from passthru.exchange import Exchange, of
from passthru.forward import Forwarder
from passthru.limits import Limits
from passthru.paths import ResolvedPath, loose, raw_path, resolve_path
from passthru.pricing import Pricing
from passthru.upstream_request import Route


def _key(segments: tuple[str, ...] | list[str]) -> str:
    return "/" + "/".join(segments)


@dataclass(frozen=True)
class Served:
    """One route as the table serves it: what to forward, the key check when auth is on, its limits, the methods
    allowed, what its calls cost."""

    endpoint: Endpoint  # what the key check weighs: the route's path (allowed_routes) and cost
    route: Route
    authenticator: Authenticator | None  # None on an auth: false route
    methods: frozenset[str]
    pricing: Pricing
    limits: Limits | None = None  # its own and its keys' (limits.py); None: its calls have none


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
        lenient = [loose(segment) for segment in path.decoded]
        if lenient != list(path.decoded):
            other = _lookup(lenient, path.encoded, path.trailing_slash, self.loose_exact, self.loose_prefixes)
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


def _any_path_but(own: tuple[str, ...], trees: tuple[str, ...] = ()) -> type[BaseConverter]:
    """A converter for every path, empty and slash-led ones too, except passthru's own paths and those below `trees`
    (the admin page's): the route table, not werkzeug, reads and resolves it; and a wrong method on /key/generate or
    /ui/keys stays werkzeug's 405 with its Allow."""
    exclude = "|".join([re.escape(path.lstrip("/")) + "$" for path in own] +
                       [re.escape(tree.lstrip("/")) + "(?:/|$)" for tree in trees])  # fmt: skip

    class AnyPath(BaseConverter):
        regex = f"(?!(?:{exclude})).*"
        part_isolating = False

    return AnyPath


def build_table(
    settings: Settings,
    forwarder: Forwarder,
    authenticator: Authenticator | None,
    limits: Callable[[Endpoint, bool], Limits | None],
) -> RouteTable:
    """Each endpoint compiled and bound to its key check and limits, under its decoded path (config.py refuses
    clashes)."""
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
            Pricing(endpoint.cost_per_request, endpoint.prices, settings.model_prices),
            limits(endpoint, endpoint.auth),
        )
        segments = [unquote(part, encoding="latin-1") for part in endpoint.path.split("/") if part]
        exact[_key(segments)] = served
        loose_exact[_key([loose(s) for s in segments])] = served
        if endpoint.include_subpath:
            prefixes[_key(segments)] = served
            loose_prefixes[_key([loose(s) for s in segments])] = served
    return RouteTable(exact, prefixes, loose_exact, loose_prefixes)


def build_blueprint(
    settings: Settings,
    forwarder: Forwarder,
    authenticator: Authenticator | None,
    limits: Callable[[Endpoint, bool], Limits | None],
) -> Blueprint:
    """A fresh Blueprint whose one catch-all rule hands every path werkzeug does not know to the route table.
    `limits` binds a route's limits (limits.bind, with the worker's store and slot files)."""
    blueprint = Blueprint("passthru", __name__)
    # The master key is stripped from relayed headers on every route, authenticated or not.
    proxy_keys = (digest(settings.master_key),) if settings.master_key else ()
    view = partial(_serve, build_table(settings, forwarder, authenticator, limits), forwarder, proxy_keys)
    own = BUILT_IN_PATHS + (KEY_API_PATHS if settings.master_key else ())
    converter = _any_path_but(own, (UI_PATH,) if settings.master_key else ())

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
        _admit(served, found[0] if found else None, exchange)
        if found:
            proxy_keys = (*proxy_keys, digest(found[0]))
    elif served.limits is not None:
        _admit(served, None, exchange)
    if route.forward_headers and proxy_keys:
        drop = headers_carrying(environ, proxy_keys)
    exchange.pricing = served.pricing  # admitted: from here on the call is metered, logged and charged
    return forwarder.forward(route, subpath, exchange, environ, drop)


def _admit(served: Served, key: str | None, exchange: Exchange) -> None:
    """The key check (auth: true) and the limits (limits.py), in that order; the refusals by a limit counted."""
    try:
        if served.authenticator is not None:
            exchange.caller, exchange.precharged, exchange.held = served.authenticator.admit(
                key, served.endpoint, served.limits
            )
        elif served.limits is not None:
            exchange.held = served.limits.enter(None)
    except RateLimited as exc:
        metrics.limited(exchange.route, exc.limit)
        raise
