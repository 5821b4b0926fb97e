"""A route's own limits in its config entry (issue 15): `rpm_limit`, counted in the key store across every host that
shares it, and `max_parallel_requests`, across this host's workers. limits.py enforces them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from passthru.config_fields import FieldReader, kind
from passthru.slots import MAX_PARALLEL

LIMIT_FIELDS = ("rpm_limit", "max_parallel_requests")
MAX_RPM = 2**31 - 1  # as a key's rpm_limit (key_fields.MAX_LIMIT)
DIGITS = re.compile(r"[0-9]{1,10}")


@dataclass(frozen=True)
class RouteLimits:
    """A route's limits; None: unbounded."""

    rpm_limit: int | None = None  # calls a minute, in total on every host sharing the key store
    max_parallel_requests: int | None = None  # calls in flight at once, in total on this host's workers


def read_limits(reader: FieldReader, entry: dict[str, Any], where: str) -> RouteLimits:
    """The entry's rpm_limit and max_parallel_requests, each a whole number from 1."""
    return RouteLimits(
        _limit(reader, entry.get("rpm_limit"), f"{where}.rpm_limit", MAX_RPM),
        _limit(reader, entry.get("max_parallel_requests"), f"{where}.max_parallel_requests", MAX_PARALLEL),
    )


def _limit(reader: FieldReader, value: Any, field: str, most: int) -> int | None:
    # A quoted number is read as the number it says, as the config's other numbers are (config_fields.number).
    if isinstance(value, str) and DIGITS.fullmatch(value.strip()):
        value = int(value)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise reader.error(field, f"must be a whole number, not {kind(value)}")
    if not 1 <= value <= most:
        # 0 would refuse every call: a route that serves nothing is removed, not limited to nothing.
        raise reader.error(field, f"must be from 1 to {most}")
    return value
