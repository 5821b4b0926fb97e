"""A key's budget period (LiteLLM's budget_duration): when its spend next goes back to 0. Free of SQLAlchemy, so the
key API validates with it before the store is opened, and the store resets with it."""

from __future__ import annotations

import calendar
import math
import re
from datetime import UTC, datetime

# LiteLLM's duration strings ("30s", "10m", "1h", "7d", "2w", "1mo"); a few digits, so int() is cheap.
DURATION = re.compile(r"([0-9]{1,20})(s|m|h|d|w|mo)")
SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse(duration: str) -> tuple[int, str]:
    """A duration's count and unit; ValueError for anything else."""
    match = DURATION.fullmatch(duration)
    if match is None:
        raise ValueError(f"not a duration: {duration!r}")
    return int(match.group(1)), match.group(2)


def next_reset(start: float, duration: str, now: float) -> float:
    """The first of `start` + n periods (n ≥ 1) that is past `now`, in epoch seconds.

    Counted from `start` (the reset that was due), not from `now`: a reset noticed hours late, because the key was
    neither called nor read, keeps the key's schedule. A month is a calendar month, as LiteLLM's duration_in_seconds
    counts "mo": the same day and time, or the month's last day when it is shorter (31 January, then 28 February).
    """
    count, unit = parse(duration)
    if count < 1:
        raise ValueError("a budget period is at least one unit long")
    if unit != "mo":
        period = count * SECONDS[unit]
        moment = start + max(1, math.floor((now - start) / period) + 1) * period
        return moment if moment > now else moment + period  # a float rounding at the boundary
    begin, until = datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(now, UTC)
    elapsed = (until.year - begin.year) * 12 + until.month - begin.month
    periods = max(1, elapsed // count)
    while (moment := _add_months(begin, periods * count).timestamp()) <= now:
        periods += 1
    return moment


def _add_months(moment: datetime, months: int) -> datetime:
    years, month = divmod(moment.month - 1 + months, 12)
    year = moment.year + years
    return moment.replace(year=year, month=month + 1, day=min(moment.day, calendar.monthrange(year, month + 1)[1]))
