"""The key store's schema: SQLAlchemy Core tables (keys, the spend log, routes' rpm windows) and the store's clock.
The migrations' target."""

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
    sa.Column("tpm_limit", sa.Integer),
    sa.Column("budget_duration", sa.String(16)),  # LiteLLM's "30d", "1mo" (budget.py)
    sa.Column("budget_reset_at", sa.Double),  # when spend next goes back to 0, on the store's clock
    # The tpm window, counted when answers end (SpendWriter): its start, and the tokens in it so far.
    sa.Column("token_window_start", sa.Double, nullable=False, server_default=sa.text("0")),
    sa.Column("token_window_count", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    sa.Column("prompt_tokens", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    sa.Column("completion_tokens", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    sa.Column("total_tokens", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    # LiteLLM's: calls of the key in flight at once, on each host (limits.py; not counted here).
    sa.Column("max_parallel_requests", sa.Integer),
    sa.Index("ix_passthru_keys_created", "created_at", "token"),  # the key list's order, newest first
)
spend_logs = sa.Table(
    "passthru_spend_logs",
    metadata,
    # The entry's own id, a UUIDv7 (spend.entry_id): time-ordered, so the primary key grows at its end. Not the
    # call's id, which a caller may choose (call_id).
    sa.Column("request_id", sa.String(36), primary_key=True),
    # The key's token, kept after the key is deleted (the spend happened); the master key's hash for its calls;
    # NULL for a call on an open route.
    sa.Column("token", sa.String(64)),
    sa.Column("route", sa.Text, nullable=False),  # the configured pass-through path
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("spend", sa.Double, nullable=False),
    sa.Column("start_time", sa.Double, nullable=False),
    sa.Column("duration", sa.Double, nullable=False),  # seconds from the call's start to its body's end
    sa.Column("call_id", sa.String(128)),  # the id the caller got in x-request-id (its own, when it sent one)
    sa.Column("model", sa.Text),
    sa.Column("prompt_tokens", sa.BigInteger),  # NULL: the answer did not say (not 0)
    sa.Column("completion_tokens", sa.BigInteger),
    sa.Column("total_tokens", sa.BigInteger),
    sa.Column("target", sa.Text),  # the name of the upstream target that answered
    sa.Index("ix_passthru_spend_logs_token_start", "token", "start_time"),
    sa.Index("ix_passthru_spend_logs_start", "start_time"),
    sa.Index("ix_passthru_spend_logs_route_start", "route", "start_time"),  # the admin page's filters
    sa.Index("ix_passthru_spend_logs_status_start", "status", "start_time"),
)
# A route's rpm_limit window (windows.py), fixed as a key's: one row per configured route path, made by its first
# call, shared by every host that serves the path.
route_windows = sa.Table(
    "passthru_route_windows",
    metadata,
    sa.Column("route", sa.Text, primary_key=True),
    sa.Column("window_start", sa.Double, nullable=False, server_default=sa.text("0")),
    sa.Column("window_count", sa.Integer, nullable=False, server_default=sa.text("0")),
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
