"""passthru's errors and the one place they become LiteLLM-shaped JSON answers.

    PassthruError               anything passthru raises on purpose (500)
    ├── ConfigError             the config file is wrong; raised at start-up only
    ├── RequestError            the caller's request is malformed (400)
    ├── BudgetExceeded          a virtual key has spent its max_budget (400, LiteLLM's `budget_exceeded`)
    ├── AuthError               no key, or an unknown, blocked or expired one (401)
    │   └── AccessDenied        a valid key that may not do this: route not allowed, admin-only API (403)
    ├── NotFound                the key named in a /key/* call does not exist (404)
    ├── RateLimited             a key or route over a limit (rpm, tpm, calls in flight); carries Retry-After (429)
    ├── KeyStoreError           the key store cannot be reached or answered with an error (503)
    └── UpstreamError           the upstream refused, reset or broke the exchange (502)
        └── UpstreamTimeout     the upstream did not answer within the route's timeout (504)

Messages are written for the caller: they never carry a library's exception text, which can hold the upstream
URL and so a secret. The library exception is chained (`raise ... from exc`) and logged instead.
"""

from __future__ import annotations

import json
import logging

from flask import Flask, Response
from werkzeug.exceptions import HTTPException, MethodNotAllowed

log = logging.getLogger("passthru")


class PassthruError(Exception):
    """Base of every error passthru raises on purpose; carries the answer's status and LiteLLM error type."""

    status = 500
    type = "internal_server_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    @property
    def headers(self) -> dict[str, str]:
        """Extra headers of the answer (Retry-After on a 429)."""
        return {}


class ConfigError(PassthruError):
    """The config file cannot be served; the message names the file, the entry and the field."""


class RequestError(PassthruError):
    status = 400
    type = "bad_request_error"


class BudgetExceeded(PassthruError):
    status = 400
    type = "budget_exceeded"


class AuthError(PassthruError):
    status = 401
    type = "auth_error"


class AccessDenied(AuthError):
    status = 403


class NotFound(PassthruError):
    status = 404
    type = "not_found_error"


class RateLimited(PassthruError):
    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: int, limit: str) -> None:
        super().__init__(message)
        self.retry_after = max(1, retry_after)
        self.limit = limit  # which one: its config or key field's name, "key_" first for a key's (metrics.LIMITED)

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class KeyStoreError(PassthruError):
    """The store is down or failing; the message never carries the driver's text (it can hold the URL)."""

    status = 503
    type = "service_unavailable"


class UpstreamError(PassthruError):
    status = 502
    type = "upstream_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "timeout_error"


# LiteLLM error types for the statuses passthru and its servers answer on their own.
HTTP_ERROR_TYPES = {
    400: "bad_request_error",
    401: "auth_error",
    403: "auth_error",
    404: "not_found_error",
    405: "method_not_allowed",
    413: "bad_request_error",
    414: "bad_request_error",
    415: "bad_request_error",
    431: "bad_request_error",
}


def error_response(
    status: int,
    message: str,
    error_type: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """Build the JSON error answer in LiteLLM's shape: {"error": {"message", "type", "param", "code"}}."""
    return Response(error_body(status, message, error_type, param), status, headers, mimetype="application/json")


def error_body(status: int, message: str, error_type: str, param: str | None = None) -> bytes:
    """LiteLLM's error shape, encoded."""
    body = {"error": {"message": message, "type": error_type, "param": param, "code": str(status)}}
    return json.dumps(body).encode()


def register_error_handlers(app: Flask) -> None:
    """Turn every exception that reaches Flask into a JSON answer, never a stack trace."""

    @app.errorhandler(PassthruError)
    def _passthru(exc: PassthruError) -> Response:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.headers or None)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response | HTTPException:
        status = exc.code or 500
        if status < 400:  # routing redirects (a missing trailing slash) are answers, not errors
            return exc
        headers = {}
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            headers["Allow"] = ", ".join(exc.valid_methods)
        return error_response(
            status, exc.description or exc.name, HTTP_ERROR_TYPES.get(status, exc.name), None, headers
        )

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unexpected error")
        return error_response(500, "internal error", "internal_server_error")
