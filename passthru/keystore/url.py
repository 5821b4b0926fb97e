"""The key store's database URL: general_settings.database_url, else $DATABASE_URL, else a SQLite file; its shape
checked as SQLAlchemy reads it, without importing SQLAlchemy, and shown with its password masked."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from passthru.config_fields import FieldReader

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
# A password in the query: the parameter's name in any letter case, each letter maybe escaped (pass%77ord).
QUERY_PASSWORD = re.compile(
    "[?&]" + "".join(f"(?:{c}|%{ord(c):02x}|%{ord(c.upper()):02x})" for c in "password") + "=([^&#]*)", re.I
)


def read_database_url(reader: FieldReader, value: Any, environ: Mapping[str, str]) -> tuple[str, str]:
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
    for start, end in password_spans(text):
        if end > start:
            reader.secrets.update((text[start:end], unquote(text[start:end])))
    scheme = _scheme(reader, field, url.group("name"), url.group("database"))
    shown = masked(text)
    # Only the scheme changes; the rest stays as written, for SQLAlchemy to read where the store is opened.
    return scheme + text[url.end("name") :], scheme + shown[url.end("name") :]


def password_spans(text: str) -> list[tuple[int, int]]:
    """Where a database URL holds a password: `user:PASSWORD@`, and `?password=PASSWORD` (libpq's keyword, which
    psycopg and SQLAlchemy read in any letter case) in its query."""
    url = DATABASE_URL.match(text)
    if url is None:
        return []
    spans = [url.span("password")] if url.group("password") is not None else []
    if url.group("query"):
        spans += [match.span(1) for match in QUERY_PASSWORD.finditer(text, url.start("query") - 1)]
    return spans


def masked(text: str) -> str:
    """The URL with each password replaced by ***, for every output: logs, errors, `passthru check`, the CLI."""
    for start, end in sorted(password_spans(text), reverse=True):
        text = text[:start] + "***" + text[end:]
    return text


def _scheme(reader: FieldReader, field: str, name: str, database: str | None) -> str:
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
