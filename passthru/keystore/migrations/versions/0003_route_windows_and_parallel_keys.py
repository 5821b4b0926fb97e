"""Routes' rpm_limit windows, and the keys' max_parallel_requests (issue 15).

Revision ID: 0003
Revises: 0004
Create Date: 2026-12-03

After 0004, not 0002: the two were written at the same time, 0004 landed first (see its docstring), and the chain
must have one head.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A snapshot, as 0001 and 0002 are: spelled out here, not imported from keystore/schema.py.
    op.create_table(
        "passthru_route_windows",
        sa.Column("route", sa.Text, primary_key=True),
        sa.Column("window_start", sa.Double, nullable=False, server_default=sa.text("0")),
        sa.Column("window_count", sa.Integer, nullable=False, server_default=sa.text("0")),
    )
    # A column added at the end: SQLite alters the table in place, no copy.
    with op.batch_alter_table("passthru_keys") as batch:
        batch.add_column(sa.Column("max_parallel_requests", sa.Integer))


def downgrade() -> None:
    with op.batch_alter_table("passthru_keys") as batch:
        batch.drop_column("max_parallel_requests")
    op.drop_table("passthru_route_windows")
