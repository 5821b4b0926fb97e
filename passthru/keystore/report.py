"""/global/spend/report's query: the spend log summed per UTC day and per key, route or model, on either backend; and
the same sums over a whole range (the admin page's top keys)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from passthru.keystore.records import GroupTotal, ReportGroup, ReportRow
from passthru.keystore.schema import spend_logs


class utc_day(FunctionElement[int]):
    """Whole days since 1970-01-01 UTC of an epoch-seconds column (the entries' start_time is never negative)."""

    type = sa.Integer()
    inherit_cache = True


@compiles(utc_day, "sqlite")
def _day_sqlite(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    return f"CAST({compiler.process(element.clauses, **kw)} / 86400 AS INTEGER)"  # truncates: floor when positive


@compiles(utc_day, "postgresql")
def _day_postgresql(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    return f"CAST(floor({compiler.process(element.clauses, **kw)} / 86400) AS INTEGER)"  # a bare CAST rounds


def _column(group: ReportGroup) -> Any:
    c = spend_logs.c
    return {"api_key": c.token, "route": c.route, "model": c.model}[group]


def _sums() -> tuple[Any, ...]:
    """What each row sums: spend, calls, and the tokens (SUM skips unknown ones, NULL, and is NULL when none said)."""
    c = spend_logs.c
    return (sa.func.sum(c.spend), sa.func.count(), sa.func.sum(c.prompt_tokens), sa.func.sum(c.completion_tokens),
            sa.func.sum(c.total_tokens))  # fmt: skip


def report_rows(conn: sa.Connection, group: ReportGroup, start: float, end: float, limit: int) -> list[ReportRow]:
    """The report's rows for entries started in [start, end), days in order, the biggest spend first in each day.

    One pass over the start_time index's range.
    """
    c = spend_logs.c
    by, day, sums = _column(group), utc_day(c.start_time), _sums()
    query = (
        sa.select(day, by, *sums)
        .where(c.start_time >= start, c.start_time < end)
        .group_by(day, by)
        .order_by(day, sums[0].desc(), by)
        .limit(limit)
    )
    return [ReportRow(day=int(d), **_total(g, rest)) for d, g, *rest in conn.execute(query)]


def total_rows(conn: sa.Connection, group: ReportGroup, start: float, end: float, limit: int) -> list[GroupTotal]:
    """The same sums over the whole range [start, end), one row per key, route or model: the biggest spend first,
    `limit` rows at most."""
    c = spend_logs.c
    by, sums = _column(group), _sums()
    query = (
        sa.select(by, *sums)
        .where(c.start_time >= start, c.start_time < end)
        .group_by(by)
        .order_by(sums[0].desc(), by)
        .limit(limit)
    )
    return [GroupTotal(**_total(g, rest)) for g, *rest in conn.execute(query)]


def _total(group: str | None, sums: list[Any]) -> dict[str, Any]:
    spend, calls, prompt, completion, total = sums
    return {"group": group, "spend": float(spend), "calls": int(calls), "prompt_tokens": _whole(prompt),
            "completion_tokens": _whole(completion), "total_tokens": _whole(total)}  # fmt: skip


def _whole(tokens: Any) -> int | None:
    return None if tokens is None else int(tokens)  # PostgreSQL sums bigints as numeric (a Decimal)
