"""The caller's passthru key: where it is read, how it is checked, and which headers carry it (never upstream)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any, Protocol

from passthru.config import Endpoint
from passthru.errors import AuthError

# The header forms LiteLLM accepts, in the order they are read: the first one present is the key.
CREDENTIAL_HEADERS = ("x-litellm-api-key", "authorization", "api-key", "x-api-key", "x-goog-api-key")
_ENVIRON_KEYS = tuple((name, "HTTP_" + name.upper().replace("-", "_")) for name in CREDENTIAL_HEADERS)


class KeyCheck(Protocol):
    """Decides whether a key may call an endpoint; raises AuthError (or a subclass of PassthruError) if not."""

    def __call__(self, key: str | None, endpoint: Endpoint) -> None: ...


def digest(key: str) -> bytes:
    """sha256 of a key: what is kept and compared, so neither the key nor its length is compared directly."""
    return hashlib.sha256(key.encode("utf-8")).digest()


def _bare(name: str, value: str) -> str | None:
    value = value.strip()
    if value[:7].lower() == "bearer ":
        return value[7:].strip() or None
    if name == "authorization":
        return None  # Basic and other schemes are the upstream's business, not a passthru key
    return value or None


def read_key(environ: Mapping[str, Any]) -> tuple[str, str] | None:
    """The caller's key and the lower-case header it came in, or None when no credential header is present."""
    for name, environ_key in _ENVIRON_KEYS:
        value = environ.get(environ_key)
        if value is not None:
            key = _bare(name, value)
            if key is not None:
                return key, name
    return None


def headers_carrying(environ: Mapping[str, Any], key_digests: tuple[bytes, ...]) -> frozenset[str]:
    """The credential headers whose value is one of these keys: forward_headers must not relay them."""
    found = set()
    for name, environ_key in _ENVIRON_KEYS:
        value = environ.get(environ_key)
        key = _bare(name, value) if value is not None else None
        if key is not None and any(hmac.compare_digest(digest(key), d) for d in key_digests):
            found.add(name)
    return frozenset(found)


def verify(key: str | None, expected: bytes) -> None:
    """Raise AuthError unless the key's digest is `expected` (compared in constant time)."""
    if key is None:
        raise AuthError("Authentication Error, no api key passed in.")
    if not hmac.compare_digest(digest(key), expected):
        raise AuthError("Authentication Error, invalid proxy key.")


def require_master_key(environ: Mapping[str, Any], expected: bytes) -> None:
    """For passthru's own admin routes (/metrics when protected): only the master key passes."""
    found = read_key(environ)
    verify(found[0] if found else None, expected)


def master_key_check(master_key: str) -> KeyCheck:
    """The check for a config with only a master_key: that key passes, anything else is 401."""
    expected = digest(master_key)

    def check(key: str | None, endpoint: Endpoint) -> None:
        verify(key, expected)

    return check
