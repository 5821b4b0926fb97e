"""LiteLLM's config.yaml → frozen Settings, with every problem found here, at start-up.

Field names are LiteLLM's own (`general_settings.pass_through_endpoints[i].include_subpath`), so one file runs in
both. Unlike LiteLLM, nothing is skipped or defaulted silently: a problem raises ConfigError naming the file, the
entry and the field, and never quotes a secret. Here: the document, general_settings and each endpoint entry; one field
at a time in config_fields.py, the key store's URL in keystore/url.py, the server's environment in server_config.py.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import unquote

import yaml

from passthru.config_fields import FieldReader, kind
from passthru.config_limits import LIMIT_FIELDS, RouteLimits, read_limits
from passthru.config_targets import RETRY_FIELDS, Retries, Target, read_headers, read_targets
from passthru.errors import ConfigError
from passthru.keystore.url import read_database_url
from passthru.otel_settings import OtelSettings, read_otel
from passthru.paths import DOTS, FORBIDDEN, loose
from passthru.pricing import PRICE_FIELDS, Prices, read_model_prices, read_prices

ALL_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
DEFAULT_TIMEOUT = 600.0
# A route path: segments of URL-safe characters; no werkzeug converters (<...>), no query, no dot segments.
ROUTE_PATH = re.compile(r"^(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+/?$|^/$")
ENDPOINT_FIELDS = (
    "path", "target", "headers", "auth", "forward_headers", "include_subpath", "methods", "timeout",
    "default_query_params", "cost_per_request", *PRICE_FIELDS, *RETRY_FIELDS, *LIMIT_FIELDS,
)  # fmt: skip
GENERAL_FIELDS = ("master_key", "pass_through_endpoints", "metrics_require_auth", "database_url", "model_prices",
                  "disable_spend_logs", "otel")  # fmt: skip
# passthru's own routes: a pass-through path may not take them (it would shadow them or be shadowed).
BUILT_IN_PATHS = ("/health", "/health/liveliness", "/health/readiness", "/metrics")
# Served by key_api.py whenever master_key is set (LiteLLM's paths); a pass-through route may not cover them.
KEY_API_PATHS = ("/key/generate", "/key/info", "/key/update", "/key/delete", "/key/list", "/key/block",
                 "/key/unblock", "/spend/logs", "/global/spend/report")  # fmt: skip
UI_PATH = "/ui"  # the admin page (ui/), with master_key: a pass-through route may not cover it or any path below it


@dataclass(frozen=True)
class Endpoint:
    """One pass-through route, ready to serve: every value checked, every os.environ/ reference resolved."""

    index: int
    path: str  # the route on passthru, without a trailing slash (except "/")
    targets: tuple[Target, ...]  # where its calls go: its `target` as a list of one, or its `targets`
    retries: Retries  # how calls move across them (config_targets.py)
    headers: tuple[tuple[str, str], ...]  # the route's own, sent upstream on every call; each target's merge in
    auth: bool
    forward_headers: bool
    include_subpath: bool
    methods: tuple[str, ...]
    timeout: float
    default_query_params: tuple[tuple[str, str], ...]
    cost_per_request: float
    prices: Prices  # the route's own per-token prices (pricing.py)
    limits: RouteLimits = RouteLimits()  # its rpm_limit and max_parallel_requests (config_limits.py)


@dataclass(frozen=True)
class Settings:
    """The whole validated config: what the app serves and which values must never be shown."""

    source: str
    master_key: str | None
    endpoints: tuple[Endpoint, ...]
    metrics_require_auth: bool
    secrets: frozenset[str]  # every value a log line or an answer must mask
    warnings: tuple[str, ...]  # said at start-up: routes that hand environment secrets to anyone
    # The key store's SQLAlchemy URL, set when master_key is (virtual keys) or a route has an rpm_limit (its counts).
    database_url: str | None = None
    database_shown: str | None = None  # the same URL with its password masked, for logs and `passthru check`
    model_prices: Mapping[str, Prices] = field(default_factory=dict)  # general_settings.model_prices
    disable_spend_logs: bool = False  # LiteLLM's: keys are still charged, no spend log entry is written
    otel: OtelSettings | None = None  # span export (general_settings.otel and OTEL_*): None when off


def load_settings(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate a config file; raise ConfigError naming the file, the entry and the field."""
    source = os.fspath(path)
    environ = os.environ if environ is None else environ
    return parse_settings(parse_yaml(read_file(source), source), source, environ)


def read_file(path: str) -> str:
    """The config file's text; ConfigError naming the file when it cannot be read as UTF-8."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: the config file is not UTF-8 text") from exc


def parse_yaml(document: str | IO[str], source: str) -> Any:
    """The YAML document as Python data; ConfigError naming the line and column of a syntax error."""
    try:
        return yaml.safe_load(document)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from exc


def parse_settings(raw: Any, source: str, environ: Mapping[str, str]) -> Settings:
    """Validate an already-parsed config document (the part of load_settings that needs no file)."""
    reader = FieldReader(source, environ)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise reader.error("", "the file must be a mapping with a general_settings section")
    general = raw.get("general_settings") or {}
    if not isinstance(general, dict):
        raise reader.error("general_settings", "must be a mapping")
    # A passthru field one level too high would be ignored with every other top-level key: no routes, no key.
    for key in raw:
        if key in GENERAL_FIELDS:
            raise reader.error(str(key), "belongs under general_settings (as in LiteLLM's config.yaml)")
    # Other LiteLLM sections (model_list, litellm_settings, ...) and general_settings keys are LiteLLM's business:
    # the same file runs in both, so passthru reads only the keys it serves.
    for key in general:
        close = difflib.get_close_matches(str(key), GENERAL_FIELDS, n=1, cutoff=0.8)
        if key not in GENERAL_FIELDS and close:
            raise reader.error(f"general_settings.{key}", f"unknown field (did you mean {close[0]}?)")
    master_key = None
    if general.get("master_key") is not None:
        master_key = reader.string(general["master_key"], "general_settings.master_key")
        if not master_key:
            raise reader.error("general_settings.master_key", "must not be empty")
        reader.secrets.add(master_key)
    entries = general.get("pass_through_endpoints") or []
    if not isinstance(entries, list):
        raise reader.error("general_settings.pass_through_endpoints", "must be a list of entries")
    endpoints = tuple(_endpoint(reader, i, entry) for i, entry in enumerate(entries))
    metrics_require_auth = reader.boolean(general, "metrics_require_auth", "general_settings")
    if metrics_require_auth and master_key is None:
        raise reader.error("general_settings.metrics_require_auth", "is true but master_key is not set")
    # The key API is served only with a master key; the health and metrics paths always.
    built_in = BUILT_IN_PATHS + (KEY_API_PATHS + (UI_PATH,) if master_key is not None else ())
    seen: dict[str, int] = {}
    for ep in endpoints:
        clash = next((p for p in built_in if _serves(ep, p) or p == UI_PATH and ep.path.startswith(p + "/")), None)
        if clash:
            raise reader.error(f"{_where(ep.index, ep.path)}.path", f"clashes with passthru's built-in route {clash}")
        # Paths that one request could name in two spellings (letter case, escapes, ;parameters) are one path.
        same = "/".join(loose(unquote(segment)) for segment in ep.path.split("/"))
        if same in seen:
            where = _where(ep.index, ep.path)
            raise reader.error(f"{where}.path", f"duplicates the path of entry [{seen[same]}]")
        seen[same] = ep.index
        if ep.auth and master_key is None:
            raise reader.error(
                f"{_where(ep.index, ep.path)}.auth", "is true but general_settings.master_key is not set"
            )
    warnings = [
        f"{source}: route {ep.path} injects secrets from the environment and has auth: false; "
        "anyone who can reach passthru can use them"
        for ep in endpoints
        if not ep.auth and any(value in reader.from_environment for target in ep.targets for _, value in target.headers)
    ]
    database_url = database_shown = None
    if master_key is not None or any(ep.limits.rpm_limit for ep in endpoints):
        database_url, database_shown = read_database_url(reader, general.get("database_url"), environ)
    elif general.get("database_url") is not None:
        warnings.append(f"{source}: general_settings.database_url is set but unused: the key store holds virtual keys "
                        "(which need master_key) and routes' rpm_limit counts, and there are neither")  # fmt: skip
    model_prices = read_model_prices(reader, general.get("model_prices"))
    otel = read_otel(reader, general.get("otel"), environ)
    disable_spend_logs = reader.boolean(general, "disable_spend_logs", "general_settings")
    return Settings(source, master_key, endpoints, metrics_require_auth, frozenset(reader.secrets), tuple(warnings),
                    database_url, database_shown, model_prices, disable_spend_logs, otel)  # fmt: skip


def _serves(endpoint: Endpoint, path: str) -> bool:
    """Whether a request for `path` would reach this endpoint's rules."""
    return endpoint.path == path or endpoint.include_subpath and path.startswith(endpoint.path.rstrip("/") + "/")


def _where(index: int, path: str | None) -> str:
    label = f"general_settings.pass_through_endpoints[{index}]"
    return f"{label} ({path})" if path else label


def _endpoint(reader: FieldReader, index: int, entry: Any) -> Endpoint:
    if not isinstance(entry, dict):
        raise reader.error(_where(index, None), f"must be a mapping with path and target, not {kind(entry)}")
    raw_path = entry.get("path")
    where = _where(index, raw_path if isinstance(raw_path, str) else None)
    reader.known(entry, ENDPOINT_FIELDS, where)
    if entry.get("path") in (None, ""):
        raise reader.error(f"{where}.path", "is required")
    path = _route_path(reader, entry["path"], f"{where}.path")
    headers = read_headers(reader, entry, where)
    targets, retries = read_targets(reader, entry, where, headers)
    methods = _methods(reader, entry.get("methods"), f"{where}.methods")
    return Endpoint(
        index=index,
        path=path,
        targets=targets,
        retries=retries,
        headers=headers,
        auth=reader.boolean(entry, "auth", where),
        forward_headers=reader.boolean(entry, "forward_headers", where),
        include_subpath=reader.boolean(entry, "include_subpath", where),
        methods=methods,
        timeout=reader.number(entry.get("timeout", DEFAULT_TIMEOUT), f"{where}.timeout", positive=True),
        default_query_params=tuple(reader.mapping(entry, "default_query_params", where, secret=False)),
        cost_per_request=reader.number(entry.get("cost_per_request", 0), f"{where}.cost_per_request"),
        prices=read_prices(reader, entry, where),
        limits=read_limits(reader, entry, where),
    )


def _route_path(reader: FieldReader, value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise reader.error(field, f"must be a string starting with /, not {kind(value)}")
    if not value.startswith("/"):
        raise reader.error(field, "must start with /")
    if "//" in value or not ROUTE_PATH.match(value):
        raise reader.error(field, "must be a plain URL path: letters, digits and -._~!$&'()*+,;=:@% between slashes")
    if any(unquote(segment) in DOTS for segment in value.split("/")):
        raise reader.error(field, "must not contain . or .. segments")
    if any(FORBIDDEN.search(unquote(segment)) for segment in value.split("/")):
        raise reader.error(field, "must not hide a slash, backslash or control character in an escape")
    return value.rstrip("/") or "/"


def _methods(reader: FieldReader, value: Any, field: str) -> tuple[str, ...]:
    if value is None:
        return ALL_METHODS
    if not isinstance(value, list) or not value:
        raise reader.error(field, f"must be a non-empty list such as [GET, POST], not {kind(value)}")
    methods = []
    for item in value:
        if not isinstance(item, str) or item.upper() not in ALL_METHODS:
            raise reader.error(field, f"{item!r} is not one of {', '.join(ALL_METHODS)}")
        if item.upper() not in methods:
            methods.append(item.upper())
    return tuple(methods)
