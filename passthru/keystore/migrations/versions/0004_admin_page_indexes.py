"""Indexes for the admin page's spend log filters (by route, by status) and its key list (newest first).

Revision ID: 0004
Revises: 0002
Create Date: 2026-12-08

Numbered 0004, not 0003: a 0003 was being written at the same time on another branch. Whichever lands second sets
its down_revision to the other's revision, so that the chain has one head.
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The logs page lists the newest entries of one route or one status: each index gives them in start_time order,
    # so the page reads its 50 rows and stops, however many entries the log holds.
    op.create_index("ix_passthru_spend_logs_route_start", "passthru_spend_logs", ["route", "start_time"])
    op.create_index("ix_passthru_spend_logs_status_start", "passthru_spend_logs", ["status", "start_time"])
    # The keys page (and /key/list) lists keys newest first, a page at a time: read in order, not sorted each time.
    op.create_index("ix_passthru_keys_created", "passthru_keys", ["created_at", "token"])


def downgrade() -> None:
    op.drop_index("ix_passthru_keys_created", "passthru_keys")
    op.drop_index("ix_passthru_spend_logs_status_start", "passthru_spend_logs")
    op.drop_index("ix_passthru_spend_logs_route_start", "passthru_spend_logs")
