"""The key store on SQLAlchemy: virtual keys and their spend log (tables in schema.py), behind the KeyStore Protocol
(records.py, with the records it takes and returns). Each call's admission, charge and entry here; the /key/*
operations' queries in admin.py, the spend report's in report.py.

For a key with limits or an expiry, what a call is decided on (blocked, expiry, budget, the rpm and tpm windows) is
checked and counted by one atomic UPDATE on the store's own clock, so every worker and every host sharing the store
counts together: one call at a time, or a lease of several (leases.py). A key without any is not counted per call
(KeyInfo.counted). A key's budget reset (budget_duration) is done by whichever host first finds it due, admitting a
call or reading the key, with a compare-and-set UPDATE that exactly one of them wins.

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

from passthru.keystore import admin, budget
from passthru.keystore.engine import READ_ONLY, dbapi_cursor, ensure_schema, open_engine, pool_slots
from passthru.keystore.guard import StoreGuard
from passthru.keystore.records import (
    GroupTotal,
    KeyInfo,
    NewKey,
    Refusal,
    ReportGroup,
    ReportRow,
    SpendEntry,
    Tally,
    Unused,
)
from passthru.keystore.report import report_rows, total_rows
from passthru.keystore.statements import RECORD_ROWS, USAGE, per_call_statements
from passthru.keystore.windows import RouteWindows

log = logging.getLogger("passthru")

# rpm_limit's and tpm_limit's windows: fixed, per key, opened by the first call (for tpm: the first tokens counted)
# after the previous one ended.
WINDOW_SECONDS = 60.0


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
        self.routes = RouteWindows(engine, self._guard, window)  # routes' rpm_limit windows (records.RouteCounts)

    def ping(self) -> None:
        """One round trip to the store: KeyStoreError when it cannot be reached (readiness asks this)."""
        with self._guard("checking the store"), self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    # --- per call ---------------------------------------------------------------------------------------------

    def find(self, token: str) -> KeyInfo | None:
        """The key with this hash, or None; its spend reset first if its budget period is over."""
        with self._guard("reading a key"), self._reads.connect() as conn:
            row = conn.execute(self._sql.find, {"t": token}).first()
        return None if row is None else self._current(row)

    def _current(self, row: Row[Any]) -> KeyInfo:
        """The key as this row has it; read again once its budget is reset, when a reset was due."""
        if _due(row.budget_reset_at, row.now):
            self._reset(row.token, row.budget_reset_at, row.budget_duration, row.now)
            return self.find(row.token) or _info(row)  # None: deleted meanwhile
        return _info(row)

    def _reset(self, token: str, seen: float, duration: str | None, now: float) -> bool:
        """Zero the key's spend and move budget_reset_at past `now`, unless another host or thread moved it from
        `seen` first (statements.reset): True when this call made the reset."""
        # No budget_duration (cleared since): no next reset. Otherwise the first one past now, on the key's schedule.
        following = None if duration is None else budget.next_reset(seen, duration, now)
        args = self._sql.reset.args({"t": token, "seen": seen, "next": following})
        with self._guard("resetting a key's budget"), dbapi_cursor(self.engine) as cursor:
            cursor.execute(self._sql.reset.sql, args)
            return bool(cursor.rowcount == 1)

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
            if row is not None and _due(row[-3], row[-1]):
                self._reset(token, row[-3], row[-2], row[-1])
                continue  # the key's budget period is over: admitted or refused in the new one
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
        (
            blocked,
            expires,
            max_budget,
            spend,
            rpm_limit,
            window_start,
            window_count,
            tpm_limit,
            tokens_start,
            tokens,
            *_,
            now,
        ) = row
        if blocked:
            return Refusal("blocked")
        if expires is not None and expires <= now:
            return Refusal("expired")
        if max_budget is not None and spend >= max_budget:
            return Refusal("budget", spend=spend, max_budget=max_budget)
        if rpm_limit is not None and window_start + self.window > now and window_count >= rpm_limit:
            return Refusal("rpm", retry_after=max(1, math.ceil(window_start + self.window - now)))
        if tpm_limit is not None and tokens_start + self.window > now and tokens >= tpm_limit:
            return Refusal("tpm", retry_after=max(1, math.ceil(tokens_start + self.window - now)))
        return None

    def record(
        self, entries: Sequence[SpendEntry], charges: Mapping[str, Tally] | None = None, unused: Sequence[Unused] = ()
    ) -> None:
        """Write spend log entries (spend.SpendWriter batches them), add `charges` to their keys (token → the spend
        admission did not charge, and the calls' tokens, counted in the key's tpm window too), and give back leased
        calls not used (leases.py): all in one transaction.

        The entries go as multi-row INSERTs: on SQLite one step each (see the module docstring), on PostgreSQL one
        query each, where a pipelined executemany spent more Python per row than the rest of the writer together.
        Each has a power of two of rows, RECORD_ROWS at most: 300 entries are 4 × 64 + 32 + 8 + 4; entries without
        usage (statements.USAGE) leave its columns out, so there are two families of sizes. The driver
        keeps every statement it has seen prepared, per connection (sqlite3 up to 128, psycopg up to 100, on the
        server too): with one size per batch length, that was up to 4 MB of SQLite's memory per pooled connection.

        On SQLite, entries alone are written without a transaction, one INSERT at a time: when one fails, those
        before it are written, and SpendWriter retries the whole batch. Their ids make the retry skip them.
        """
        charged = [
            self._sql.charge.args({"t": token, "amount": tally.spend, "prompt": tally.prompt_tokens,
                                   "completion": tally.completion_tokens, "tokens": tally.total_tokens})
            for token, tally in (charges or {}).items()
        ]  # fmt: skip
        given_back = [
            self._sql.give_back.args(
                {"t": u.token, "calls": u.calls, "amount": u.amount, "window_start": u.window_start}
            )
            for u in unused
            if not u.route
        ]
        routes_back = [self.routes.give_back(u) for u in unused if u.route]
        # On SQLite, lone INSERTs need no transaction, and a transaction would hold the write lock across GIL waits.
        atomic = not self._sql.sqlite or bool(charged) or bool(given_back) or bool(routes_back)
        nothing = (None,) * len(USAGE)
        bare = [entry for entry in entries if self._sql.usage(entry) == nothing]
        used = [entry for entry in entries if self._sql.usage(entry) != nothing] if len(bare) < len(entries) else []
        with self._guard("writing spend log entries"), dbapi_cursor(self.engine, atomic=atomic) as cursor:
            for insert, some in ((self._sql.record_bare, bare), (self._sql.record, used)):
                start = 0
                while start < len(some):
                    left = len(some) - start
                    size = RECORD_ROWS if left >= RECORD_ROWS else 1 << (left.bit_length() - 1)
                    cursor.execute(
                        insert.sql[size], [value for e in some[start : start + size] for value in insert.values(e)]
                    )
                    start += size
            if charged:
                cursor.executemany(self._sql.charge.sql, charged)
            if given_back:
                cursor.executemany(self._sql.give_back.sql, given_back)
            if routes_back:
                cursor.executemany(self.routes.give_back_sql, routes_back)

    # --- administration: the queries in admin.py, on a connection opened here ---------------------------------

    def create(self, new: NewKey) -> KeyInfo:
        """Insert a key; RequestError if its value or alias is taken."""
        with self._guard("creating a key"), self.engine.begin() as conn:
            row = admin.insert_key(conn, new)
        self.edits += 1  # this worker may remember the key as unknown (auth.RecentKeys): not any more
        return _info(row)

    def update(self, token: str, changes: Mapping[str, Any]) -> KeyInfo | None:
        """Change some fields of a key (see UPDATABLE); the key as it is then, or None if there is no such key."""
        if changes:
            with self._guard("updating a key"), self.engine.begin() as conn:
                admin.update_key(conn, token, changes)
            self.edits += 1
        return self.find(token)  # and its budget reset, if one is due

    def delete(self, tokens: Sequence[str]) -> list[str]:
        """Delete all these keys, or none: returns the ones that do not exist (then nothing was deleted)."""
        with self._guard("deleting keys"), self.engine.begin() as conn:
            missing = admin.delete_keys(conn, tokens)
        self.edits += 1
        return missing

    def page(
        self, page: int, size: int, key_alias: str | None = None, alias_contains: str | None = None
    ) -> tuple[list[KeyInfo], int]:
        """One page of keys, newest first, and how many there are in all (filtered by alias: admin.page_rows)."""
        with self._guard("listing keys"), self._reads.begin() as conn:
            rows, total = admin.page_rows(conn, page, size, key_alias, alias_contains)
        return [self._current(row) for row in rows], total

    def find_many(self, tokens: Sequence[str]) -> list[KeyInfo]:
        """The keys among these tokens that exist, as stored (their names, for pages that list many tokens)."""
        with self._guard("reading keys"), self._reads.connect() as conn:
            return [_info(row) for row in admin.key_rows(conn, tokens)]

    def spend_logs(
        self, token: str | None, start: float | None, end: float | None, limit: int, route: str | None = None,
        status: int | None = None,
    ) -> list[SpendEntry]:  # fmt: skip
        """Spend log entries, newest first, of one key or all, started in [start, end), of one route or status."""
        with self._guard("reading spend logs"), self._reads.connect() as conn:
            return admin.spend_entries(conn, token, start, end, limit, route, status)

    def spend_entry(self, request_id: str) -> SpendEntry | None:
        """One spend log entry by its own id."""
        with self._guard("reading spend logs"), self._reads.connect() as conn:
            return admin.spend_entry(conn, request_id)

    def spend_report(self, group: ReportGroup, start: float, end: float, limit: int) -> list[ReportRow]:
        """Spend, calls and tokens per UTC day and group, of the entries started in [start, end): `limit` rows at
        most, days in order and the biggest spenders first within a day."""
        with self._guard("reading the spend report"), self._reads.connect() as conn:
            return report_rows(conn, group, start, end, limit)

    def spend_totals(self, group: ReportGroup, start: float, end: float, limit: int) -> list[GroupTotal]:
        """Spend, calls and tokens per key, route or model over [start, end), the biggest spenders first."""
        with self._guard("reading the spend report"), self._reads.connect() as conn:
            return total_rows(conn, group, start, end, limit)

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
        metadata=m["metadata"] or {}, tpm_limit=m["tpm_limit"], budget_duration=m["budget_duration"],
        budget_reset_at=m["budget_reset_at"], prompt_tokens=m["prompt_tokens"],
        completion_tokens=m["completion_tokens"], total_tokens=m["total_tokens"],
        max_parallel_requests=m["max_parallel_requests"],
    )  # fmt: skip


def _due(reset_at: float | None, now: float) -> bool:
    return reset_at is not None and reset_at <= now


def open_store(url: str) -> SqlKeyStore:
    """The store at this URL, its schema brought up to date first (unless the gunicorn master already did)."""
    engine = open_engine(url)
    try:
        ensure_schema(engine)
    except BaseException:
        engine.dispose()
        raise
    return SqlKeyStore(engine)
