"""The virtual-key API: LiteLLM's /key/* and /spend/logs paths and field names, master key only, JSON in and out.

Each operation is a plain function of (store, fields) returning the JSON answer; the blueprint and the
`passthru keys` command both call them, so the two cannot drift apart.
"""

from __future__ import annotations

import hmac
import json
import math
import re
import secrets
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime, timedelta
from functools import partial
from typing import Any

from flask import Blueprint, Response, request

from passthru.auth import digest, read_key
from passthru.config import KEY_API_PATHS
from passthru.errors import AccessDenied, AuthError, NotFound, RequestError
from passthru.key_records import KeyInfo, KeyStore, NewKey, SpendEntry
from passthru.store import LazyStore

Fields = Mapping[str, Any]
Operation = Callable[[KeyStore, Fields], Any]

# LiteLLM's duration strings ("30s", "10m", "1h", "7d", "2w", "1mo").
DURATION = re.compile(r"^([0-9]+)(s|m|h|d|w|mo)$")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "mo": 30 * 86400}
# A custom key: what generated keys look like, so the log filter (logs.KEY_PATTERN) recognises every key.
CUSTOM_KEY = re.compile(r"^sk-[A-Za-z0-9_-]{8,200}$")
TOKEN = re.compile(r"^[0-9a-f]{64}$")
NEW_KEY_FIELDS = frozenset({"key", "key_alias", "duration", "max_budget", "rpm_limit", "allowed_routes", "metadata"})
UPDATE_FIELDS = frozenset({"key", "key_alias", "duration", "max_budget", "spend", "rpm_limit", "allowed_routes",
                           "metadata", "blocked"})  # fmt: skip
MAX_PAGE_SIZE = 100  # LiteLLM's bound for /key/list
MAX_SPEND_LOGS = 10_000


def _fields(body: Fields, known: frozenset[str]) -> dict[str, Any]:
    """The fields passthru serves. LiteLLM's other fields (models, team_id, tpm_limit, …) are accepted while empty,
    as LiteLLM's clients send them so; with a value they are refused: a limit silently not enforced is worse."""
    for name, value in body.items():
        if name not in known and value:
            raise RequestError(f"{name} is not supported by passthru (supported: {', '.join(sorted(known))})",
                               param=name)  # fmt: skip
    return {name: value for name, value in body.items() if name in known}


def token_of(value: Any, param: str = "key") -> str:
    """The stored hash for a key given as sk-… or as its 64-hex token (LiteLLM accepts either)."""
    if not isinstance(value, str) or not value:
        raise RequestError(f"{param} must be a key (sk-…) or its hashed token", param=param)
    if value.startswith("sk-"):
        return digest(value).hex()
    if TOKEN.match(value):
        return value
    raise RequestError(f"{param} must be a key (sk-…) or its hashed token", param=param)


def _number(fields: Fields, name: str, *, integer: bool = False) -> Any:
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise RequestError(f"{name} must be {'an integer' if integer else 'a number'} or null", param=name)
    if value < 0 or not math.isfinite(value):
        raise RequestError(f"{name} must be zero or more", param=name)
    return value


def _duration(value: Any) -> float | None:
    if value is None:
        return None
    match = DURATION.match(value) if isinstance(value, str) else None
    if match is None:
        raise RequestError('duration must look like "30s", "10m", "1h", "7d", "2w" or "1mo", or be null',
                           param="duration")  # fmt: skip
    return float(int(match.group(1)) * DURATION_UNITS[match.group(2)])


def _routes(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(r, str) and r.startswith("/") for r in value):
        raise RequestError("allowed_routes must be a list of paths such as /v1/rerank, or null", param="allowed_routes")
    return tuple(value)


def _alias(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value or len(value) > 255):
        raise RequestError("key_alias must be a string of 1 to 255 characters, or null", param="key_alias")
    return value


def _metadata(value: Any) -> dict[str, Any]:
    if value is not None and not isinstance(value, dict):
        raise RequestError("metadata must be a JSON object", param="metadata")
    return value or {}


def _when(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC).isoformat()


def shown(info: KeyInfo) -> dict[str, Any]:
    """A key as /key/info, /key/list and the CLI show it: LiteLLM's field names, times in ISO 8601 UTC."""
    return {
        "token": info.token, "key_name": info.key_name, "key_alias": info.key_alias, "spend": info.spend,
        "max_budget": info.max_budget, "rpm_limit": info.rpm_limit,
        "allowed_routes": None if info.allowed_routes is None else list(info.allowed_routes),
        "metadata": dict(info.metadata), "blocked": info.blocked, "expires": _when(info.expires),
        "created_at": _when(info.created_at),
    }  # fmt: skip


def generate_key(store: KeyStore, body: Fields, *, master_key: str | None = None) -> dict[str, Any]:
    """POST /key/generate: the only answer that ever carries the key itself."""
    fields = _fields(body, NEW_KEY_FIELDS)
    key = fields.get("key")
    if key is None:
        key = "sk-" + secrets.token_urlsafe(16)
    elif not isinstance(key, str) or not CUSTOM_KEY.match(key):
        raise RequestError("key must be sk- followed by 8 to 200 letters, digits, - or _", param="key")
    elif master_key is not None and hmac.compare_digest(digest(key), digest(master_key)):
        raise RequestError("key must not be the master key", param="key")
    new = NewKey(
        token=digest(key).hex(), key_name=f"sk-...{key[-4:]}", key_alias=_alias(fields.get("key_alias")),
        duration=_duration(fields.get("duration")), max_budget=_number(fields, "max_budget"),
        rpm_limit=_number(fields, "rpm_limit", integer=True), allowed_routes=_routes(fields.get("allowed_routes")),
        metadata=_metadata(fields.get("metadata")),
    )  # fmt: skip
    info = store.create(new)
    return {"key": key, **shown(info), "token_id": info.token}


def key_info(store: KeyStore, args: Fields) -> dict[str, Any]:
    """GET /key/info?key=…: the key's fields and spend (the key may be given as its hashed token)."""
    token = token_of(args.get("key"))
    info = store.find(token)
    if info is None:
        raise NotFound("no such key", param="key")
    return {"key": token, "info": shown(info)}


def update_key(store: KeyStore, body: Fields) -> dict[str, Any]:
    """POST /key/update: change the fields given; null clears a limit, a duration counts from now."""
    fields = _fields(body, UPDATE_FIELDS)
    token = token_of(fields.pop("key", None))
    changes: dict[str, Any] = {}
    for name, value in fields.items():
        if name in ("max_budget", "spend"):
            changes[name] = _number(fields, name)
        elif name == "rpm_limit":
            changes[name] = _number(fields, name, integer=True)
        elif name == "duration":
            changes[name] = _duration(value)
        elif name == "allowed_routes":
            changes[name] = _routes(value)
        elif name == "metadata":
            changes[name] = _metadata(value)
        elif name == "key_alias":
            changes[name] = _alias(value)
        elif name == "blocked":
            if not isinstance(value, bool):
                raise RequestError("blocked must be true or false", param="blocked")
            changes[name] = value
    if changes.get("spend", 0) is None:
        raise RequestError("spend must be a number", param="spend")
    info = store.update(token, changes)
    if info is None:
        raise NotFound("no such key", param="key")
    return {"key": token, **shown(info)}


def delete_keys(store: KeyStore, body: Fields) -> dict[str, Any]:
    """POST /key/delete {"keys": […]}: all of them, or none when one does not exist."""
    keys = body.get("keys")
    if not isinstance(keys, list) or not keys:
        raise RequestError("keys must be a non-empty list of keys or hashed tokens", param="keys")
    tokens = [token_of(key, "keys") for key in keys]
    missing = store.delete(tokens)
    if missing:
        raise NotFound(f"{len(missing)} of the keys do not exist; none was deleted", param="keys")
    return {"deleted_keys": keys}


def set_blocked(store: KeyStore, body: Fields, *, blocked: bool) -> dict[str, Any]:
    """POST /key/block and /key/unblock {"key": …}: the key's fields after the change."""
    info = store.update(token_of(body.get("key")), {"blocked": blocked})
    if info is None:
        raise NotFound("no such key", param="key")
    return {"key": info.token, **shown(info)}


def _positive_int(args: Fields, name: str, default: int, most: int) -> int:
    value = args.get(name, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise RequestError(f"{name} must be a whole number", param=name) from None
    if not 1 <= number <= most:
        raise RequestError(f"{name} must be between 1 and {most}", param=name)
    return number


def list_keys(store: KeyStore, args: Fields) -> dict[str, Any]:
    """GET /key/list?page=&size=&key_alias=&return_full_object=: hashed tokens (or whole keys), newest first."""
    page = _positive_int(args, "page", 1, 10**9)
    size = _positive_int(args, "size", 10, MAX_PAGE_SIZE)
    full = str(args.get("return_full_object", "false")).lower() in ("true", "1", "yes")
    infos, total = store.page(page, size, args.get("key_alias") or None)
    return {
        "keys": [shown(info) if full else info.token for info in infos],
        "total_count": total,
        "current_page": page,
        "total_pages": -(-total // size),
    }


def _instant(value: Any, name: str, *, end: bool) -> float | None:
    """A date (YYYY-MM-DD, UTC, an end date counting its whole day) or an ISO 8601 time, as epoch seconds."""
    if value in (None, ""):
        return None
    try:
        if isinstance(value, str) and len(value) == 10:
            day = date.fromisoformat(value) + timedelta(days=1 if end else 0)
            return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        raise RequestError(f"{name} must be a date (YYYY-MM-DD) or an ISO 8601 time", param=name) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def spend_logs(store: KeyStore, args: Fields) -> list[dict[str, Any]]:
    """GET /spend/logs?key=&start_date=&end_date=: one entry per call made with a virtual key, newest first."""
    key = args.get("key") or args.get("api_key")  # api_key is LiteLLM's name for it
    token = token_of(key) if key else None
    start = _instant(args.get("start_date"), "start_date", end=False)
    end = _instant(args.get("end_date"), "end_date", end=True)
    limit = _positive_int(args, "limit", 1000, MAX_SPEND_LOGS)
    return [_entry(entry) for entry in store.spend_logs(token, start, end, limit)]


def _entry(entry: SpendEntry) -> dict[str, Any]:
    return {
        "request_id": entry.request_id, "api_key": entry.token, "call_type": "pass_through_endpoint",
        "route": entry.route, "status": "success" if entry.status < 400 else "failure", "status_code": entry.status,
        "spend": entry.spend, "startTime": _when(entry.start_time),
        "endTime": _when(entry.start_time + entry.duration), "request_duration_ms": round(entry.duration * 1000, 3),
    }  # fmt: skip


def build_key_api(store: LazyStore, master_key: str) -> Blueprint:
    """A fresh Blueprint serving KEY_API_PATHS; every call must carry the master key. A call with a key opens the
    store (in this worker, the first time): the master key's to serve it, any other to tell 403 from 401."""
    blueprint = Blueprint("keys", __name__)
    master = digest(master_key)

    def admit() -> KeyStore:
        found = read_key(request.environ)
        if found is None:
            raise AuthError("Authentication Error, no api key passed in.")
        key_digest = digest(found[0])
        keys = store.open().keys
        if hmac.compare_digest(key_digest, master):
            return keys
        if keys.find(key_digest.hex()) is not None:
            raise AccessDenied("only the master key may manage keys and read spend logs")
        raise AuthError("Authentication Error, invalid proxy key.")

    def bind(operation: Operation, from_body: bool) -> Callable[[], Response]:
        def view() -> Response:
            keys = admit()
            if from_body:
                body = request.get_json(force=True, silent=True)
                if not isinstance(body, dict):
                    raise RequestError("the body must be a JSON object")
                fields: Fields = body
            else:
                fields = request.args.to_dict()
            return Response(json.dumps(operation(keys, fields)), mimetype="application/json")

        return view

    routes: dict[str, tuple[str, Operation]] = {
        "/key/generate": ("POST", partial(generate_key, master_key=master_key)),
        "/key/info": ("GET", key_info),
        "/key/update": ("POST", update_key),
        "/key/delete": ("POST", delete_keys),
        "/key/list": ("GET", list_keys),
        "/key/block": ("POST", partial(set_blocked, blocked=True)),
        "/key/unblock": ("POST", partial(set_blocked, blocked=False)),
        "/spend/logs": ("GET", spend_logs),
    }
    assert tuple(routes) == KEY_API_PATHS  # config.py refuses pass-through routes that would cover these
    for path, (method, operation) in routes.items():
        name = path.strip("/").replace("/", "_")
        blueprint.add_url_rule(path, name, bind(operation, method == "POST"), methods=[method])
    return blueprint
