"""The caller's passthru key: where it is read, how it is checked, and which headers carry it (never upstream)."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Mapping
from typing import Any

from passthru.config import Endpoint
from passthru.errors import AccessDenied, AuthError, BudgetExceeded, KeyStoreError, PassthruError, RateLimited
from passthru.keystore.records import CallStore, KeyInfo, Opened, Refusal, Store
from passthru.limits import Held, Limits

# The header forms LiteLLM accepts, in the order they are read: the first one present is the key.
CREDENTIAL_HEADERS = ("x-litellm-api-key", "authorization", "api-key", "x-api-key", "x-goog-api-key")
BEARER = re.compile(r"bearer\s+", re.IGNORECASE)
WORDS = re.compile(r"[\s,]+")
_ENVIRON_KEYS = tuple((name, "HTTP_" + name.upper().replace("-", "_")) for name in CREDENTIAL_HEADERS)

# How long a worker trusts what it read of a key: a change of allowed_routes, and the blocking or deleting of a key
# with no rpm_limit, max_budget or expiry, take at most this long to reach every worker. A key with any of those
# three is decided by the store (KeyInfo.counted), a few calls at a time for a busy key: they take at most
# leases.HOLD, the same second.
CACHE_SECONDS = 1.0
CACHE_SIZE = 10_000  # keys remembered per worker (and as many unknown ones); past that the memory starts over
# Store reads a second, per worker, that may find no key (see RecentKeys): what a flood of made-up keys costs at most.
UNKNOWN_READS = 100


def digest(key: str) -> bytes:
    """sha256 of a key: what is kept and compared, so neither the key nor its length is compared directly."""
    return hashlib.sha256(key.encode("utf-8")).digest()


def _bare(name: str, value: str) -> str | None:
    value = value.strip()
    bearer = BEARER.match(value)
    if bearer:
        return value[bearer.end() :] or None
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
    """The credential headers that carry one of these keys in any form an upstream might accept it in: forward_headers
    must not relay them.

    Every word of the value is compared, so a key without a scheme (`Authorization: K`), after a Bearer in any case
    and spacing, or in one of several header lines (which the WSGI server joins with commas) is found.
    """
    found = set()
    for name, environ_key in _ENVIRON_KEYS:
        value = environ.get(environ_key)
        if value is None:
            continue
        words = [digest(word) for word in WORDS.split(value) if word]
        if any(hmac.compare_digest(word, key) for word in words for key in key_digests):
            found.add(name)
    return frozenset(found)


NO_KEY = "Authentication Error, no api key passed in."  # LiteLLM's messages, word for word
INVALID_KEY = "Authentication Error, invalid proxy key."


class Authenticator:
    """The one check of a caller's key: for pass-through routes (`admit`), /metrics (`require_master`) and the key
    API (`require_admin`). The master key passes without the store; any other key is looked up in the store (opened
    in this worker the first time), through what this worker remembers of keys (RecentKeys)."""

    def __init__(self, master_key: str, store: Store | None) -> None:
        self.master = digest(master_key)
        self.store = store
        self.recent = RecentKeys()

    def identify(self, key: str | None) -> tuple[Opened, KeyInfo] | None:
        """None for the master key; for a virtual key, the opened store and the key's record; AuthError (401) for no
        key or one the store does not hold."""
        if key is None:
            raise AuthError(NO_KEY)
        key_digest = digest(key)
        if hmac.compare_digest(key_digest, self.master):
            return None
        if self.store is None:
            raise AuthError(INVALID_KEY)
        opened = self.store.open()
        info = self.recent.get(opened.keys, key_digest.hex())
        if info is None:
            raise AuthError(INVALID_KEY)
        return opened, info

    def admit(self, key: str | None, endpoint: Endpoint, limits: Limits | None) -> tuple[str, float, Held | None]:
        """May this key call this route? The master key always; a virtual key when it is allowed the route and, for
        a key with limits or an expiry, the store (or a lease, keystore/leases.py) admits the call; otherwise from
        what this worker read of it (KeyInfo.counted says why). In between, the route's limits and the key's calls
        in flight (limits.py): a call they refuse is never counted against the key.

        Returns the token the call is logged and charged under (the master key's hash for its calls, as LiteLLM logs
        them), what the store already charged (a counted key's cost_per_request): the rest is charged at the end,
        and what the call holds until its answer ends.
        """
        found = self.identify(key)
        if found is None:
            return self.master.hex(), 0.0, None if limits is None else limits.enter(None)
        opened, info = found
        if not route_allowed(info.allowed_routes, endpoint.path):
            raise AccessDenied(f"this key is not allowed to call {endpoint.path}", param="allowed_routes")
        if not info.counted and info.blocked:
            raise key_refused("blocked")
        held = None if limits is None else limits.enter(info)
        if info.counted:
            try:
                refusal = opened.leases.admit(info, endpoint.cost_per_request)
                if refusal is not None:
                    raise refused(refusal)
            except BaseException:  # refused, or the store failed: the call is not made
                if held is not None:
                    held.undo()
                raise
        return info.token, endpoint.cost_per_request if info.counted else 0.0, held

    def require_master(self, environ: Mapping[str, Any]) -> None:
        """/metrics when protected: the master key passes, anything else is 401 (the store is never opened)."""
        found = read_key(environ)
        if found is None:
            raise AuthError(NO_KEY)
        if not hmac.compare_digest(digest(found[0]), self.master):
            raise AuthError(INVALID_KEY)

    def require_admin(self, environ: Mapping[str, Any]) -> Opened:
        """The key API: the master key passes (and gets the opened store); a valid virtual key is 403, as in
        LiteLLM, which only the store can tell from an unknown one (401)."""
        found = read_key(environ)
        key = found[0] if found else None
        if self.identify(key) is not None:
            raise AccessDenied("only the master key may manage keys and read spend logs")
        assert self.store is not None  # the key API is served only with a store
        return self.store.open()


def route_allowed(allowed: tuple[str, ...] | None, path: str) -> bool:
    """allowed_routes holds configured paths (their sub-paths included) or prefixes ending in *.

    None or an empty list allows every route, as in LiteLLM (whose keys default to allowed_routes: []).
    """
    if not allowed or path in allowed:
        return True
    return any(entry.endswith("*") and path.startswith(entry[:-1]) for entry in allowed)


def refused(refusal: Refusal) -> PassthruError:
    """The store's reason for refusing a call, as LiteLLM answers it."""
    if refusal.reason == "budget":
        return BudgetExceeded(
            f"Budget has been exceeded! Current cost: {refusal.spend:g}, Max budget: {refusal.max_budget:g}"
        )
    if refusal.reason in ("rpm", "tpm"):
        return RateLimited(
            f"Rate limit exceeded: this key's {refusal.reason}_limit is reached; retry in {refusal.retry_after}s",
            retry_after=refusal.retry_after,
            limit=f"key_{refusal.reason}_limit",
        )
    return key_refused(refusal.reason)


def key_refused(reason: str) -> AuthError:
    """The 401 for a key that is blocked, expired or unknown."""
    problem = {"blocked": "this key is blocked", "expired": "this key has expired"}.get(reason)
    return AuthError(f"Authentication Error, {problem}." if problem else INVALID_KEY)


class RecentKeys:
    """The keys this worker read in the last CACHE_SECONDS, and the keys it found not to exist, forgotten as soon as
    this worker changes or makes any key: the route check, a key without limits, and a repeated unknown key cost no
    query on the hot path.

    A flood of keys nobody issued (each one new) would still cost a store read each: past UNKNOWN_READS reads a
    second that found no key, a key this worker has never found valid is answered 503 (try again shortly) without
    a read, until that second is over. Keys this worker found valid before are read as usual.
    """

    def __init__(self, seconds: float = CACHE_SECONDS, size: int = CACHE_SIZE, unknown_reads: int = UNKNOWN_READS):
        self.seconds = seconds
        self.size = size
        self.unknown_reads = unknown_reads
        # token → (good until, on the monotonic clock; the store's edits when read; info). Kept past their time: a
        # key once found valid is never held back by the flood bound.
        self._entries: dict[str, tuple[float, int, KeyInfo]] = {}
        self._unknown: dict[str, tuple[float, int]] = {}  # token → (good until; the store's edits when read)
        self._second = 0.0  # when the current second of the flood bound began
        self._misses = 0  # reads in it that found no key

    def get(self, store: CallStore, token: str) -> KeyInfo | None:
        """The key's stored fields, at most `seconds` old; None when the store has no such key."""
        now = time.monotonic()
        entry = self._entries.get(token)
        if entry is not None and entry[0] > now and entry[1] == store.edits:
            return entry[2]
        unknown = self._unknown.get(token)
        if unknown is not None and unknown[0] > now and unknown[1] == store.edits:
            return None
        if entry is None:
            if now - self._second >= 1.0:
                self._second, self._misses = now, 0
            elif self._misses >= self.unknown_reads:
                raise KeyStoreError("too many calls with unknown keys; try again shortly")
        edits = store.edits  # before reading: an edit made meanwhile leaves this entry out of date, as it should
        info = store.find(token)
        if info is None:
            self._entries.pop(token, None)
            if entry is None:
                self._misses += 1  # not under a lock: threads may miscount by a few, never without bound
            if len(self._unknown) >= self.size:
                self._unknown.clear()
            self._unknown[token] = (now + self.seconds, edits)
            return None
        self._unknown.pop(token, None)
        if len(self._entries) >= self.size:
            self._entries.clear()  # dict operations are atomic under the GIL: threads need no lock here
        self._entries[token] = (now + self.seconds, edits, info)
        return info
