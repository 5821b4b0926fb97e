"""LiteLLM's health paths: liveliness for "is the process up", readiness for "can it serve" (its targets by name and
state; no URL, no header, no secret)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from flask import Blueprint, Response, jsonify

from passthru.config import Settings
from passthru.errors import KeyStoreError
from passthru.keystore.records import Store


def build_blueprint(
    settings: Settings,
    version: str,
    store: Store | None,
    cooling: Callable[[], Mapping[str, Sequence[tuple[str, float]]]],
) -> Blueprint:
    """/health/liveliness, and /health/readiness (also /health): route count, version, the key store's state, and
    each route's targets with their state in the worker that answers (`cooling`: forward.Forwarder.cooling).

    Not ready (503) when a configured key store cannot be reached: virtual keys would all be refused. So readiness
    opens the store, as the first virtual key would; liveliness never does. Targets cooling down leave it ready:
    calls still go to the one whose cooldown ends first.
    """
    blueprint = Blueprint("health", __name__)
    facts = {"routes": len(settings.endpoints), "version": version}

    @blueprint.get("/health/liveliness")
    def liveliness() -> Response:
        return jsonify("I'm alive!")  # LiteLLM's exact answer, which existing probes may match

    def targets() -> dict[str, list[dict[str, object]]]:
        return {
            path: [{"name": name, "state": "cooldown", "seconds_left": math.ceil(left)} if left
                   else {"name": name, "state": "ok"} for name, left in states]
            for path, states in cooling().items()
        }  # fmt: skip

    @blueprint.get("/health/readiness")
    @blueprint.get("/health")
    def ready() -> Response | tuple[Response, int]:
        if store is None:
            return jsonify({"status": "healthy", "db": "not configured", **facts, "targets": targets()})
        try:
            store.open().keys.ping()
        except KeyStoreError:
            return jsonify({"status": "unhealthy", "db": "unreachable", **facts, "targets": targets()}), 503
        return jsonify({"status": "healthy", "db": "connected", **facts, "targets": targets()})

    return blueprint
