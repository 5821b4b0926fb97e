"""The key store's per-call statements (admission, leases, the charge, the spend log, the budget reset), built once
per engine: what sql.SqlKeyStore executes on every call, apart from the /key/* operations' queries."""

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

# Spend log rows per INSERT at most: the largest power of two whose values stay under 999, the oldest SQLite's limit
# on parameters (13 columns: 64 rows), so that every INSERT has one of a few sizes (see SqlKeyStore.record).
RECORD_ROWS = 1 << ((999 // len(spend_logs.c)).bit_length() - 1)
# What an answer said of its usage. An entry without any is written without these columns (left NULL): binding them
# doubled SQLite's CPU per entry, for calls that have none of them (every route that is not a model's).
USAGE = ("model", "prompt_tokens", "completion_tokens", "total_tokens", "target")


@dataclass(frozen=True)
class Insert:
    """The spend log's INSERTs of 1, 2, 4 ... RECORD_ROWS rows of some columns, and an entry's values for them."""

    sql: dict[int, str]
    values: Callable[[Any], tuple[Any, ...]]  # a SpendEntry's fields, named and ordered as the columns


@dataclass(frozen=True)
class PerCall:
    """The statements of the hot path, compiled for one engine."""

    admit: Statement  # counts and charges calls if they would be admitted one by one (admit and lease)
    why: Statement  # what the key is decided on, when the admission found nothing to update
    charge: Statement  # with the spend log entries: what admission did not charge, and tokens (records.Tally)
    reset: Statement  # spend back to 0 and the next reset time, if no other host reset it first
    give_back: Statement  # leased calls not used: their cost, and their count while their window lasts
    window_of: Statement
    record: Insert  # every column
    record_bare: Insert  # an entry without usage: not the USAGE columns
    usage: Callable[[Any], tuple[Any, ...]]  # an entry's USAGE fields
    find: Select[Any]
    sqlite: bool


def per_call_statements(engine: Engine, window: float) -> PerCall:
    """Build the per-call statements once; `window` is the rpm_limit and tpm_limit window in seconds."""
    c, now = keys.c, store_now()
    fresh = c.window_start + window <= now  # the key's last window is over: this call opens a new one
    tokens_fresh = c.token_window_start + window <= now
    calls, room = sa.bindparam("calls", type_=sa.Integer), sa.bindparam("room", type_=sa.Integer)
    cost, hold = sa.bindparam("cost", type_=sa.Double), sa.bindparam("hold", type_=sa.Double)
    # Counts and charges `calls` calls, if `room` calls made one by one would all be admitted, and the key's
    # expiry and rpm window last `hold` seconds more. One call (calls = room = 1, hold = 0) is admit; more is
    # a lease (leases.py). A key whose budget reset is due is not admitted: SqlKeyStore.admit resets it first. Tokens
    # are counted when answers end (charge, below): a key is refused once its window holds tpm_limit of them.
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
            sa.or_(c.tpm_limit.is_(None), tokens_fresh, c.token_window_count < c.tpm_limit),
            sa.or_(c.budget_reset_at.is_(None), c.budget_reset_at > now),
        )
        .values(
            window_start=sa.case((fresh, now), else_=c.window_start),
            window_count=sa.case((fresh, calls), else_=c.window_count + calls),
            spend=c.spend + calls * cost,
        )
    )
    why = sa.select(
        c.blocked, c.expires, c.max_budget, c.spend, c.rpm_limit, c.window_start, c.window_count, c.tpm_limit,
        c.token_window_start, c.token_window_count, c.budget_reset_at, c.budget_duration, now,
    ).where(c.token == sa.bindparam("t"))  # fmt: skip
    # Tokens open the key's tpm window when its last one is over (fixed windows, as for rpm), else add to it.
    tokens = sa.bindparam("tokens", type_=sa.BigInteger)
    opens = sa.and_(tokens > 0, tokens_fresh)
    charge = (
        sa.update(keys)
        .where(c.token == sa.bindparam("t"))
        .values(
            spend=c.spend + sa.bindparam("amount", type_=sa.Double),
            prompt_tokens=c.prompt_tokens + sa.bindparam("prompt", type_=sa.BigInteger),
            completion_tokens=c.completion_tokens + sa.bindparam("completion", type_=sa.BigInteger),
            total_tokens=c.total_tokens + tokens,
            token_window_start=sa.case((opens, now), else_=c.token_window_start),
            token_window_count=sa.case((opens, tokens), else_=c.token_window_count + tokens),
        )
    )
    # Compare-and-set: of the hosts that saw the same due reset, exactly one moves budget_reset_at on.
    seen = sa.bindparam("seen", type_=sa.Double)
    reset = (
        sa.update(keys)
        .where(c.token == sa.bindparam("t"), c.budget_reset_at == seen)
        .values(spend=0.0, budget_reset_at=sa.bindparam("next", type_=sa.Double))
    )
    # Leased calls not used: their cost back (never below 0: the key's budget may have been reset meanwhile), and
    # their count too while their window lasts.
    amount = sa.bindparam("amount", type_=sa.Double)
    give_back = (
        sa.update(keys)
        .where(c.token == sa.bindparam("t"))
        .values(
            spend=sa.case((c.spend > amount, c.spend - amount), else_=0.0),
            window_count=sa.case(
                (c.window_start == sa.bindparam("window_start", type_=sa.Double), c.window_count - calls),
                else_=c.window_count,
            ),
        )
    )
    window_of = sa.select(c.window_start).where(c.token == sa.bindparam("t"))
    sqlite = engine.dialect.name == "sqlite"
    bare = [name for name in spend_logs.c.keys() if name not in USAGE]
    return PerCall(
        admit=Statement(engine, admit),
        why=Statement(engine, why),
        charge=Statement(engine, charge),
        reset=Statement(engine, reset),
        give_back=Statement(engine, give_back),
        window_of=Statement(engine, window_of),
        record=_inserts(spend_logs.c.keys(), "?" if sqlite else "%s"),
        record_bare=_inserts(bare, "?" if sqlite else "%s"),
        usage=operator.attrgetter(*USAGE),
        find=sa.select(keys, now.label("now")).where(c.token == sa.bindparam("t")),
        sqlite=sqlite,
    )


def _inserts(columns: list[str], mark: str) -> Insert:
    """The spend log's INSERTs of these columns (SqlKeyStore.record), with the driver's placeholder."""
    into = f"INSERT INTO {spend_logs.name} ({', '.join(columns)}) VALUES "
    row = f"({', '.join([mark] * len(columns))})"
    # An entry already written is skipped, not an error: a batch that failed midway is retried whole.
    sql = {
        1 << n: f"{into}{', '.join([row] * (1 << n))} ON CONFLICT (request_id) DO NOTHING"
        for n in range(RECORD_ROWS.bit_length())
    }
    return Insert(sql, operator.attrgetter(*columns))
