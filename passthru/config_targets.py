"""Where a route's calls go: its `target`, or its `targets` (each a URL, headers, name, weight and order), and the
retry policy across them (`num_retries`, `retry_on`, `allowed_fails`, `cooldown_time`, `retry_body_limit`).

Read and checked at start-up like every other field (config.py reads the rest of an entry); the names are LiteLLM's
router's where it has one.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from passthru.config_fields import FieldReader, kind

# RFC 9110 token characters: a header name that is anything else cannot be sent.
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # fullmatch it
LANGFUSE_HEADERS = ("langfuse_public_key", "langfuse_secret_key")
TARGET_FIELDS = ("url", "headers", "name", "weight", "order")
RETRY_FIELDS = ("targets", "num_retries", "retry_on", "allowed_fails", "cooldown_time", "retry_body_limit")
# A target's name goes into log lines, metric labels and readiness: a short word, never a URL with its query.
TARGET_NAME = re.compile(r"[A-Za-z0-9._:@+=\[\]-]{1,64}")  # fullmatch it; a host[:port] is one
DEFAULT_RETRY_ON = (429, 500, 502, 503, 504)
DEFAULT_ALLOWED_FAILS = 3
DEFAULT_COOLDOWN_TIME = 30.0
# LLM calls are small: their bodies are kept whole, so an attempt that failed can be sent again byte for byte.
DEFAULT_RETRY_BODY_LIMIT = 1024 * 1024


@dataclass(frozen=True)
class Target:
    """One upstream a route's calls may go to: every value checked, every os.environ/ reference resolved."""

    name: str  # what logs, metrics and readiness show of it: never its URL or headers
    url: str  # query included, as the forwarder uses it
    url_shown: str  # the same URL with environment-derived parts masked, for `passthru check` and debug lines
    headers: tuple[tuple[str, str], ...]  # the route's headers, with the target's own merged over them
    weight: float  # its share among the targets of its order
    order: int  # tried only when every target of a lower order failed or is cooling down


@dataclass(frozen=True)
class Retries:
    """How a route's calls move across its targets when an attempt fails, and when a target cools down."""

    num_retries: int  # attempts after the first
    retry_on: frozenset[int]  # answer statuses that count as a failed attempt
    allowed_fails: int  # failed attempts in a row before a target cools down
    cooldown_time: float  # seconds a cooling target is skipped
    retry_body_limit: int  # request bodies up to this many bytes are kept, to be sent again


def read_targets(
    reader: FieldReader, entry: dict[str, Any], where: str, headers: tuple[tuple[str, str], ...]
) -> tuple[tuple[Target, ...], Retries]:
    """The entry's targets (its `target` as a list of one, or its `targets`) with the route's `headers` merged in,
    and its retry policy."""
    single, several = entry.get("target"), entry.get("targets")
    if single not in (None, "") and several is not None:
        raise reader.error(f"{where}.targets", "cannot be given together with target: use one of them")
    if single not in (None, ""):
        url, shown = read_url(reader, single, f"{where}.target")
        targets: tuple[Target, ...] = (Target(_default_name(shown, "target"), url, shown, headers, 1.0, 1),)
    elif several is None:
        raise reader.error(f"{where}.target", "is required (or targets: a list of one or more)")
    elif not isinstance(several, list) or not several:
        raise reader.error(f"{where}.targets", f"must be a non-empty list of targets with a url, not {kind(several)}")
    else:
        targets = tuple(_target(reader, item, f"{where}.targets[{i}]", i, headers) for i, item in enumerate(several))
    named: dict[str, int] = {}
    for i, target in enumerate(targets):
        if target.name in named:
            raise reader.error(f"{where}.targets[{i}].name", f"{target.name!r} is already the name of "
                               f"targets[{named[target.name]}]: give each target a name of its own")  # fmt: skip
        named[target.name] = i
    return targets, _retries(reader, entry, where, len(targets))


def _retries(reader: FieldReader, entry: dict[str, Any], where: str, targets: int) -> Retries:
    def field(key: str, default: Any) -> tuple[Any, str]:
        return entry.get(key, default), f"{where}.{key}"

    statuses, retry_on = field("retry_on", DEFAULT_RETRY_ON)
    if not isinstance(statuses, list | tuple):
        raise reader.error(retry_on, f"must be a list of HTTP statuses such as [429, 503], not {kind(statuses)}")
    for status in statuses:
        if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
            shown = status if type(status) is int else kind(status)
            raise reader.error(retry_on, f"{shown} is not an HTTP error status (400 to 599)")
    return Retries(
        num_retries=reader.integer(*field("num_retries", targets - 1)),
        retry_on=frozenset(statuses),
        allowed_fails=reader.integer(*field("allowed_fails", DEFAULT_ALLOWED_FAILS), least=1),
        cooldown_time=reader.number(*field("cooldown_time", DEFAULT_COOLDOWN_TIME)),
        retry_body_limit=reader.integer(*field("retry_body_limit", DEFAULT_RETRY_BODY_LIMIT)),
    )


def _target(
    reader: FieldReader, item: Any, where: str, index: int, route_headers: tuple[tuple[str, str], ...]
) -> Target:
    if not isinstance(item, dict):
        raise reader.error(where, f"must be a mapping with a url, not {kind(item)}")
    reader.known(item, TARGET_FIELDS, where)
    if item.get("url") in (None, ""):
        raise reader.error(f"{where}.url", "is required")
    url, shown = read_url(reader, item["url"], f"{where}.url")
    own = read_headers(reader, item, where)
    overridden = {name.lower() for name, _ in own}
    headers = (*((name, value) for name, value in route_headers if name.lower() not in overridden), *own)
    name = item.get("name")
    if name is None:
        name = _default_name(shown, f"targets[{index}]")
    elif not isinstance(name, str) or not TARGET_NAME.fullmatch(name):
        raise reader.error(f"{where}.name", "must be 1 to 64 letters, digits or ._:@+=[]- (it is shown in logs "
                           f"and metrics), not {kind(name)}")  # fmt: skip
    weight = reader.number(item.get("weight", 1), f"{where}.weight", positive=True)
    order = reader.integer(item.get("order", 1), f"{where}.order", least=1)
    return Target(name, url, shown, headers, weight, order)


def _default_name(shown: str, position: str) -> str:
    """The URL's host[:port], as the config wrote it; its position when the host comes from the environment (a
    secret never becomes a label)."""
    host = urlsplit(shown).netloc.lower()
    return host if TARGET_NAME.fullmatch(host) else position


def read_url(reader: FieldReader, value: Any, field: str) -> tuple[str, str]:
    """An http(s) URL with a host and no credentials or fragment, and the same with its environment parts masked."""
    target, shown = reader.resolve(value, field)
    try:
        parts = urlsplit(target)
        port = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        raise reader.error(field, "is not a valid URL") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise reader.error(field, "must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise reader.error(field, "must not carry user:password@; send credentials with headers: Authorization")
    if parts.fragment or target.endswith("#"):
        raise reader.error(field, "must not have a #fragment")
    if any(c.isspace() for c in target) or (port is not None and port == 0):
        raise reader.error(field, "is not a valid URL")
    return target, shown


def read_headers(reader: FieldReader, entry: dict[str, Any], where: str) -> tuple[tuple[str, str], ...]:
    """An entry's `headers`: valid names, each once; the two LANGFUSE_* keys become one Basic Authorization."""
    pairs = reader.mapping(entry, "headers", where, secret=True)
    seen: set[str] = set()
    for name, _ in pairs:
        if not HEADER_NAME.fullmatch(name):
            raise reader.error(f"{where}.headers.{name}", "is not a valid HTTP header name")
        if name.lower() in seen:
            raise reader.error(f"{where}.headers.{name}", "is given twice (header names ignore case)")
        seen.add(name.lower())
    langfuse = {name.lower(): value for name, value in pairs if name.lower() in LANGFUSE_HEADERS}
    if not langfuse:
        return tuple(pairs)
    # LiteLLM's Langfuse tutorial: the two keys become one Basic credential, as Langfuse's API expects.
    if len(langfuse) == 1:
        (name,) = langfuse
        raise reader.error(f"{where}.headers.{name.upper()}", "needs LANGFUSE_PUBLIC_KEY and LANGFUSE_SECRET_KEY both")
    if "authorization" in seen:
        raise reader.error(f"{where}.headers.Authorization", "cannot be set together with the LANGFUSE_* keys")
    token = base64.b64encode(f"{langfuse['langfuse_public_key']}:{langfuse['langfuse_secret_key']}".encode()).decode()
    reader.secrets.update((token, f"Basic {token}"))
    reader.from_environment.add(f"Basic {token}")
    kept = [(name, value) for name, value in pairs if name.lower() not in LANGFUSE_HEADERS]
    return (*kept, ("Authorization", f"Basic {token}"))
