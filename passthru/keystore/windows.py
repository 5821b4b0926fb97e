"""Routes' rpm_limit windows (issue 15): counted as a key's rpm_limit is, one fixed 60-second window per route opened
by its first call after the last one ended, by one atomic UPDATE on the store's clock, so that every worker of every
host sharing the store counts together. One row per configured route path, made by the route's first call ever.

The limit is the config's, not the row's: it is bound into each UPDATE, so hosts running an edited config count in
the same window, each against the limit it was given.
"""

from __future__ import annotations

import math
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from passthru.keystore.engine import Statement, dbapi_cursor
from passthru.keystore.guard import StoreGuard
from passthru.keystore.records import Refusal, Unused
from passthru.keystore.schema import route_windows, store_now

# The store's clock counts in steps: SQLite's in milliseconds (PostgreSQL's in microseconds). Two readings of it can
# each be up to a step behind: comparing them, a difference is believed only past twice that.
CLOCK_STEPS = 0.002


class RouteWindows:
    """The routes' rpm windows of one store (SqlKeyStore.routes); statements built once, executed per call."""

    def __init__(self, engine: Engine, guard: StoreGuard, window: float) -> None:
        self.engine = engine
        self.window = window
        self._guard = guard
        c, now = route_windows.c, store_now()
        route = sa.bindparam("r", type_=sa.Text)
        fresh = c.window_start + window <= now  # the route's last window is over: this call opens a new one
        calls, room = sa.bindparam("calls", type_=sa.Integer), sa.bindparam("room", type_=sa.Integer)
        limit, hold = sa.bindparam("limit", type_=sa.Integer), sa.bindparam("hold", type_=sa.Double)
        # Counts `calls` calls if `room` calls one by one would all be admitted, and the window lasts `hold` seconds
        # more: one call (calls = room = 1, hold = 0), or a lease (leases.py), exactly as a key's (statements.py).
        count = (
            sa.update(route_windows)
            .where(
                c.route == route,
                sa.or_(
                    sa.and_(fresh, room <= limit),
                    sa.and_(c.window_start + window > now + hold, c.window_count + room <= limit),
                ),
            )
            .values(
                window_start=sa.case((fresh, now), else_=c.window_start),
                window_count=sa.case((fresh, calls), else_=c.window_count + calls),
            )
        )
        self._count = Statement(engine, count)
        self._state = Statement(engine, sa.select(c.window_start, c.window_count, now).where(c.route == route))
        # Calls given back (leased and not used, or refused by their key after the route counted them): only from the
        # window they were counted in, while it lasts.
        self._give_back = Statement(
            engine,
            sa.update(route_windows)
            .where(c.route == route, c.window_start == sa.bindparam("window_start", type_=sa.Double))
            .values(window_count=c.window_count - calls),
        )
        mark = "?" if engine.dialect.name == "sqlite" else "%s"
        self._create = (
            f"INSERT INTO {route_windows.name} (route, window_start, window_count) VALUES ({mark}, 0, 0) "
            "ON CONFLICT (route) DO NOTHING"  # another host made it first: its row is the one
        )

    def admit(self, route: str, limit: int) -> float | Refusal | None:
        """Count one call on the route if its window has room: the window's start, to give the call back in; None
        when that window is not known for sure; or the refusal, with the seconds until the window ends."""
        one = self._count.args({"r": route, "limit": limit, "calls": 1, "room": 1, "hold": 0.0})
        state = self._state.args({"r": route})
        for _ in range(3):
            started = time.monotonic()
            with self._guard("checking a route's rpm_limit"), dbapi_cursor(self.engine) as cursor:
                cursor.execute(self._count.sql, one)
                counted = cursor.rowcount == 1
                cursor.execute(self._state.sql, state)
                row = cursor.fetchone()
                if row is None:  # the route's first call on this store
                    cursor.execute(self._create, (route,))
                    continue
            elapsed = time.monotonic() - started
            window_start, window_count, now = row
            if counted:
                # The window read after the UPDATE is the one the call was counted in if it began before the UPDATE
                # ran. One that began since may be another host's, opened once the call's window ended: then the call
                # is never given back (at worst, one call fewer in that window). Read after, not RETURNING: sql.py.
                return float(window_start) if window_start + elapsed + CLOCK_STEPS <= now else None
            if window_start + self.window > now and window_count >= limit:
                return Refusal("rpm", retry_after=max(1, math.ceil(window_start + self.window - now)))
            # Refused, yet the row shows room: the window ended in between. Try again.
        return Refusal("rpm", retry_after=1)

    def lease(self, route: str, limit: int, calls: int, room: int, hold: float) -> float | None:
        """Count `calls` calls at once if `room` calls one by one would all pass and the window lasts `hold` seconds
        more: the window's start, or None (a route's first call is counted one by one, which makes its row)."""
        args = self._count.args({"r": route, "limit": limit, "calls": calls, "room": room, "hold": hold})
        with self._guard("checking a route's rpm_limit"), dbapi_cursor(self.engine) as cursor:
            cursor.execute(self._count.sql, args)
            if cursor.rowcount != 1:
                return None
            # It cannot have moved: the window lasts `hold` more seconds.
            cursor.execute(self._state.sql, self._state.args({"r": route}))
            row = cursor.fetchone()
        return None if row is None else float(row[0])

    @property
    def give_back_sql(self) -> str:
        return self._give_back.sql

    def give_back(self, unused: Unused) -> Any:
        """The give-back statement's parameters for a route's unused calls (SqlKeyStore.record runs them)."""
        return self._give_back.args({"r": unused.token, "calls": unused.calls, "window_start": unused.window_start})
