"""The virtual-key API: LiteLLM's /key/*, /spend/logs and /global/spend/report paths and field names, master key only,
JSON in and out.

Each operation is a plain function of (store, fields) returning the JSON answer; the blueprint and the
`passthru keys` command both call them, so the two cannot drift apart.
"""

from __future__ import annotations

import hmac
import json
import secrets
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from functools import partial
from typing import Any, cast

from flask import Blueprint, Response, request

from passthru import key_fields
from passthru.auth import Authenticator, digest
from passthru.config import KEY_API_PATHS
from passthru.errors import NotFound, RequestError
from passthru.key_fields import (
    CUSTOM_KEY,
    MAX_BODY_BYTES,
    MAX_KEYS_PER_DELETE,
    MAX_PAGE,
    MAX_PAGE_SIZE,
    MAX_REPORT_DAYS,
    MAX_REPORT_ROWS,
    MAX_SPEND_LOGS,
    Fields,
    token_of,
)
from passthru.keystore.records import KeyAdmin, KeyInfo, NewKey, ReportGroup, SpendEntry

Operation = Callable[[KeyAdmin, Fields], Any]

NEW_KEY_FIELDS = frozenset({"key", "key_alias", "duration", "max_budget", "rpm_limit", "tpm_limit", "budget_duration",
                            "allowed_routes", "metadata", "max_parallel_requests"})  # fmt: skip
UPDATE_FIELDS = frozenset({"key", "key_alias", "duration", "max_budget", "spend", "rpm_limit", "tpm_limit",
                           "budget_duration", "allowed_routes", "metadata", "blocked",
                           "max_parallel_requests"})  # fmt: skip

# /global/spend/report's group_by, and the name of each day's list of groups (LiteLLM's report says "teams").
REPORT_GROUPS: dict[str, str] = {"api_key": "api_keys", "route": "routes", "model": "models"}


def _when(seconds: float | None) -> str | None:
    """ISO 8601 UTC. A time past what a datetime holds (a key made before durations were bounded) shows as the last
    one it holds rather than breaking /key/list for everyone."""
    if seconds is None:
        return None
    try:
        return datetime.fromtimestamp(seconds, UTC).isoformat()
    except (OverflowError, ValueError, OSError):
        return (datetime.max if seconds > 0 else datetime.min).replace(tzinfo=UTC).isoformat()


def shown(info: KeyInfo) -> dict[str, Any]:
    """A key as /key/info, /key/list and the CLI show it: LiteLLM's field names, times in ISO 8601 UTC."""
    return {
        "token": info.token, "key_name": info.key_name, "key_alias": info.key_alias, "spend": info.spend,
        "max_budget": info.max_budget, "budget_duration": info.budget_duration,
        "budget_reset_at": _when(info.budget_reset_at), "rpm_limit": info.rpm_limit, "tpm_limit": info.tpm_limit,
        "allowed_routes": None if info.allowed_routes is None else list(info.allowed_routes),
        "metadata": dict(info.metadata), "blocked": info.blocked, "expires": _when(info.expires),
        "created_at": _when(info.created_at), "prompt_tokens": info.prompt_tokens,
        "completion_tokens": info.completion_tokens, "total_tokens": info.total_tokens,
        "max_parallel_requests": info.max_parallel_requests,
    }  # fmt: skip


def generate_key(store: KeyAdmin, body: Fields, *, master_key: str | None = None) -> dict[str, Any]:
    """POST /key/generate: the only answer that ever carries the key itself."""
    fields = key_fields.known(body, NEW_KEY_FIELDS)
    key = fields.get("key")
    if key is None:
        key = "sk-" + secrets.token_urlsafe(16)
    elif not isinstance(key, str) or not CUSTOM_KEY.fullmatch(key):
        raise RequestError("key must be sk- followed by 8 to 200 letters, digits, - or _", param="key")
    elif master_key is not None and hmac.compare_digest(digest(key), digest(master_key)):
        raise RequestError("key must not be the master key", param="key")
    new = NewKey(
        token=digest(key).hex(), key_name=f"sk-...{key[-4:]}", key_alias=key_fields.alias(fields.get("key_alias")),
        duration=key_fields.duration(fields.get("duration")), max_budget=key_fields.number(fields, "max_budget"),
        rpm_limit=key_fields.number(fields, "rpm_limit", integer=True),
        tpm_limit=key_fields.number(fields, "tpm_limit", integer=True),
        budget_duration=key_fields.budget_duration(fields.get("budget_duration")),
        allowed_routes=key_fields.routes(fields.get("allowed_routes")),
        metadata=key_fields.metadata(fields.get("metadata")),
        max_parallel_requests=key_fields.number(fields, "max_parallel_requests", integer=True),
    )  # fmt: skip
    info = store.create(new)
    return {"key": key, **shown(info), "token_id": info.token}


def key_info(store: KeyAdmin, args: Fields) -> dict[str, Any]:
    """GET /key/info?key=…: the key's fields and spend (the key may be given as its hashed token)."""
    token = token_of(args.get("key"))
    info = store.find(token)
    if info is None:
        raise NotFound("no such key", param="key")
    return {"key": token, "info": shown(info)}


def update_key(store: KeyAdmin, body: Fields) -> dict[str, Any]:
    """POST /key/update: change the fields given; null clears a limit, a duration counts from now."""
    fields = key_fields.known(body, UPDATE_FIELDS)
    token = token_of(fields.pop("key", None))
    changes: dict[str, Any] = {}
    for name, value in fields.items():
        if name in ("max_budget", "spend"):
            changes[name] = key_fields.number(fields, name)
        elif name in key_fields.INTEGER_BOUNDS:
            changes[name] = key_fields.number(fields, name, integer=True)
        elif name == "duration":
            changes[name] = key_fields.duration(value)
        elif name == "budget_duration":
            changes[name] = key_fields.budget_duration(value)  # and a new reset time, one period from now
        elif name == "allowed_routes":
            changes[name] = key_fields.routes(value)
        elif name == "metadata":
            changes[name] = key_fields.metadata(value)
        elif name == "key_alias":
            changes[name] = key_fields.alias(value)
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


def delete_keys(store: KeyAdmin, body: Fields) -> dict[str, Any]:
    """POST /key/delete {"keys": […]}: all of them, or none when one does not exist."""
    keys = body.get("keys")
    if not isinstance(keys, list) or not 1 <= len(keys) <= MAX_KEYS_PER_DELETE:
        raise RequestError(f"keys must be a list of 1 to {MAX_KEYS_PER_DELETE} keys or hashed tokens", param="keys")
    tokens = [token_of(key, "keys") for key in keys]
    missing = store.delete(tokens)
    if missing:
        raise NotFound(f"{len(missing)} of the keys do not exist; none was deleted", param="keys")
    return {"deleted_keys": keys}


def set_blocked(store: KeyAdmin, body: Fields, *, blocked: bool) -> dict[str, Any]:
    """POST /key/block and /key/unblock {"key": …}: the key's fields after the change."""
    info = store.update(token_of(body.get("key")), {"blocked": blocked})
    if info is None:
        raise NotFound("no such key", param="key")
    return {"key": info.token, **shown(info)}


def list_keys(store: KeyAdmin, args: Fields) -> dict[str, Any]:
    """GET /key/list?page=&size=&key_alias=&return_full_object=: hashed tokens (or whole keys), newest first."""
    page = key_fields.positive_int(args, "page", 1, MAX_PAGE)
    size = key_fields.positive_int(args, "size", 10, MAX_PAGE_SIZE)
    full = str(args.get("return_full_object", "false")).lower() in ("true", "1", "yes")
    infos, total = store.page(page, size, key_fields.alias(args.get("key_alias") or None))
    return {
        "keys": [shown(info) if full else info.token for info in infos],
        "total_count": total,
        "current_page": page,
        "total_pages": -(-total // size),
    }


def spend_logs(store: KeyAdmin, args: Fields) -> list[dict[str, Any]]:
    """GET /spend/logs?key=&start_date=&end_date=: one entry per pass-through call, newest first. With a key (or the
    master key, whose calls are logged under its hash), that key's entries only; without, every entry, those of open
    routes (api_key null) included."""
    param = "key" if args.get("key") else "api_key"  # api_key is LiteLLM's name for it
    key = args.get(param)
    token = token_of(key, param) if key else None
    start = key_fields.instant(args.get("start_date"), "start_date", end=False)
    end = key_fields.instant(args.get("end_date"), "end_date", end=True)
    limit = key_fields.positive_int(args, "limit", 1000, MAX_SPEND_LOGS)
    return [shown_entry(entry) for entry in store.spend_logs(token, start, end, limit)]


def shown_entry(entry: SpendEntry) -> dict[str, Any]:
    """LiteLLM's names for what it logs too; request_id is the call's id as its caller saw it (x-request-id), or the
    entry's own id for entries written before the call's id was kept."""
    return {
        "request_id": entry.call_id or entry.request_id, "api_key": entry.token, "call_type": "pass_through_endpoint",
        "model": entry.model, "prompt_tokens": entry.prompt_tokens, "completion_tokens": entry.completion_tokens,
        "total_tokens": entry.total_tokens, "spend": entry.spend, "startTime": _when(entry.start_time),
        "endTime": _when(entry.start_time + entry.duration), "request_duration_ms": round(entry.duration * 1000, 3),
        "status": "success" if entry.status < 400 else "failure", "status_code": entry.status, "route": entry.route,
        "target": entry.target,
    }  # fmt: skip


def spend_report(store: KeyAdmin, args: Fields) -> list[dict[str, Any]]:
    """GET /global/spend/report?start_date=&end_date=&group_by=api_key|route|model: spend, calls and tokens per UTC
    day and group, in the shape of LiteLLM's report by team: [{"group_by_day": …, "api_keys": [{"api_key": …,
    "total_spend": …, "api_requests": …, "prompt_tokens": …, …}]}], days in order, the biggest spend first."""
    group = args.get("group_by") or "api_key"
    if group not in REPORT_GROUPS:
        raise RequestError(f"group_by must be one of {', '.join(REPORT_GROUPS)}", param="group_by")
    start = key_fields.instant(args.get("start_date"), "start_date", end=False)
    end = key_fields.instant(args.get("end_date"), "end_date", end=True)
    if start is None or end is None:
        raise RequestError("start_date and end_date are required", param="start_date" if start is None else "end_date")
    if not 0 < end - start <= MAX_REPORT_DAYS * 86400:
        raise RequestError(f"end_date must be after start_date and at most {MAX_REPORT_DAYS} days later",
                           param="end_date")  # fmt: skip
    rows = store.spend_report(cast(ReportGroup, group), start, end, MAX_REPORT_ROWS + 1)
    if len(rows) > MAX_REPORT_ROWS:
        raise RequestError(f"the report would have more than {MAX_REPORT_ROWS} rows (days × groups); narrow the dates",
                           param="end_date")  # fmt: skip
    days: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        days.setdefault(row.day, []).append({
            group: row.group, "total_spend": row.spend, "api_requests": row.calls, "prompt_tokens": row.prompt_tokens,
            "completion_tokens": row.completion_tokens, "total_tokens": row.total_tokens,
        })  # fmt: skip
    return [{"group_by_day": _day(day), REPORT_GROUPS[group]: groups} for day, groups in days.items()]


def _day(day: int) -> str:
    return (date(1970, 1, 1) + timedelta(days=day)).isoformat()


def build_key_api(authenticator: Authenticator, master_key: str) -> Blueprint:
    """A fresh Blueprint serving KEY_API_PATHS; every call must carry the master key (Authenticator.require_admin:
    a valid virtual key is 403, anything else 401)."""
    blueprint = Blueprint("keys", __name__)

    def bind(operation: Operation, from_body: bool) -> Callable[[], Response]:
        def view() -> Response:
            keys = authenticator.require_admin(request.environ).admin
            if from_body:
                request.max_content_length = MAX_BODY_BYTES  # past it werkzeug answers 413
                try:
                    body = request.get_json(force=True, silent=True)
                except RecursionError:  # arrays nested thousands deep: json.loads gives up before any field is read
                    body = None
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
        "/global/spend/report": ("GET", spend_report),
    }
    assert tuple(routes) == KEY_API_PATHS  # config.py refuses pass-through routes that would cover these
    for path, (method, operation) in routes.items():
        name = path.strip("/").replace("/", "_")
        blueprint.add_url_rule(path, name, bind(operation, method == "POST"), methods=[method])
    return blueprint
