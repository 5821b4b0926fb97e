"""LiteLLM's health paths: liveliness for "is the process up", readiness for "can it serve" (no secrets, no targets)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from passthru.config import Settings
from passthru.errors import KeyStoreError
from passthru.keystore.records import Store


def build_blueprint(settings: Settings, version: str, store: Store | None) -> Blueprint:
    """/health/liveliness, and /health/readiness (also /health): route count, version, and the key store's state.

    Not ready (503) when a configured key store cannot be reached: virtual keys would all be refused. So readiness
    opens the store, as the first virtual key would; liveliness never does.
    """
    blueprint = Blueprint("health", __name__)
    facts = {"routes": len(settings.endpoints), "version": version}

    @blueprint.get("/health/liveliness")
    def liveliness() -> Response:
        return jsonify("I'm alive!")  # LiteLLM's exact answer, which existing probes may match

    @blueprint.get("/health/readiness")
    @blueprint.get("/health")
    def ready() -> Response | tuple[Response, int]:
        if store is None:
            return jsonify({"status": "healthy", "db": "not configured", **facts})
        try:
            store.open().keys.ping()
        except KeyStoreError:
            return jsonify({"status": "unhealthy", "db": "unreachable", **facts}), 503
        return jsonify({"status": "healthy", "db": "connected", **facts})

    return blueprint
