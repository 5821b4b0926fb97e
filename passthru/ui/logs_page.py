"""The logs page: the newest spend log entries (request id, key, route, status, duration), filtered by key, route and
status, a page at a time going back; and one entry whole, as /spend/logs shows it."""

from __future__ import annotations

import re
from functools import partial

from flask import Blueprint, render_template, request

from passthru import key_api
from passthru.errors import NotFound, RequestError
from passthru.key_fields import TOKEN, token_of
from passthru.keystore.records import KeyAdmin, KeyInfo, SpendEntry
from passthru.ui import Admin

PAGE_SIZE = 50
ENTRY_ID = re.compile(r"[0-9a-f-]{1,36}")  # an entry's own id: a UUID (spend.entry_id)


def add_rules(blueprint: Blueprint, admin: Admin) -> None:
    blueprint.add_url_rule("/logs", "logs", partial(logs, admin), methods=["GET"])
    blueprint.add_url_rule("/logs/<entry_id>", "log_entry", partial(log_entry, admin), methods=["GET"])


def logs(admin: Admin) -> str | tuple[str, int]:
    """GET /ui/logs?key=&route=&status=&before=: newest first; `key` is an alias, a key (sk-…) or its hashed token;
    `before` (a start time, from the previous page's "older" link) goes back in time."""
    args = request.args
    filters = {name: args.get(name, "").strip() for name in ("key", "route", "status")}
    keys = admin.keys()
    try:
        token = _token(keys, filters["key"], admin.master_token) if filters["key"] else None
        status = _status(filters["status"]) if filters["status"] else None
        before = float(args["before"]) if args.get("before") else None
        if before is not None and not 0 <= before < 1e12:
            raise ValueError(before)
        entries = keys.spend_logs(token, None, before, PAGE_SIZE, filters["route"] or None, status)
    except (RequestError, ValueError) as error:
        message = error.message if isinstance(error, RequestError) else "that page does not exist"
        return render_template("ui/logs.html", error=message, entries=[], routes=_paths(admin), **filters), 400
    return render_template(
        "ui/logs.html", entries=[(entry, key_api.shown_entry(entry)) for entry in entries], **filters,
        names=_names(keys, entries), master=admin.master_token, routes=_paths(admin),
        older=entries[-1].start_time if len(entries) == PAGE_SIZE else None,
    )  # fmt: skip


def log_entry(admin: Admin, entry_id: str) -> str:
    """GET /ui/logs/<entry id>: every field of one entry."""
    keys = admin.keys()
    entry = keys.spend_entry(entry_id) if ENTRY_ID.fullmatch(entry_id) else None
    if entry is None:
        raise NotFound("There is no such spend log entry.")
    return render_template("ui/log_entry.html", entry=key_api.shown_entry(entry), names=_names(keys, [entry]),
                           token=entry.token, master=admin.master_token)  # fmt: skip


def _token(keys: KeyAdmin, text: str, master: str) -> str:
    """The token a key filter names: a hashed token or a key as they are, else the key with that alias."""
    if TOKEN.fullmatch(text) or text.startswith("sk-"):
        return token_of(text)
    if text == "master key":
        return master
    found, _ = keys.page(1, 1, key_alias=text[:255])
    if not found:
        raise RequestError("no key has that alias (type an alias, a key sk-…, or a hashed token)", param="key")
    return found[0].token


def _status(text: str) -> int:
    if not (text.isascii() and text.isdigit() and 100 <= int(text) <= 599):
        raise RequestError("status must be an HTTP status code, 100 to 599", param="status")
    return int(text)


def _names(keys: KeyAdmin, entries: list[SpendEntry]) -> dict[str, KeyInfo]:
    """The keys of these entries that still exist, by token (one query for the page)."""
    return {info.token: info for info in keys.find_many(sorted({e.token for e in entries if e.token}))}


def _paths(admin: Admin) -> tuple[str, ...]:
    return tuple(endpoint.path for endpoint in admin.settings.endpoints)
