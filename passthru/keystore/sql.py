"""The key store on SQLAlchemy: the few queries on virtual keys and their spend log (tables in schema.py), behind the
KeyStore Protocol (records.py, with the records it takes and returns).

For a key with limits or an expiry, what a call is decided on (blocked, expiry, budget, the rpm window) is checked
and counted by one atomic UPDATE on the store's own clock, so every worker and every host sharing the store counts
together: one call at a time, or a lease of several (leases.py). A key without any is not counted per call
(KeyInfo.counted).

The per-call statements are each one SQLite step with the GIL released: SQLite's write lock is never held while
the thread waits to get the GIL back behind other busy threads (up to 5 ms each time). A RETURNING clause, or a
loop of INSERTs in one transaction, would do exactly that, and stall every other process's writes meanwhile.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine, Row
from sqlalchemy.exc import IntegrityError

from passthru.errors import RequestError
from passthru.keystore.engine import READ_ONLY, dbapi_cursor, ensure_schema, open_engine, pool_slots
from passthru.keystore.guard import StoreGuard
from passthru.keystore.records import UPDATABLE, KeyInfo, NewKey, Refusal, SpendEntry, Unused
from passthru.keystore.schema import keys, spend_logs, store_now
from passthru.keystore.statements import RECORD_ROWS, per_call_statements

log = logging.getLogger("passthru")

WINDOW_SECONDS = 60.0  # rpm_limit's window: fixed, per key, opened by the first call after the previous one ended


class SqlKeyStore:
    """The KeyStore on SQLite or PostgreSQL; statements are built once here and only executed per call."""

    def __init__(self, engine: Engine, window: float = WINDOW_SECONDS) -> None:
        self.engine = engine
        self.window = window
        self.edits = 0
        # As many threads inside the store as its pool has connections: none ever waits in the pool (guard.py).
        self._guard = StoreGuard(pool_slots(engine))
        self._reads = engine.execution_options(**{READ_ONLY: True})
        self._sql = per_call_statements(engine, window)

    def ping(self) -> None:
        """One round trip to the store: KeyStoreError when it cannot be reached (readiness asks this)."""
        with self._guard("checking the store"), self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    # --- per call ---------------------------------------------------------------------------------------------

    def find(self, token: str) -> KeyInfo | None:
        """The key with this hash, or None."""
        with self._guard("reading a key"), self._reads.connect() as conn:
            row = conn.execute(self._sql.find, {"t": token}).first()
        return None if row is None else _info(row)

    def admit(self, token: str, cost: float) -> Refusal | None:
        """Count one call against the key and add its cost, atomically; or say why the key may not call now."""
        one = self._sql.admit.args({"t": token, "cost": cost, "calls": 1, "room": 1, "hold": 0.0})
        for _ in range(3):
            with self._guard("checking a key"), dbapi_cursor(self.engine) as cursor:
                cursor.execute(self._sql.admit.sql, one)
                if cursor.rowcount == 1:  # the key was admissible, and is now counted
                    return None
                cursor.execute(self._sql.why.sql, self._sql.why.args({"t": token}))
                row = cursor.fetchone()
            refusal = self._refusal(row)
            if refusal is not None:
                return refusal
            # Refused, yet the row shows no reason: it changed in between (a window ended, a budget was raised).
        return Refusal("rpm", retry_after=1)

    def lease(self, token: str, cost: float, calls: int, room: int, hold: float) -> float | None:
        """Count and charge `calls` calls at once, if `room` calls one by one would all be admitted and the key's
        expiry and rpm window last `hold` seconds more: the start of the window they count in, or None if not."""
        args = self._sql.admit.args({"t": token, "cost": cost, "calls": calls, "room": room, "hold": hold})
        with self._guard("checking a key"), dbapi_cursor(self.engine) as cursor:
            cursor.execute(self._sql.admit.sql, args)
            if cursor.rowcount != 1:
                return None
            # Read after, not RETURNING (see the module docstring). It cannot have moved: the window lasts `hold`.
            cursor.execute(self._sql.window_of.sql, self._sql.window_of.args({"t": token}))
            row = cursor.fetchone()
        return None if row is None else float(row[0])

    def _refusal(self, row: Sequence[Any] | None) -> Refusal | None:
        if row is None:
            return Refusal("unknown")
        blocked, expires, max_budget, spend, rpm_limit, window_start, window_count, now = row
        if blocked:
            return Refusal("blocked")
        if expires is not None and expires <= now:
            return Refusal("expired")
        if max_budget is not None and spend >= max_budget:
            return Refusal("budget", spend=spend, max_budget=max_budget)
        if rpm_limit is not None and window_start + self.window > now and window_count >= rpm_limit:
            return Refusal("rpm", retry_after=max(1, math.ceil(window_start + self.window - now)))
        return None

    def record(
        self, entries: Sequence[SpendEntry], charges: Mapping[str, float] | None = None, unused: Sequence[Unused] = ()
    ) -> None:
        """Write spend log entries (spend.SpendWriter batches them), add `charges` (token → amount) to the spend of
        keys whose calls were not charged at admission (KeyInfo.counted), and give back leased calls not used
        (leases.py): all in one transaction.

        The entries go as multi-row INSERTs: on SQLite one step each (see the module docstring), on PostgreSQL one
        query each, where a pipelined executemany spent more Python per row than the rest of the writer together.
        Each has a power of two of rows, RECORD_ROWS at most: 300 entries are 128 + 128 + 32 + 8 + 4. The driver
        keeps every statement it has seen prepared, per connection (sqlite3 up to 128, psycopg up to 100, on the
        server too): with one size per batch length, that was up to 4 MB of SQLite's memory per pooled connection.

        On SQLite, entries alone are written without a transaction, one INSERT at a time: when one fails, those
        before it are written, and SpendWriter retries the whole batch. Their ids make the retry skip them.
        """
        charged = [self._sql.charge.args({"t": token, "amount": amount}) for token, amount in (charges or {}).items()]
        given_back = [
            self._sql.give_back.args(
                {"t": u.token, "calls": u.calls, "amount": u.amount, "window_start": u.window_start}
            )
            for u in unused
        ]
        # On SQLite, lone INSERTs need no transaction, and a transaction would hold the write lock across GIL waits.
        atomic = not self._sql.sqlite or bool(charged) or bool(given_back)
        with self._guard("writing spend log entries"), dbapi_cursor(self.engine, atomic=atomic) as cursor:
            start = 0
            while start < len(entries):
                left = len(entries) - start
                size = RECORD_ROWS if left >= RECORD_ROWS else 1 << (left.bit_length() - 1)
                values = [value for entry in entries[start : start + size] for value in self._sql.record_values(entry)]
                cursor.execute(self._sql.record[size], values)
                start += size
            if charged:
                cursor.executemany(self._sql.charge.sql, charged)
            if given_back:
                cursor.executemany(self._sql.give_back.sql, given_back)

    # --- administration ---------------------------------------------------------------------------------------

    def create(self, new: NewKey) -> KeyInfo:
        """Insert a key; RequestError if its value or alias is taken."""
        now = store_now()
        values = {
            "token": new.token, "key_name": new.key_name, "key_alias": new.key_alias, "created_at": now,
            "expires": None if new.duration is None else now + new.duration, "max_budget": new.max_budget,
            "rpm_limit": new.rpm_limit, "metadata": dict(new.metadata or {}),
            "allowed_routes": None if new.allowed_routes is None else list(new.allowed_routes),
        }  # fmt: skip
        with self._guard("creating a key"), self.engine.begin() as conn:
            if conn.execute(sa.select(keys.c.token).where(keys.c.token == new.token)).first() is not None:
                raise RequestError("this key already exists", param="key")
            self._check_alias(conn, new.key_alias, new.token)
            try:
                row = conn.execute(sa.insert(keys).values(values).returning(*keys.c)).one()
            except IntegrityError as exc:  # a race with another host's insert
                raise RequestError("a key with this value or key_alias already exists") from exc
        self.edits += 1  # this worker may remember the key as unknown (auth.RecentKeys): not any more
        return _info(row)

    def _check_alias(self, conn: sa.Connection, alias: str | None, owner: str) -> None:
        """A clear message for the common case; the unique index still decides when two hosts race."""
        if alias is not None:
            taken = conn.execute(sa.select(keys.c.token).where(keys.c.key_alias == alias)).first()
            if taken is not None and taken.token != owner:
                raise RequestError(f"key_alias {alias!r} is already used by another key", param="key_alias")

    def update(self, token: str, changes: Mapping[str, Any]) -> KeyInfo | None:
        """Change some fields of a key (see UPDATABLE); None if there is no such key."""
        values: dict[str, Any] = {}
        for name, value in changes.items():
            if name not in UPDATABLE:
                raise ValueError(f"{name} cannot be updated")
            if name == "duration":
                values["expires"] = None if value is None else store_now() + value
            elif name == "allowed_routes":
                values[name] = None if value is None else list(value)
            else:
                values[name] = value
        if not values:
            return self.find(token)
        with self._guard("updating a key"), self.engine.begin() as conn:
            if "key_alias" in values:
                self._check_alias(conn, values["key_alias"], token)
            try:
                stmt = sa.update(keys).where(keys.c.token == token).values(values).returning(*keys.c)
                row = conn.execute(stmt).first()
            except IntegrityError as exc:
                raise RequestError("key_alias is already used by another key", param="key_alias") from exc
        self.edits += 1
        return None if row is None else _info(row)

    def delete(self, tokens: Sequence[str]) -> list[str]:
        """Delete all these keys, or none: returns the ones that do not exist (then nothing was deleted)."""
        with self._guard("deleting keys"), self.engine.begin() as conn:
            found = set(conn.scalars(sa.select(keys.c.token).where(keys.c.token.in_(tokens))))
            missing = [token for token in tokens if token not in found]
            if not missing:
                conn.execute(sa.delete(keys).where(keys.c.token.in_(tokens)))
        self.edits += 1
        return missing

    def page(self, page: int, size: int, key_alias: str | None = None) -> tuple[list[KeyInfo], int]:
        """One page of keys, newest first, and how many there are in all."""
        where = [keys.c.key_alias == key_alias] if key_alias is not None else []
        query = sa.select(keys).where(*where).order_by(keys.c.created_at.desc(), keys.c.token.desc())
        with self._guard("listing keys"), self._reads.begin() as conn:
            total = conn.scalar(sa.select(sa.func.count()).select_from(keys).where(*where)) or 0
            rows = conn.execute(query.limit(size).offset((page - 1) * size)).all()
        return [_info(row) for row in rows], total

    def spend_logs(self, token: str | None, start: float | None, end: float | None, limit: int) -> list[SpendEntry]:
        """Spend log entries, newest first, of one key or all, started in [start, end)."""
        c = spend_logs.c
        where = []
        if token is not None:
            where.append(c.token == token)
        if start is not None:
            where.append(c.start_time >= start)
        if end is not None:
            where.append(c.start_time < end)
        query = sa.select(spend_logs).where(*where).order_by(c.start_time.desc()).limit(limit)
        with self._guard("reading spend logs"), self._reads.connect() as conn:
            return [SpendEntry(**row._mapping) for row in conn.execute(query)]

    def close(self) -> None:
        """Close the pooled connections (tests, and the gunicorn master after migrating)."""
        self.engine.dispose()


def _info(row: Row[Any]) -> KeyInfo:
    m = row._mapping
    routes = m["allowed_routes"]
    return KeyInfo(
        token=m["token"], key_name=m["key_name"], key_alias=m["key_alias"], created_at=m["created_at"],
        expires=m["expires"], blocked=bool(m["blocked"]), max_budget=m["max_budget"], spend=float(m["spend"]),
        rpm_limit=m["rpm_limit"], allowed_routes=None if routes is None else tuple(routes),
        metadata=m["metadata"] or {},
    )  # fmt: skip


def open_store(url: str) -> SqlKeyStore:
    """The store at this URL, its schema brought up to date first (unless the gunicorn master already did)."""
    engine = open_engine(url)
    try:
        ensure_schema(engine)
    except BaseException:
        engine.dispose()
        raise
    return SqlKeyStore(engine)
