"""The usage page: spend and calls per UTC day over a range of dates (30 days unless picked), and the range's spend,
calls and tokens by route, model and key (the biggest spenders), from the spend log through the queries of
/global/spend/report (keystore/report.py), so its figures are the report's and /spend/logs's."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from functools import partial

from flask import Blueprint, render_template, request

from passthru import key_fields
from passthru.errors import RequestError
from passthru.key_fields import MAX_REPORT_DAYS, MAX_REPORT_ROWS
from passthru.keystore.records import GroupTotal
from passthru.ui import Admin
from passthru.ui.charts import bar_chart

DEFAULT_DAYS = 30
TOP = 20  # keys and models listed, the biggest spenders first


def add_rules(blueprint: Blueprint, admin: Admin) -> None:
    blueprint.add_url_rule("/usage", "usage", partial(usage, admin), methods=["GET"])


def usage(admin: Admin) -> str | tuple[str, int]:
    """GET /ui/usage?start=YYYY-MM-DD&end=YYYY-MM-DD (both days included, UTC)."""
    today = datetime.now(UTC).date()
    start_day = request.args.get("start") or (today - timedelta(days=DEFAULT_DAYS - 1)).isoformat()
    end_day = request.args.get("end") or today.isoformat()
    dates = {"start": start_day, "end": end_day}
    try:
        if len(start_day) != 10 or len(end_day) != 10:
            raise RequestError("pick the first and the last day (YYYY-MM-DD)", param="start")
        start = key_fields.instant(start_day, "start", end=False)
        end = key_fields.instant(end_day, "end", end=True)
        assert start is not None and end is not None
        if not 0 < end - start <= MAX_REPORT_DAYS * 86400:
            raise RequestError(f"the last day must be after the first, at most {MAX_REPORT_DAYS} days later",
                               param="end")  # fmt: skip
        keys = admin.keys()
        rows = keys.spend_report("route", start, end, MAX_REPORT_ROWS + 1)
        if len(rows) > MAX_REPORT_ROWS:
            raise RequestError("that range has too many routes and days to show: narrow the dates", param="end")
        models = keys.spend_totals("model", start, end, TOP)
        top = keys.spend_totals("api_key", start, end, TOP)
    except RequestError as error:
        return render_template("ui/usage.html", error=error.message, **dates), 400
    per_day: dict[int, GroupTotal] = {}
    per_route: dict[str | None, GroupTotal] = {}
    for row in rows:
        per_day[row.day] = added(per_day.get(row.day), row)
        per_route[row.group] = added(per_route.get(row.group), row)
    days = _days(date.fromisoformat(start_day), date.fromisoformat(end_day))
    epoch = date(1970, 1, 1)
    figures = [(day.isoformat(), per_day.get((day - epoch).days)) for day in days]
    spend = bar_chart("Spend per day", [(d, t.spend if t else 0.0) for d, t in figures], lambda v: f"{v:,.4f}")
    calls = bar_chart("Calls per day", [(d, float(t.calls) if t else 0.0) for d, t in figures], lambda v: f"{v:,.0f}")
    named = {info.token: info for info in keys.find_many([t.group for t in top if t.group])}
    return render_template(
        "ui/usage.html", **dates, charts=(spend, calls), figures=figures,
        total=_sum(per_route.values()), routes=sorted(per_route.values(), key=lambda t: -t.spend), models=models,
        top=[(t, named.get(t.group or ""), t.group == admin.master_token) for t in top],
    )  # fmt: skip


def added(total: GroupTotal | None, row: GroupTotal) -> GroupTotal:
    """Two sums of the same group as one (the group's name is the first's); unknown tokens stay unknown."""
    if total is None:
        return GroupTotal(row.group, row.spend, row.calls, row.prompt_tokens, row.completion_tokens, row.total_tokens)
    return replace(
        total, spend=total.spend + row.spend, calls=total.calls + row.calls,
        prompt_tokens=_plus(total.prompt_tokens, row.prompt_tokens),
        completion_tokens=_plus(total.completion_tokens, row.completion_tokens),
        total_tokens=_plus(total.total_tokens, row.total_tokens),
    )  # fmt: skip


def _sum(totals: Iterable[GroupTotal]) -> GroupTotal:
    whole = GroupTotal(None, 0.0, 0, None, None, None)
    for total in totals:
        whole = added(whole, total)
    return whole


def _plus(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else a + b


def _days(first: date, last: date) -> list[date]:
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]
