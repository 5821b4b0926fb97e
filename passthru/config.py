"""LiteLLM's config.yaml → frozen Settings, with every problem found here, at start-up.

Field names are LiteLLM's own (`general_settings.pass_through_endpoints[i].include_subpath`), so one file runs in
both. Unlike LiteLLM, nothing is skipped or defaulted silently: a problem raises ConfigError naming the file, the
entry and the field, and never quotes a secret.
"""

from __future__ import annotations

import base64
import difflib
import os
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, replace
from typing import IO, Any
from urllib.parse import unquote, urlsplit

import yaml

from passthru.errors import ConfigError

ALL_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
DEFAULT_TIMEOUT = 600.0
ENV_REF = re.compile(r"os\.environ/([A-Za-z_][A-Za-z0-9_]*)")
# RFC 9110 token characters: a header name that is anything else cannot be sent.
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# A route path: segments of URL-safe characters; no werkzeug converters (<...>), no query, no dot segments.
ROUTE_PATH = re.compile(r"^(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+/?$|^/$")
LANGFUSE_HEADERS = ("langfuse_public_key", "langfuse_secret_key")
# Where a server finds its config (load_from_environment): the YAML itself wins over a file path.
CONFIG_YAML_VARIABLE = "PASSTHRU_CONFIG_YAML"
CONFIG_FILE_VARIABLE = "PASSTHRU_CONFIG"
# Set by the gunicorn master for its workers (accept_from_environment): the config text it last accepted.
ACCEPTED_TEXT = "_PASSTHRU_ACCEPTED_CONFIG"
ACCEPTED_SOURCE = "_PASSTHRU_ACCEPTED_SOURCE"

ENDPOINT_FIELDS = (
    "path", "target", "headers", "auth", "forward_headers", "include_subpath", "methods", "timeout",
    "default_query_params", "cost_per_request",
)  # fmt: skip
GENERAL_FIELDS = ("master_key", "pass_through_endpoints", "metrics_require_auth", "database_url")  # passthru's keys
# passthru's own routes: a pass-through path may not take them (it would shadow them or be shadowed).
BUILT_IN_PATHS = ("/health", "/health/liveliness", "/health/readiness", "/metrics")
# Served by key_api.py whenever master_key is set (LiteLLM's paths); a pass-through route may not cover them.
KEY_API_PATHS = ("/key/generate", "/key/info", "/key/update", "/key/delete", "/key/list", "/key/block",
                 "/key/unblock", "/spend/logs")  # fmt: skip
# The key store when master_key is set and neither database_url nor DATABASE_URL names one: a file in the working
# directory, as LiteLLM users expect one `passthru` on one host to work without a database server.
DEFAULT_DATABASE_URL = "sqlite:///passthru.db"
# A database URL as SQLAlchemy reads one (the pattern of sqlalchemy.engine.url._parse_url), so that what passes here is
# what the key store's engine opens. Not make_url itself: importing SQLAlchemy would cost the gunicorn master, which
# checks the config, and every worker forked from it 14 MB and 0.15 s.
DATABASE_URL = re.compile(
    r"""
        (?P<name>[\w\+]+)://
        (?:
            (?P<username>[^:/]*)
            (?::(?P<password>[^@]*))?
        @)?
        (?:
            (?:
                \[(?P<ipv6host>[^/\?]+)\] |
                (?P<ipv4host>[^/:\?]+)
            )?
            (?::(?P<port>[^/\?]*))?
        )?
        (?:/(?P<database>[^\?]*))?
        (?:\?(?P<query>.*))?
    """,
    re.X,
)


@dataclass(frozen=True)
class Endpoint:
    """One pass-through route, ready to serve: every value checked, every os.environ/ reference resolved."""

    index: int
    path: str  # the route on passthru, without a trailing slash (except "/")
    target: str  # the upstream URL, query included, as the forwarder uses it
    target_shown: str  # the same URL with environment-derived parts masked, for logs and `passthru check`
    headers: tuple[tuple[str, str], ...]  # sent upstream on every call, overriding the caller's
    auth: bool
    forward_headers: bool
    include_subpath: bool
    methods: tuple[str, ...]
    timeout: float
    default_query_params: tuple[tuple[str, str], ...]
    cost_per_request: float


@dataclass(frozen=True)
class Settings:
    """The whole validated config: what the app serves and which values must never be shown."""

    source: str
    master_key: str | None
    endpoints: tuple[Endpoint, ...]
    metrics_require_auth: bool
    secrets: frozenset[str]  # every value a log line or an answer must mask
    warnings: tuple[str, ...]  # said at start-up: routes that hand environment secrets to anyone
    # The key store's SQLAlchemy URL, set exactly when master_key is (virtual keys are administered with it).
    database_url: str | None = None
    database_shown: str | None = None  # the same URL with its password masked, for logs and `passthru check`


def load_from_environment(environ: Mapping[str, str] | None = None) -> Settings:
    """The config a server process runs: the one its gunicorn master accepted, else read from the environment.

    Reading: $PASSTHRU_CONFIG_YAML's text if set (for platforms without a writable disk; errors then name
    `$PASSTHRU_CONFIG_YAML` where they would name the file), else the file $PASSTHRU_CONFIG, else config.yaml.
    """
    environ = os.environ if environ is None else environ
    if ACCEPTED_TEXT in environ:
        source = environ.get(ACCEPTED_SOURCE, "config")
        return parse_settings(_parse_yaml(environ[ACCEPTED_TEXT], source), source, environ)
    return _parse_source(*_read_source(environ), environ)


def accept_from_environment(environ: MutableMapping[str, str]) -> Settings:
    """For the gunicorn master, at start and on each reload: read and check the config, then hand it to workers.

    Workers load what was accepted (through two private variables they inherit), so a config broken by an edit
    is refused at reload and the previous one keeps serving; a valid one is what every new worker runs.
    """
    source, text = _read_source(environ)
    settings = _parse_source(source, text, environ)
    environ[ACCEPTED_SOURCE] = source
    environ[ACCEPTED_TEXT] = text
    return settings


def _read_source(environ: Mapping[str, str]) -> tuple[str, str]:
    """(name for messages, YAML text) of the config the environment points at."""
    text = environ.get(CONFIG_YAML_VARIABLE, "")
    if text.strip():  # set to "" (or blanks) reads as unset: some platforms cannot delete a variable
        return f"${CONFIG_YAML_VARIABLE}", text
    path = environ.get(CONFIG_FILE_VARIABLE) or "config.yaml"
    return path, _read_file(path)


def _read_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: the config file is not UTF-8 text") from exc


def _parse_source(source: str, text: str, environ: Mapping[str, str]) -> Settings:
    settings = parse_settings(_parse_yaml(text, source), source, environ)
    if source.startswith("$") and environ.get(CONFIG_FILE_VARIABLE):
        ignored = f"{source} is set, so ${CONFIG_FILE_VARIABLE} ({environ[CONFIG_FILE_VARIABLE]}) is not read"
        settings = replace(settings, warnings=(ignored, *settings.warnings))
    return settings


def load_settings(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate a config file; raise ConfigError naming the file, the entry and the field."""
    source = os.fspath(path)
    environ = os.environ if environ is None else environ
    return _parse_source(source, _read_file(source), environ)


def _parse_yaml(document: str | IO[str], source: str) -> Any:
    try:
        return yaml.safe_load(document)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from exc


def parse_settings(raw: Any, source: str, environ: Mapping[str, str]) -> Settings:
    """Validate an already-parsed config document (the part of load_settings that needs no file)."""
    reader = _Reader(source, environ)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise reader.error("", "the file must be a mapping with a general_settings section")
    general = raw.get("general_settings") or {}
    if not isinstance(general, dict):
        raise reader.error("general_settings", "must be a mapping")
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
    built_in = BUILT_IN_PATHS + (KEY_API_PATHS if master_key is not None else ())
    seen: dict[str, int] = {}
    for ep in endpoints:
        clash = next((path for path in built_in if _serves(ep, path)), None)
        if clash:
            raise reader.error(f"{_where(ep.index, ep.path)}.path", f"clashes with passthru's built-in route {clash}")
        if ep.path in seen:
            where = _where(ep.index, ep.path)
            raise reader.error(f"{where}.path", f"duplicates the path of entry [{seen[ep.path]}]")
        seen[ep.path] = ep.index
        if ep.auth and master_key is None:
            raise reader.error(
                f"{_where(ep.index, ep.path)}.auth", "is true but general_settings.master_key is not set"
            )
    warnings = [
        f"{source}: route {ep.path} injects secrets from the environment and has auth: false; "
        "anyone who can reach passthru can use them"
        for ep in endpoints
        if not ep.auth and any(value in reader.from_environment for _, value in ep.headers)
    ]
    database_url = database_shown = None
    if master_key is not None:
        database_url, database_shown = _database_url(reader, general.get("database_url"), environ)
    elif general.get("database_url") is not None:
        warnings.append(f"{source}: general_settings.database_url is set but master_key is not; the key store is "
                        "only used for virtual keys, which need the master key")  # fmt: skip
    return Settings(
        source,
        master_key,
        endpoints,
        metrics_require_auth,
        frozenset(reader.secrets),
        tuple(warnings),
        database_url,
        database_shown,
    )


def _serves(endpoint: Endpoint, path: str) -> bool:
    """Whether a request for `path` would reach this endpoint's rules."""
    if endpoint.path == path:
        return True
    return endpoint.include_subpath and path.startswith(endpoint.path.rstrip("/") + "/")


def _database_url(reader: _Reader, value: Any, environ: Mapping[str, str]) -> tuple[str, str]:
    """The store's URL from general_settings.database_url, else $DATABASE_URL (LiteLLM's), else ./passthru.db."""
    if value is not None:
        field = "general_settings.database_url"
        text = reader.string(value, field, secret=True)
    elif environ.get("DATABASE_URL"):
        field = "DATABASE_URL (environment)"
        text = environ["DATABASE_URL"]
        reader.secrets.add(text)
    else:
        return DEFAULT_DATABASE_URL, DEFAULT_DATABASE_URL
    url = DATABASE_URL.match(text)
    port = url.group("port") if url else None
    if url is None or (port is not None and not re.fullmatch("[0-9]+", port)):
        raise reader.error(field, "is not a database URL such as postgresql://user:pass@host/db")
    password = url.group("password")
    if password:
        reader.secrets.add(unquote(password))
    scheme = _scheme(reader, field, url.group("name"), url.group("database"))
    start, end = url.span("password")  # (-1, -1) without one; shown as *** like SQLAlchemy's hide_password
    shown = text if start < 0 else text[:start] + "***" + text[end:]
    # Only the scheme changes; the rest stays as written, for SQLAlchemy to read where the store is opened.
    return scheme + text[url.end("name") :], scheme + shown[url.end("name") :]


def _scheme(reader: _Reader, field: str, name: str, database: str | None) -> str:
    """The SQLAlchemy scheme (dialect+driver) the store is opened with."""
    backend, _, driver = name.partition("+")
    if backend in ("postgresql", "postgres"):
        # LiteLLM's DATABASE_URL is Prisma's postgresql://; psycopg 3 is the driver passthru ships with.
        if driver not in ("", "psycopg"):
            raise reader.error(field, f"uses the driver {driver!r}; passthru ships psycopg (postgresql+psycopg://)")
        return "postgresql+psycopg"
    if backend == "sqlite":
        if driver not in ("", "pysqlite"):
            raise reader.error(field, f"uses the driver {driver!r}; write sqlite:///path/to/file.db")
        database = unquote(database or "")
        if not database or database == ":memory:" or database.startswith("file:"):
            # Every worker and every pooled connection must see the same keys: only a file is shared.
            raise reader.error(field, "must name a file (sqlite:///passthru.db), not an in-memory database")
        return name
    raise reader.error(field, f"uses {backend!r}; passthru stores keys in sqlite:///file.db or postgresql://")


def _where(index: int, path: str | None) -> str:
    label = f"general_settings.pass_through_endpoints[{index}]"
    return f"{label} ({path})" if path else label


class _Reader:
    """Field checks that know the file name (for messages) and collect every secret they resolve."""

    def __init__(self, source: str, environ: Mapping[str, str]) -> None:
        self.source = source
        self.environ = environ
        self.secrets: set[str] = set()
        self.from_environment: set[str] = set()  # whole values that an os.environ/ reference went into

    def error(self, field: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: {field}: {problem}" if field else f"{self.source}: {problem}")

    def string(self, value: Any, field: str, *, secret: bool = False) -> str:
        """A string with os.environ/NAME resolved; `secret` marks the whole value as one to mask."""
        return self.resolve(value, field, secret=secret)[0]

    def resolve(self, value: Any, field: str, *, secret: bool = False) -> tuple[str, str]:
        """(value, shown): the string with os.environ/NAME resolved, and with each resolved part masked."""
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self.error(field, f"must be a string, not {_kind(value)}")
        text = str(value)
        missing = [name for name in ENV_REF.findall(text) if name not in self.environ]
        if missing:
            raise self.error(field, f"environment variable {missing[0]} is not set")

        def sub(match: re.Match[str]) -> str:
            resolved = self.environ[match.group(1)]
            if resolved:
                self.secrets.add(resolved)
            return resolved

        resolved = ENV_REF.sub(sub, text)
        if resolved != text:
            self.from_environment.add(resolved)
        # A literal value is masked too when it is long enough to be a credential; masking a short one such as
        # "1" would mangle every log line, and header values are never logged in the first place.
        if secret and (resolved != text or len(resolved) >= 8):
            self.secrets.add(resolved)
        return resolved, ENV_REF.sub("***", text)

    def boolean(self, entry: Mapping[str, Any], key: str, where: str) -> bool:
        value = entry.get(key, False)
        if not isinstance(value, bool):
            hint = " (write true or false without quotes)" if isinstance(value, str) else ""
            raise self.error(f"{where}.{key}", f"must be true or false, not {_kind(value)}{hint}")
        return value

    def mapping(self, entry: dict[str, Any], key: str, where: str, *, secret: bool) -> list[tuple[str, str]]:
        value = entry.get(key) or {}
        if not isinstance(value, dict):
            raise self.error(f"{where}.{key}", f"must be a mapping of names to values, not {_kind(value)}")
        pairs = []
        for name, item in value.items():
            field = f"{where}.{key}.{name}"
            if not isinstance(name, str) or not name:
                raise self.error(f"{where}.{key}", f"has a name that is not a string: {name!r}")
            text = self.string(item, field, secret=secret)
            if "\r" in text or "\n" in text or "\0" in text:
                raise self.error(field, "must not contain line breaks or NUL")
            pairs.append((name, text))
        return pairs


def _kind(value: Any) -> str:
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return f"the string {value!r}" if len(value) <= 20 else "a string"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _endpoint(reader: _Reader, index: int, entry: Any) -> Endpoint:
    if not isinstance(entry, dict):
        raise reader.error(_where(index, None), f"must be a mapping with path and target, not {_kind(entry)}")
    raw_path = entry.get("path")
    where = _where(index, raw_path if isinstance(raw_path, str) else None)
    for key in entry:
        if key not in ENDPOINT_FIELDS:
            close = difflib.get_close_matches(str(key), ENDPOINT_FIELDS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (known fields: {', '.join(ENDPOINT_FIELDS)})"
            raise reader.error(f"{where}.{key}", f"unknown field{hint}")
    for key in ("path", "target"):
        if entry.get(key) in (None, ""):
            raise reader.error(f"{where}.{key}", "is required")
    path = _route_path(reader, entry["path"], f"{where}.path")
    target, target_shown = _target(reader, entry["target"], f"{where}.target")
    headers = _headers(reader, entry, where)
    methods = _methods(reader, entry.get("methods"), f"{where}.methods")
    return Endpoint(
        index=index,
        path=path,
        target=target,
        target_shown=target_shown,
        headers=headers,
        auth=reader.boolean(entry, "auth", where),
        forward_headers=reader.boolean(entry, "forward_headers", where),
        include_subpath=reader.boolean(entry, "include_subpath", where),
        methods=methods,
        timeout=_number(reader, entry.get("timeout", DEFAULT_TIMEOUT), f"{where}.timeout", positive=True),
        default_query_params=tuple(reader.mapping(entry, "default_query_params", where, secret=False)),
        cost_per_request=_number(reader, entry.get("cost_per_request", 0), f"{where}.cost_per_request"),
    )


def _route_path(reader: _Reader, value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise reader.error(field, f"must be a string starting with /, not {_kind(value)}")
    if not value.startswith("/"):
        raise reader.error(field, "must start with /")
    if "//" in value or not ROUTE_PATH.match(value):
        raise reader.error(field, "must be a plain URL path: letters, digits and -._~!$&'()*+,;=:@% between slashes")
    if any(segment in (".", "..") for segment in value.split("/")):
        raise reader.error(field, "must not contain . or .. segments")
    return value.rstrip("/") or "/"


def _target(reader: _Reader, value: Any, field: str) -> tuple[str, str]:
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


def _headers(reader: _Reader, entry: dict[str, Any], where: str) -> tuple[tuple[str, str], ...]:
    pairs = reader.mapping(entry, "headers", where, secret=True)
    seen: set[str] = set()
    for name, _ in pairs:
        if not HEADER_NAME.match(name):
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


def _methods(reader: _Reader, value: Any, field: str) -> tuple[str, ...]:
    if value is None:
        return ALL_METHODS
    if not isinstance(value, list) or not value:
        raise reader.error(field, f"must be a non-empty list such as [GET, POST], not {_kind(value)}")
    methods = []
    for item in value:
        if not isinstance(item, str) or item.upper() not in ALL_METHODS:
            raise reader.error(field, f"{item!r} is not one of {', '.join(ALL_METHODS)}")
        if item.upper() not in methods:
            methods.append(item.upper())
    return tuple(methods)


def _number(reader: _Reader, value: Any, field: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise reader.error(field, f"must be a number, not {_kind(value)}")
    if value < 0 or (positive and value == 0) or value != value or value == float("inf"):
        raise reader.error(field, "must be a positive number" if positive else "must be zero or more")
    return float(value)
