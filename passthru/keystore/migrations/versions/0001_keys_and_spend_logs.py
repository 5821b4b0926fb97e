"""Virtual keys and their spend log.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# A migration is a snapshot: it spells the tables out rather than importing keystore/schema.py, which will change.
_JSON = sa.JSON(none_as_null=True)


def upgrade() -> None:
    op.create_table(
        "passthru_keys",
        sa.Column("token", sa.String(64), primary_key=True),
        sa.Column("key_name", sa.String(16), nullable=False),
        sa.Column("key_alias", sa.String(255), unique=True),
        sa.Column("created_at", sa.Double, nullable=False),
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
    op.create_table(
        "passthru_spend_logs",
        sa.Column("request_id", sa.String(36), primary_key=True),
        sa.Column("token", sa.String(64), nullable=False),
        sa.Column("route", sa.Text, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("spend", sa.Double, nullable=False),
        sa.Column("start_time", sa.Double, nullable=False),
        sa.Column("duration", sa.Double, nullable=False),
    )
    op.create_index("ix_passthru_spend_logs_token_start", "passthru_spend_logs", ["token", "start_time"])
    op.create_index("ix_passthru_spend_logs_start", "passthru_spend_logs", ["start_time"])


def downgrade() -> None:
    op.drop_table("passthru_spend_logs")
    op.drop_table("passthru_keys")
