"""The admin page's login: a signed session cookie (who may see the page), the CSRF token tied to it (which form
may change something), and the limit on failed logins per client address."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer

from passthru.auth import digest

COOKIE = "passthru_ui"
# The signing secret is derived from the master key with this label: the same on every worker and host that has the
# master key, and a different one (everyone logged out) once the master key changes.
LABEL = b"passthru admin page session v1"
FAILED_LOGINS = 10  # per client address and minute, per worker
LIMIT_WINDOW = 60.0
LIMIT_ADDRESSES = 10_000  # addresses remembered per worker; past that the expired ones go, then all


def secret_of(master_key: str) -> bytes:
    """HMAC-SHA256 of a fixed label, keyed with the master key: the session cookie's signing secret."""
    return hmac.new(master_key.encode("utf-8"), LABEL, hashlib.sha256).digest()


class Sessions:
    """Session cookies signed with a secret derived from the master key (itsdangerous, which comes with Flask).

    A cookie holds a random nonce and the time of the login, both signed; it is good for `lifetime` seconds from the
    login, however often it is used. The nonce is the session's identity: the CSRF token is an HMAC of it, so a token
    from one session is refused in another. Nothing is kept on the server: a logout clears the browser's cookie, and
    a new master key invalidates every cookie at once.
    """

    def __init__(self, master_key: str, lifetime: float, trusted_proxy: Callable[[str], bool]) -> None:
        secret = secret_of(master_key)
        self.master = digest(master_key)
        self.lifetime = lifetime
        self.trusted_proxy = trusted_proxy
        self._serializer = URLSafeTimedSerializer(secret, salt="session")
        self._csrf_key = hmac.new(secret, b"csrf", hashlib.sha256).digest()

    def is_master(self, key: str) -> bool:
        """Whether the key typed at the login is the master key (compared as sha256 digests, in constant time)."""
        return hmac.compare_digest(digest(key), self.master)

    def new(self) -> str:
        """A new session's cookie value."""
        return self._serializer.dumps({"n": secrets.token_urlsafe(18)})

    def nonce(self, cookie: str | None) -> str | None:
        """The session's nonce, or None for no cookie, a forged or altered one, or one older than the lifetime."""
        if not cookie:
            return None
        try:
            data = self._serializer.loads(cookie, max_age=int(self.lifetime))  # a future timestamp is refused too
        except BadSignature:
            return None
        nonce = data.get("n") if isinstance(data, dict) else None
        return nonce if isinstance(nonce, str) else None

    def csrf(self, nonce: str) -> str:
        """The CSRF token of the session with this nonce: what every form that changes something carries."""
        return hmac.new(self._csrf_key, nonce.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, nonce: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf(nonce), str(token))

    def cookie(self, environ: Mapping[str, Any]) -> dict[str, Any]:
        """The cookie's attributes: HttpOnly, SameSite=Strict, only for /ui, Secure when the request came over HTTPS."""
        return {"max_age": int(self.lifetime), "path": "/ui", "httponly": True, "samesite": "Strict",
                "secure": self.https(environ)}  # fmt: skip

    def https(self, environ: Mapping[str, Any]) -> bool:
        """Whether the browser talks HTTPS: to us, or to a trusted front (FORWARDED_ALLOW_IPS) that says so."""
        if environ.get("wsgi.url_scheme") == "https":
            return True
        proto = environ.get("HTTP_X_FORWARDED_PROTO", "")
        return proto.strip().lower() == "https" and self.trusted_proxy(environ.get("REMOTE_ADDR", ""))

    def client(self, environ: Mapping[str, Any]) -> str:
        """The client's address: the peer's, or behind trusted fronts the nearest address in X-Forwarded-For that is
        not one of them (what nginx's $proxy_add_x_forwarded_for appended)."""
        address = str(environ.get("REMOTE_ADDR", ""))
        if self.trusted_proxy(address):
            for hop in reversed(environ.get("HTTP_X_FORWARDED_FOR", "").split(",")):
                if hop.strip():
                    address = hop.strip()
                    if not self.trusted_proxy(address):
                        break
        return address[:64]  # a log line's worth


class LoginLimit:
    """Failed logins per client address, at most `failures` in a fixed window of `window` seconds, in this worker.

    Each gunicorn worker counts its own: with N workers an address may try N times as often, which still leaves a
    random master key out of reach, and costs no store write per attempt.
    """

    def __init__(self, failures: int = FAILED_LOGINS, window: float = LIMIT_WINDOW, size: int = LIMIT_ADDRESSES):
        self.failures = failures
        self.window = window
        self.size = size
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, int]] = {}  # address → (its window's start, monotonic; failures in it)

    def wait(self, address: str) -> int:
        """Seconds until this address may try again; 0 when it may now."""
        now = time.monotonic()
        with self._lock:
            start, count = self._seen.get(address, (now, 0))
        if start + self.window <= now or count < self.failures:
            return 0
        return max(1, int(start + self.window - now + 0.999))

    def failed(self, address: str) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._seen) >= self.size:
                self._seen = {a: seen for a, seen in self._seen.items() if seen[0] + self.window > now}
                if len(self._seen) >= self.size:
                    self._seen.clear()
            start, count = self._seen.get(address, (now, 0))
            if start + self.window <= now:
                start, count = now, 0
            self._seen[address] = (start, count + 1)
