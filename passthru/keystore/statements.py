"""The key store's per-call statements (admission, leases, the charge, the spend log), built once per engine: what
sql.SqlKeyStore executes on every call, apart from the /key/* operations' queries."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.sql import Select

from passthru.keystore.engine import Statement
from passthru.keystore.schema import keys, spend_logs, store_now

# Spend log rows per INSERT at most: 7 values each stays under 999, the oldest SQLite's limit on parameters. A power
# of two, so that every INSERT has one of eight sizes (see SqlKeyStore.record).
RECORD_ROWS = 128


@dataclass(frozen=True)
class PerCall:
    """The statements of the hot path, compiled for one engine."""

    admit: Statement  # counts and charges calls if they would be admitted one by one (admit and lease)
    why: Statement  # what the key is decided on, when the admission found nothing to update
    charge: Statement  # a key without limits: its calls' cost, with their spend log entries
    give_back: Statement  # leased calls not used: their cost, and their count while their window lasts
    window_of: Statement
    record: dict[int, str]  # the spend log's INSERT of 1, 2, 4 ... RECORD_ROWS rows
    record_values: Callable[[Any], tuple[Any, ...]]  # a SpendEntry's fields, named and ordered as the columns
    find: Select[Any]
    sqlite: bool


def per_call_statements(engine: Engine, window: float) -> PerCall:
    """Build the per-call statements once; `window` is rpm_limit's window in seconds."""
    c, now = keys.c, store_now()
    fresh = c.window_start + window <= now  # the key's last window is over: this call opens a new one
    calls, room = sa.bindparam("calls", type_=sa.Integer), sa.bindparam("room", type_=sa.Integer)
    cost, hold = sa.bindparam("cost", type_=sa.Double), sa.bindparam("hold", type_=sa.Double)
    # Counts and charges `calls` calls, if `room` calls made one by one would all be admitted, and the key's
    # expiry and rpm window last `hold` seconds more. One call (calls = room = 1, hold = 0) is admit; more is
    # a lease (leases.py).
    admit = (
        sa.update(keys)
        .where(
            c.token == sa.bindparam("t"),
            sa.not_(c.blocked),
            sa.or_(c.expires.is_(None), c.expires > now + hold),
            sa.or_(c.max_budget.is_(None), c.spend + (room - 1) * cost < c.max_budget),
            sa.or_(
                c.rpm_limit.is_(None),
                sa.and_(fresh, room <= c.rpm_limit),
                sa.and_(c.window_start + window > now + hold, c.window_count + room <= c.rpm_limit),
            ),
        )
        .values(
            window_start=sa.case((fresh, now), else_=c.window_start),
            window_count=sa.case((fresh, calls), else_=c.window_count + calls),
            spend=c.spend + calls * cost,
        )
    )
    why = sa.select(
        c.blocked, c.expires, c.max_budget, c.spend, c.rpm_limit, c.window_start, c.window_count, now
    ).where(c.token == sa.bindparam("t"))
    charge = sa.update(keys).where(c.token == sa.bindparam("t")).values(spend=c.spend + sa.bindparam("amount"))
    # Leased calls not used: their cost back, and their count too while their window lasts.
    give_back = (
        sa.update(keys)
        .where(c.token == sa.bindparam("t"))
        .values(
            spend=c.spend - sa.bindparam("amount", type_=sa.Double),
            window_count=sa.case(
                (c.window_start == sa.bindparam("window_start", type_=sa.Double), c.window_count - calls),
                else_=c.window_count,
            ),
        )
    )
    window_of = sa.select(c.window_start).where(c.token == sa.bindparam("t"))
    sqlite = engine.dialect.name == "sqlite"
    # The spend log's INSERTs of 1, 2, 4 ... RECORD_ROWS rows (SqlKeyStore.record), with the driver's placeholder.
    mark = "?" if sqlite else "%s"
    into = f"INSERT INTO {spend_logs.name} ({', '.join(spend_logs.c.keys())}) VALUES "
    row = f"({', '.join([mark] * len(spend_logs.c))})"
    # An entry already written is skipped, not an error: a batch that failed midway is retried whole.
    record = {
        1 << n: f"{into}{', '.join([row] * (1 << n))} ON CONFLICT (request_id) DO NOTHING"
        for n in range(RECORD_ROWS.bit_length())
    }
    return PerCall(
        admit=Statement(engine, admit),
        why=Statement(engine, why),
        charge=Statement(engine, charge),
        give_back=Statement(engine, give_back),
        window_of=Statement(engine, window_of),
        record=record,
        record_values=operator.attrgetter(*spend_logs.c.keys()),
        find=sa.select(keys).where(c.token == sa.bindparam("t")),
        sqlite=sqlite,
    )
