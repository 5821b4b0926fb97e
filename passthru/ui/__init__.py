"""The admin page at /ui, served whenever master_key is set: log in with the master key, then keys, usage, routes
and logs, server-rendered (Flask's Jinja2) from templates/ and static/ in this package, no build step, nothing
fetched from elsewhere.

    __init__.py    the blueprint: the session gate, CSRF on every POST, the security headers, login and logout
    session.py     the signed session cookie, its CSRF token, the limit on failed logins
    keys_page.py   the key table, and keys made, edited, blocked and deleted through key_api's operations
    usage_page.py  spend, calls and tokens per day, key, route and model (the spend report's queries); charts.py draws
    routes_page.py each route and its live figures from the metrics
    logs_page.py   the newest spend log entries, filtered, and one entry
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, g, make_response, redirect, render_template, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from passthru.auth import digest
from passthru.config import Settings
from passthru.errors import PassthruError
from passthru.keystore.records import KeyAdmin, Store
from passthru.server_config import ServerSettings
from passthru.ui.session import COOKIE, LoginLimit, Sessions

# forward.Forwarder.cooling: each route's targets by name, with the seconds of cooldown each has left in this worker.
Cooling = Callable[[], Mapping[str, Sequence[tuple[str, float]]]]

log = logging.getLogger("passthru")

MAX_FORM_BYTES = 256 * 1024  # a form: the key API's own body limit
# No inline script, nothing from elsewhere, never inside a frame. Inline SVG is markup, not script, and draws with
# presentation attributes, which style-src does not govern.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}
OPEN_ENDPOINTS = frozenset({"ui.login", "ui.static"})


@dataclass(frozen=True)
class Admin:
    """What every page's views are bound to, once, when the blueprint is built."""

    settings: Settings
    store: Store
    master_token: str  # the master key's hash: its calls' entries in the spend log
    cooling: Cooling  # each route's targets by name, with their cooldown's seconds left in this worker

    def keys(self) -> KeyAdmin:
        """The key store's /key/* side, opened in this worker the first time a page needs it."""
        return self.store.open().admin


def build_blueprint(settings: Settings, store: Store, server: ServerSettings, cooling: Cooling) -> Blueprint:
    """A fresh Blueprint serving /ui and below; every page but the login needs a valid session."""
    from passthru.ui import keys_page, logs_page, routes_page, usage_page

    assert settings.master_key is not None  # the page is served only with a master key (app.py)
    sessions = Sessions(settings.master_key, server.ui_session, server.trusted_proxy)
    limit = LoginLimit()
    admin = Admin(settings, store, digest(settings.master_key).hex(), cooling)
    blueprint = Blueprint("ui", __name__, url_prefix="/ui", template_folder="templates", static_folder="static",
                          static_url_path="/static")  # fmt: skip

    @blueprint.before_request
    def gate() -> BaseResponse | None:
        request.max_content_length = MAX_FORM_BYTES  # past it werkzeug answers 413
        if request.endpoint in OPEN_ENDPOINTS:
            return None
        nonce = sessions.nonce(request.cookies.get(COOKIE))
        if nonce is None:
            if request.method == "GET":
                return redirect(url_for("ui.login"), 303)
            return _refused("Your session has ended: log in again.", 403)
        g.ui_csrf = sessions.csrf(nonce)
        if request.method == "POST" and not sessions.csrf_ok(nonce, request.form.get("csrf")):
            return _refused("This form is out of date (or was not sent by this page): nothing was changed.", 403)
        return None

    @blueprint.after_request
    def headers(response: Response) -> Response:
        response.headers.update(SECURITY_HEADERS)
        if request.endpoint != "ui.static":
            response.headers["Cache-Control"] = "no-store"  # pages show keys once, and spend: no copies kept
        return response

    @blueprint.errorhandler(PassthruError)
    def failed(error: PassthruError) -> tuple[str, int]:
        return render_template("ui/error.html", message=error.message), error.status

    @blueprint.app_template_global("ui_when")
    def when(seconds: float | None) -> str:
        return "never" if seconds is None else datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M UTC")

    @blueprint.app_template_global("ui_money")
    def money(amount: float | None) -> str:
        # Six decimals: a call priced per token can cost a millionth; trailing zeros dropped.
        return "—" if amount is None else f"{amount:,.6f}".rstrip("0").rstrip(".") if amount else "0"

    @blueprint.route("/login", methods=["GET", "POST"])
    def login() -> BaseResponse | tuple[str, int] | str:
        if request.method == "GET":
            if sessions.nonce(request.cookies.get(COOKIE)) is not None:
                return redirect(url_for("ui.keys"), 303)
            return render_template("ui/login.html")
        client = sessions.client(request.environ)
        wait = limit.wait(client)
        if wait:
            log.warning("admin page: login refused for %s: too many failed logins, %d s left", client, wait)
            return render_template("ui/login.html", error=f"Too many failed logins: try again in {wait} s."), 429
        if not sessions.is_master(request.form.get("key", "")):
            limit.failed(client)
            log.warning("admin page: failed login from %s", client)  # never the key that was tried
            return render_template("ui/login.html", error="That is not the master key."), 401
        log.info("admin page: login from %s", client)
        response = redirect(url_for("ui.keys"), 303)
        response.set_cookie(COOKIE, sessions.new(), **sessions.cookie(request.environ))
        return response

    @blueprint.post("/logout")
    def logout() -> BaseResponse:
        response = redirect(url_for("ui.login"), 303)
        response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="Strict",
                               secure=sessions.https(request.environ))  # fmt: skip
        return response

    @blueprint.get("/")
    def home() -> BaseResponse:
        return redirect(url_for("ui.keys"), 303)

    blueprint.add_url_rule("", "bare", home, methods=["GET"], strict_slashes=False)
    keys_page.add_rules(blueprint, admin)
    usage_page.add_rules(blueprint, admin)
    routes_page.add_rules(blueprint, admin, server.metrics_dir)
    logs_page.add_rules(blueprint, admin)
    return blueprint


def _refused(message: str, status: int) -> Response:
    return make_response(render_template("ui/error.html", message=message), status)


def back_to(default: str) -> str:
    """Where a form sends the browser once done: the page it came from (a path under /ui/), else `default`."""
    target = request.form.get("back", "")
    return target if target.startswith("/ui/") and "//" not in target and "\\" not in target else default


def shown_value(value: Any) -> str:
    """A form field's value as the form shows it again: empty for None."""
    return "" if value is None else str(value)
