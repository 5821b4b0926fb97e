"""/global/spend/report's query: the spend log summed per UTC day and per key, route or model, on either backend."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from passthru.keystore.records import ReportGroup, ReportRow
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


def report_rows(conn: sa.Connection, group: ReportGroup, start: float, end: float, limit: int) -> list[ReportRow]:
    """The report's rows for entries started in [start, end), days in order, the biggest spend first in each day.

    One pass over the start_time index's range; the sums of tokens skip unknown ones (NULL), and are NULL when no
    entry of the group said.
    """
    c = spend_logs.c
    by = {"api_key": c.token, "route": c.route, "model": c.model}[group]
    day, spend = utc_day(c.start_time), sa.func.sum(c.spend)
    query = (
        sa.select(day, by, spend, sa.func.count(), sa.func.sum(c.prompt_tokens), sa.func.sum(c.completion_tokens),
                  sa.func.sum(c.total_tokens))
        .where(c.start_time >= start, c.start_time < end)
        .group_by(day, by)
        .order_by(day, spend.desc(), by)
        .limit(limit)
    )  # fmt: skip
    return [
        ReportRow(int(d), g, float(s), int(n), _whole(prompt), _whole(completion), _whole(total))
        for d, g, s, n, prompt, completion, total in conn.execute(query)
    ]


def _whole(tokens: Any) -> int | None:
    return None if tokens is None else int(tokens)  # PostgreSQL sums bigints as numeric (a Decimal)
