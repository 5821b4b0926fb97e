"""LiteLLM's health paths: liveliness for "is the process up", readiness for "can it serve" (no secrets, no targets)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from passthru.config import Settings


def build_blueprint(settings: Settings, version: str) -> Blueprint:
    """/health/liveliness, and /health/readiness (also /health) with the route count and the version."""
    blueprint = Blueprint("health", __name__)
    readiness = {"status": "healthy", "routes": len(settings.endpoints), "version": version}

    @blueprint.get("/health/liveliness")
    def liveliness() -> Response:
        return jsonify("I'm alive!")  # LiteLLM's exact answer, which existing probes may match

    @blueprint.get("/health/readiness")
    @blueprint.get("/health")
    def ready() -> Response:
        return jsonify(readiness)

    return blueprint
