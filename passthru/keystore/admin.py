"""The key store's /key/* queries (and `passthru keys`): keys made, changed, listed and deleted, and the spend log read,
each on a connection sql.SqlKeyStore opens, in its transaction."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError

from passthru.errors import RequestError
from passthru.keystore import budget
from passthru.keystore.records import UPDATABLE, NewKey, SpendEntry
from passthru.keystore.schema import keys, spend_logs, store_now


def insert_key(conn: sa.Connection, new: NewKey) -> Row[Any]:
    """Insert a key; RequestError if its value or alias is taken."""
    now = store_now()
    values = {
        "token": new.token, "key_name": new.key_name, "key_alias": new.key_alias, "created_at": now,
        "expires": None if new.duration is None else now + new.duration, "max_budget": new.max_budget,
        "rpm_limit": new.rpm_limit, "tpm_limit": new.tpm_limit, "metadata": dict(new.metadata or {}),
        "allowed_routes": None if new.allowed_routes is None else list(new.allowed_routes),
        "budget_duration": new.budget_duration, "budget_reset_at": _first_reset(conn, new.budget_duration),
        "max_parallel_requests": new.max_parallel_requests,
    }  # fmt: skip
    if conn.execute(sa.select(keys.c.token).where(keys.c.token == new.token)).first() is not None:
        raise RequestError("this key already exists", param="key")
    _check_alias(conn, new.key_alias, new.token)
    try:
        return conn.execute(sa.insert(keys).values(values).returning(*keys.c)).one()
    except IntegrityError as exc:  # a race with another host's insert
        raise RequestError("a key with this value or key_alias already exists") from exc


def _check_alias(conn: sa.Connection, alias: str | None, owner: str) -> None:
    """A clear message for the common case; the unique index still decides when two hosts race."""
    if alias is not None:
        taken = conn.execute(sa.select(keys.c.token).where(keys.c.key_alias == alias)).first()
        if taken is not None and taken.token != owner:
            raise RequestError(f"key_alias {alias!r} is already used by another key", param="key_alias")


def update_key(conn: sa.Connection, token: str, changes: Mapping[str, Any]) -> None:
    """Change some fields of a key (see UPDATABLE): a duration counts from now, a budget_duration's first reset is
    one period from now. A key that does not exist is left for the caller to find missing."""
    values: dict[str, Any] = {}
    for name, value in changes.items():
        if name not in UPDATABLE:
            raise ValueError(f"{name} cannot be updated")
        if name == "duration":
            values["expires"] = None if value is None else store_now() + value
        elif name == "budget_duration":
            values[name], values["budget_reset_at"] = value, _first_reset(conn, value)
        elif name == "allowed_routes":
            values[name] = None if value is None else list(value)
        else:
            values[name] = value
    if "key_alias" in values:
        _check_alias(conn, values["key_alias"], token)
    try:
        conn.execute(sa.update(keys).where(keys.c.token == token).values(values))
    except IntegrityError as exc:
        raise RequestError("key_alias is already used by another key", param="key_alias") from exc


def delete_keys(conn: sa.Connection, tokens: Sequence[str]) -> list[str]:
    """Delete all these keys, or none: returns the ones that do not exist (then nothing was deleted)."""
    found = set(conn.scalars(sa.select(keys.c.token).where(keys.c.token.in_(tokens))))
    missing = [token for token in tokens if token not in found]
    if not missing:
        conn.execute(sa.delete(keys).where(keys.c.token.in_(tokens)))
    return missing


def page_rows(
    conn: sa.Connection, page: int, size: int, key_alias: str | None, alias_contains: str | None = None
) -> tuple[list[Row[Any]], int]:
    """One page of keys' rows, newest first, each with the store's time (to find resets due), and the count of all:
    of the key with this alias, or of those whose alias contains this text (in any letter case), or of all."""
    where = [keys.c.key_alias == key_alias] if key_alias is not None else []
    if alias_contains:
        where.append(keys.c.key_alias.icontains(alias_contains, autoescape=True))
    query = sa.select(keys, store_now().label("now")).where(*where)
    query = query.order_by(keys.c.created_at.desc(), keys.c.token.desc()).limit(size).offset((page - 1) * size)
    total = conn.scalar(sa.select(sa.func.count()).select_from(keys).where(*where)) or 0
    return list(conn.execute(query).all()), total


def key_rows(conn: sa.Connection, tokens: Sequence[str]) -> list[Row[Any]]:
    """The rows of the keys among these tokens that exist (in no particular order)."""
    return list(conn.execute(sa.select(keys).where(keys.c.token.in_(tokens))).all()) if tokens else []


def spend_entries(
    conn: sa.Connection,
    token: str | None,
    start: float | None,
    end: float | None,
    limit: int,
    route: str | None = None,
    status: int | None = None,
) -> list[SpendEntry]:
    """Spend log entries, newest first, of one key (or the master key's hash) or all, started in [start, end), of one
    route or status if given. Each filter has an index led by its column and followed by start_time."""  # fmt: skip
    c = spend_logs.c
    where = []
    if token is not None:
        where.append(c.token == token)
    if route is not None:
        where.append(c.route == route)
    if status is not None:
        where.append(c.status == status)
    if start is not None:
        where.append(c.start_time >= start)
    if end is not None:
        where.append(c.start_time < end)
    query = sa.select(spend_logs).where(*where).order_by(c.start_time.desc()).limit(limit)
    return [SpendEntry(**row._mapping) for row in conn.execute(query)]


def spend_entry(conn: sa.Connection, request_id: str) -> SpendEntry | None:
    """One spend log entry by its own id (SpendEntry.request_id), or None."""
    row = conn.execute(sa.select(spend_logs).where(spend_logs.c.request_id == request_id)).first()
    return None if row is None else SpendEntry(**row._mapping)


def _first_reset(conn: sa.Connection, duration: str | None) -> float | None:
    """A new budget period's end, one period from now on the store's clock (None: no period)."""
    if duration is None:
        return None
    now = conn.scalar(sa.select(store_now()))
    assert now is not None
    return budget.next_reset(now, duration, now)
