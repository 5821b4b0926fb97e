"""The blueprint: one URL rule per pass-through entry, each bound at start-up to its route, session and key check."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import requests
from flask import Blueprint, request
from werkzeug.wrappers import Response

from passthru.auth import KeyCheck, digest, headers_carrying, read_key
from passthru.config import Settings
from passthru.forward import forward
from passthru.upstream_request import Route, compile_route


def build_blueprint(
    settings: Settings,
    session: requests.Session,
    key_check: KeyCheck | None,
    trusted_proxy: Callable[[str], bool],
) -> Blueprint:
    """A fresh Blueprint with the exact path of each entry, plus everything under it when include_subpath."""
    blueprint = Blueprint("passthru", __name__)
    # The master key is stripped from relayed headers on every route, authenticated or not.
    proxy_keys = (digest(settings.master_key),) if settings.master_key else ()
    for endpoint in settings.endpoints:
        view = partial(
            _serve,
            compile_route(endpoint, session, trusted_proxy),
            key_check if endpoint.auth else None,
            proxy_keys,
        )
        options: dict[str, Any] = {
            "methods": endpoint.methods,
            "provide_automatic_options": False,
            "merge_slashes": False,
        }
        name = f"route_{endpoint.index}"
        blueprint.add_url_rule(endpoint.path, name, view, defaults={"subpath": None}, **options)
        if endpoint.include_subpath:
            prefix = endpoint.path.rstrip("/")
            blueprint.add_url_rule(f"{prefix}/", f"{name}_slash", view, defaults={"subpath": ""}, **options)
            blueprint.add_url_rule(f"{prefix}/<path:subpath>", f"{name}_sub", view, **options)
    return blueprint


def _serve(route: Route, key_check: KeyCheck | None, proxy_keys: tuple[bytes, ...], subpath: str | None) -> Response:
    environ = request.environ
    environ["passthru.route"] = route.endpoint.path
    drop: frozenset[str] = frozenset()
    if key_check is not None:
        found = read_key(environ)
        finish = key_check(found[0] if found else None, route.endpoint)
        if finish is not None:
            environ["passthru.on_finish"] = finish  # logs.AccessLog calls it once the body is done
        if found:
            proxy_keys = (*proxy_keys, digest(found[0]))
    if route.endpoint.forward_headers and proxy_keys:
        drop = headers_carrying(environ, proxy_keys)
    return forward(route, subpath, environ, drop)
