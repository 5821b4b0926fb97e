"""The keys page: the key table (filtered by alias, a page at a time), and keys made, edited, blocked, unblocked and
deleted. Every change goes through key_api's own operations, as /key/* does, so the checks and the store's writes
are the same."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

from flask import Blueprint, redirect, render_template, request, url_for
from werkzeug.datastructures import MultiDict
from werkzeug.wrappers import Response as BaseResponse

from passthru import key_api, key_fields
from passthru.errors import NotFound, RequestError
from passthru.key_fields import MAX_PAGE, TOKEN
from passthru.keystore.records import KeyInfo
from passthru.ui import Admin, back_to, shown_value

PAGE_SIZE = 50
# The form's fields, in the order /key/generate takes them; numbers are typed as text and read here.
TEXT_FIELDS = ("key_alias", "duration", "budget_duration")
NUMBER_FIELDS = {"max_budget": False, "rpm_limit": True, "tpm_limit": True}  # name → whole number only
Page = BaseResponse | str | tuple[str, int]


def add_rules(blueprint: Blueprint, admin: Admin) -> None:
    blueprint.add_url_rule("/keys", "keys", partial(key_table, admin), methods=["GET"])
    blueprint.add_url_rule("/keys/new", "new_key", partial(new_key, admin), methods=["GET", "POST"])
    blueprint.add_url_rule("/keys/<token>", "edit_key", partial(edit_key, admin), methods=["GET", "POST"])
    blueprint.add_url_rule("/keys/<token>/block", "block_key", partial(block_key, admin, True), methods=["POST"])
    blueprint.add_url_rule("/keys/<token>/unblock", "unblock_key", partial(block_key, admin, False), methods=["POST"])
    blueprint.add_url_rule("/keys/<token>/delete", "delete_key", partial(delete_key, admin), methods=["GET", "POST"])


def key_table(admin: Admin) -> Page:
    """GET /ui/keys?alias=&page=: newest first, PAGE_SIZE a page; `alias` keeps those whose alias contains it."""
    alias = request.args.get("alias", "").strip()
    try:
        page = key_fields.positive_int(request.args, "page", 1, MAX_PAGE)
        key_fields.alias(alias or None, "alias")
    except RequestError as error:
        return render_template("ui/keys.html", error=error.message, keys=[], alias=alias, page=1, pages=1), 400
    infos, total = admin.keys().page(page, PAGE_SIZE, alias_contains=alias or None)
    return render_template("ui/keys.html", keys=infos, total=total, alias=alias, page=page,
                           pages=max(1, -(-total // PAGE_SIZE)))  # fmt: skip


def new_key(admin: Admin) -> Page:
    """GET: the form; POST: key_api.generate_key, and the new key shown this once (never in a URL or a log)."""
    routes = _route_paths(admin)
    if request.method == "GET":
        return render_template("ui/key_form.html", values={}, chosen=(), routes=routes, info=None)
    try:
        body = {name: value for name, value in fields_of(request.form).items() if value is not None}
        made = key_api.generate_key(admin.keys(), body, master_key=admin.settings.master_key)
    except RequestError as error:
        return _form_again(routes, None, error)
    return render_template("ui/key_made.html", key=made["key"], info=admin.keys().find(made["token"]))


def edit_key(admin: Admin, token: str) -> Page:
    """GET: the key's form; POST: the fields that changed, through key_api.update_key."""
    info = _find(admin, token)
    routes = _route_paths(admin)
    if request.method == "GET":
        shown = ("key_alias", "budget_duration", *NUMBER_FIELDS)  # not duration: the form asks for a new one
        values = {name: shown_value(getattr(info, name)) for name in shown}
        values["metadata"] = json.dumps(dict(info.metadata), indent=2) if info.metadata else ""
        chosen = info.allowed_routes or ()
        values["other_routes"] = "\n".join(route for route in chosen if route not in routes)
        return render_template("ui/key_form.html", values=values, chosen=chosen, routes=routes, info=info,
                               saved=request.args.get("saved") == "1")  # fmt: skip
    try:
        changes = _changes(info, fields_of(request.form), request.form)
        if changes:
            key_api.update_key(admin.keys(), {"key": info.token, **changes})
    except RequestError as error:
        return _form_again(routes, info, error)
    return redirect(url_for("ui.edit_key", token=info.token, saved=1), 303)


def block_key(admin: Admin, blocked: bool, token: str) -> BaseResponse:
    """POST: key_api.set_blocked, then back to the page the button was on."""
    info = _find(admin, token)
    key_api.set_blocked(admin.keys(), {"key": info.token}, blocked=blocked)
    return redirect(back_to(url_for("ui.keys")), 303)


def delete_key(admin: Admin, token: str) -> Page:
    """GET: asks to confirm (and changes nothing); POST: key_api.delete_keys."""
    info = _find(admin, token)
    if request.method == "GET":
        return render_template("ui/key_delete.html", info=info)
    key_api.delete_keys(admin.keys(), {"keys": [info.token]})
    return redirect(url_for("ui.keys", deleted=1), 303)


def fields_of(form: MultiDict[str, str]) -> dict[str, Any]:
    """The form as /key/generate's JSON body: empty fields are None, numbers read from their text, allowed routes
    from the ticked routes and the other paths typed one a line, metadata from its JSON text."""
    body: dict[str, Any] = {name: form.get(name, "").strip() or None for name in TEXT_FIELDS}
    for name, whole in NUMBER_FIELDS.items():
        text = form.get(name, "").strip()
        try:
            body[name] = None if not text else int(text) if whole else float(text)
        except ValueError:
            raise RequestError(f"{name} must be {'a whole number' if whole else 'a number'}", param=name) from None
    typed = [line.strip() for line in form.get("other_routes", "").splitlines() if line.strip()]
    body["allowed_routes"] = [*form.getlist("route"), *typed] or None
    text = form.get("metadata", "").strip()
    try:
        body["metadata"] = json.loads(text) if text else None
    except (ValueError, RecursionError):
        raise RequestError('metadata must be a JSON object such as {"team": "a"}', param="metadata") from None
    return body


def _changes(info: KeyInfo, body: dict[str, Any], form: MultiDict[str, str]) -> dict[str, Any]:
    """Only what differs from the key as stored: an unchanged budget_duration sent again would restart its period,
    and an empty duration keeps the expiry (the box "never expires" clears it)."""
    duration = body.pop("duration")
    changes = {name: value for name, value in body.items() if value != _stored(info, name)}
    if form.get("never_expires"):
        changes["duration"] = None
    elif duration is not None:
        changes["duration"] = duration
    return changes


def _stored(info: KeyInfo, name: str) -> Any:
    value = getattr(info, name)
    if name == "allowed_routes":
        return None if value is None else list(value)
    return (dict(value) or None) if name == "metadata" else value


def _form_again(routes: tuple[str, ...], info: KeyInfo | None, error: RequestError) -> tuple[str, int]:
    """The form as it was sent, with what was wrong with it."""
    values = {name: request.form.get(name, "") for name in (*TEXT_FIELDS, *NUMBER_FIELDS, "metadata", "other_routes")}
    return render_template("ui/key_form.html", values=values, chosen=request.form.getlist("route"), routes=routes,
                           info=info, error=error.message, param=error.param), error.status  # fmt: skip


def _find(admin: Admin, token: str) -> KeyInfo:
    info = admin.keys().find(token) if TOKEN.fullmatch(token) else None
    if info is None:
        raise NotFound("There is no such key (it may have been deleted).")
    return info


def _route_paths(admin: Admin) -> tuple[str, ...]:
    return tuple(endpoint.path for endpoint in admin.settings.endpoints)
