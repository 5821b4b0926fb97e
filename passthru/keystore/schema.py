"""The key store's schema: two SQLAlchemy Core tables and the store's clock. The migrations' target."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

_JSON = sa.JSON(none_as_null=True)  # Python None is SQL NULL, not the JSON text 'null'

metadata = sa.MetaData()
keys = sa.Table(
    "passthru_keys",
    metadata,
    sa.Column("token", sa.String(64), primary_key=True),  # sha256 hex of the key (LiteLLM's "token"), never the key
    sa.Column("key_name", sa.String(16), nullable=False),  # "sk-...abcd": LiteLLM's hint of which key this is
    sa.Column("key_alias", sa.String(255), unique=True),
    sa.Column("created_at", sa.Double, nullable=False),  # seconds since the epoch, on the store's clock
    sa.Column("expires", sa.Double),
    sa.Column("blocked", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("max_budget", sa.Double),
    sa.Column("spend", sa.Double, nullable=False, server_default=sa.text("0")),
    sa.Column("rpm_limit", sa.Integer),
    sa.Column("allowed_routes", _JSON),
    sa.Column("metadata", _JSON),
    sa.Column("window_start", sa.Double, nullable=False, server_default=sa.text("0")),
    sa.Column("window_count", sa.Integer, nullable=False, server_default=sa.text("0")),
)
spend_logs = sa.Table(
    "passthru_spend_logs",
    metadata,
    sa.Column("request_id", sa.String(36), primary_key=True),
    sa.Column("token", sa.String(64), nullable=False),  # kept after the key is deleted: the spend happened
    sa.Column("route", sa.Text, nullable=False),  # the configured pass-through path
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("spend", sa.Double, nullable=False),
    sa.Column("start_time", sa.Double, nullable=False),
    sa.Column("duration", sa.Double, nullable=False),  # seconds from the call's start to its body's end
    sa.Index("ix_passthru_spend_logs_token_start", "token", "start_time"),
    sa.Index("ix_passthru_spend_logs_start", "start_time"),
)


class store_now(FunctionElement[float]):
    """Seconds since the epoch on the database's clock: hosts with skewed clocks still share one rpm window."""

    type = sa.Double()
    inherit_cache = True


@compiles(store_now, "sqlite")
def _now_sqlite(element: store_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "((julianday('now') - 2440587.5) * 86400.0)"  # 'now' is fixed for the whole statement


@compiles(store_now, "postgresql")
def _now_postgresql(element: store_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "CAST(EXTRACT(EPOCH FROM statement_timestamp()) AS DOUBLE PRECISION)"
