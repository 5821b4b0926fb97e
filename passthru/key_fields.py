"""The key API's fields: each parsed and range-checked before the store is touched, so that a value out of range or of
the wrong type is a 400 naming its field (LiteLLM's error shape) and nothing is created or changed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, date, datetime
from typing import Any

from passthru.auth import digest
from passthru.errors import RequestError
from passthru.keystore.budget import DURATION, SECONDS
from passthru.slots import MAX_PARALLEL

Fields = Mapping[str, Any]

# A key's duration in seconds; a month is 30 days here (a budget_duration's month is a calendar month: budget.py).
DURATION_UNITS = {**SECONDS, "mo": 30 * 86400}
# A custom key: what generated keys look like, so the log filter (logs.KEY_PATTERN) recognises every key.
CUSTOM_KEY = re.compile(r"sk-[A-Za-z0-9_-]{8,200}")
TOKEN = re.compile(r"[0-9a-f]{64}")
MAX_PAGE_SIZE = 100  # LiteLLM's bound for /key/list
MAX_SPEND_LOGS = 10_000
# The key API's limits (the README's "key API limits"). Each is checked before the store is touched, so a value out
# of range is a 400 naming its field and nothing is written: past them a datetime overflows (duration), a column
# cannot hold the value (rpm_limit is a PostgreSQL integer), or an admin's typo becomes a key nobody can list.
MAX_DURATION = 100 * 365 * 86400  # 100 years: an expiry stays a date that Python and every client can show
MAX_AMOUNT = 1e15  # max_budget and spend: finite, and exact to the cent in a double
MAX_LIMIT = 2**31 - 1  # the rpm_limit and tpm_limit columns are PostgreSQL integers
# Each whole-number field's bound: max_parallel_requests counts calls in flight on a host, a slot each (slots.py).
INTEGER_BOUNDS = {"rpm_limit": MAX_LIMIT, "tpm_limit": MAX_LIMIT, "max_parallel_requests": MAX_PARALLEL}
MAX_ROUTES = 100  # allowed_routes entries: each call of the key checks them in turn
MAX_ROUTE_LENGTH = 1024
MAX_METADATA_BYTES = 4096  # metadata as compact UTF-8 JSON: a note about the key, not a document store
MAX_METADATA_DEPTH = 16
MAX_KEYS_PER_DELETE = MAX_PAGE_SIZE  # a page of /key/list at a time; a statement's parameters stay few
MAX_KEY_LENGTH = 1024  # a key named by value (sk-…) in a lookup; longer cannot be one (CUSTOM_KEY)
MAX_BODY_BYTES = 256 * 1024  # a request body: every field above at its bound fits (allowed_routes: 100 KB)
MAX_PAGE = 10**9
MAX_REPORT_DAYS = 366  # /global/spend/report's date range: a year at most, read in one pass of the log's time index
MAX_REPORT_ROWS = 10_000  # its days × groups: past that the range must be narrowed (a report cut short would lie)


def _text(value: str) -> bool:
    """Whether a string can be stored as text on both backends: UTF-8 (no lone surrogates, which JSON's \\ud800
    escapes can carry) and no control characters (PostgreSQL refuses NUL in text)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return value.isprintable()


def known(body: Fields, served: frozenset[str]) -> dict[str, Any]:
    """The fields passthru serves. LiteLLM's other fields (models, team_id, soft_budget, …) are accepted while empty,
    as LiteLLM's clients send them so; with a value they are refused: a limit silently not enforced is worse."""
    for name, value in body.items():
        if name not in served and value:
            shown_name = name[:64] if _text(name) else repr(name[:64])
            raise RequestError(f"{shown_name} is not supported by passthru (supported: {', '.join(sorted(served))})",
                               param=shown_name)  # fmt: skip
    return {name: value for name, value in body.items() if name in served}


def token_of(value: Any, param: str = "key") -> str:
    """The stored hash for a key given as sk-… or as its 64-hex token (LiteLLM accepts either)."""
    if isinstance(value, str) and value.startswith("sk-") and len(value) <= MAX_KEY_LENGTH and _text(value):
        return digest(value).hex()
    if isinstance(value, str) and TOKEN.fullmatch(value):
        return value
    raise RequestError(f"{param} must be a key (sk-…) or its hashed token", param=param)


def number(fields: Fields, name: str, *, integer: bool = False) -> Any:
    """A number from 0 to its bound, or None. Compared, never converted: a JSON integer of 400 digits has no float."""
    value = fields.get(name)
    if value is None:
        return None
    most = INTEGER_BOUNDS.get(name, MAX_LIMIT) if integer else MAX_AMOUNT
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise RequestError(f"{name} must be {'an integer' if integer else 'a number'} or null", param=name)
    if not 0 <= value <= most:  # NaN fails both comparisons
        raise RequestError(f"{name} must be between 0 and {most if integer else f'{most:g}'}", param=name)
    return value


def duration(value: Any) -> float | None:
    """Seconds from a LiteLLM duration ("30s" … "1mo"), 100 years at most: past that an expiry is no datetime."""
    if value is None:
        return None
    count, unit = _duration_parts(value, "duration")
    seconds = count * DURATION_UNITS[unit]
    if seconds > MAX_DURATION:
        raise RequestError(f"duration must be at most 100 years ({MAX_DURATION // 86400}d)", param="duration")
    return float(seconds)


def budget_duration(value: Any) -> str | None:
    """A budget period ("30s" … "1mo", a calendar month), as stored: from one unit to 100 years, its digits without
    leading zeros. A period of 0 would never end."""
    if value is None:
        return None
    count, unit = _duration_parts(value, "budget_duration")
    if not 1 <= count * DURATION_UNITS[unit] <= MAX_DURATION:
        raise RequestError(f"budget_duration must be from 1s to 100 years ({MAX_DURATION // 86400}d)",
                           param="budget_duration")  # fmt: skip
    return f"{count}{unit}"


def _duration_parts(value: Any, param: str) -> tuple[int, str]:
    match = DURATION.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise RequestError(f'{param} must look like "30s", "10m", "1h", "7d", "2w" or "1mo", or be null', param=param)
    return int(match.group(1)), match.group(2)


def routes(value: Any) -> tuple[str, ...] | None:
    """allowed_routes: paths (or prefixes ending in *), few and short, since every call of the key checks them."""
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) > MAX_ROUTES
        or not all(isinstance(r, str) and r.startswith("/") and len(r) <= MAX_ROUTE_LENGTH and _text(r) for r in value)
    ):
        raise RequestError(f"allowed_routes must be a list of at most {MAX_ROUTES} paths such as /v1/rerank (each "
                           f"at most {MAX_ROUTE_LENGTH} characters), or null", param="allowed_routes")  # fmt: skip
    return tuple(value)


def alias(value: Any, param: str = "key_alias") -> str | None:
    """A key_alias (given, or filtered on by /key/list) that both backends store and compare as it was sent."""
    if value is not None and (not isinstance(value, str) or not value or len(value) > 255 or not _text(value)):
        raise RequestError(f"{param} must be a string of 1 to 255 printable characters, or null", param=param)
    return value


def metadata(value: Any) -> dict[str, Any]:
    """A JSON object of MAX_METADATA_BYTES at most, as strict JSON (no NaN, which PostgreSQL's json refuses)."""
    if value is None:
        return {}
    problem = None if isinstance(value, dict) else "metadata must be a JSON object"
    if problem is None and _depth(value) > MAX_METADATA_DEPTH:
        problem = f"metadata must nest at most {MAX_METADATA_DEPTH} levels deep"
    if problem is None:
        try:
            encoded = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
        except (ValueError, UnicodeEncodeError):  # NaN or Infinity; a lone surrogate
            problem = "metadata must be strict JSON: no NaN or Infinity, no unpaired \\ud800 escapes"
        else:
            if len(encoded) > MAX_METADATA_BYTES:
                problem = f"metadata must be at most {MAX_METADATA_BYTES} bytes of JSON"
    if problem is not None:
        raise RequestError(problem, param="metadata")
    return value  # type: ignore[no-any-return]


def _depth(value: Any) -> int:
    """How deep JSON containers nest, counted without recursion (a hostile value may nest thousands deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if level > MAX_METADATA_DEPTH:
                break
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def positive_int(args: Fields, name: str, default: int, most: int) -> int:
    """A whole number from 1 to `most`: an int (the CLI) or its decimal digits (a query string)."""
    value = args.get(name, default)
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 12:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be a whole number", param=name)
    if not 1 <= value <= most:
        raise RequestError(f"{name} must be between 1 and {most}", param=name)
    return value


def instant(value: Any, name: str, *, end: bool) -> float | None:
    """A date (YYYY-MM-DD, UTC, an end date counting its whole day) or an ISO 8601 time, as epoch seconds."""
    if value in (None, ""):
        return None
    try:
        if isinstance(value, str) and len(value) == 10:
            day = date.fromisoformat(value)
            # The day's end in seconds, not as a date: the day after 9999-12-31 is no date.
            return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() + (86400 if end else 0)
        if not isinstance(value, str):
            raise ValueError(value)
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise RequestError(f"{name} must be a date (YYYY-MM-DD) or an ISO 8601 time", param=name) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
