"""Usage in the spend log, every pass-through call logged, and the keys' tpm_limit, budget_duration and token totals.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# A snapshot, as 0001 is: the columns spelled out here, not imported from keystore/schema.py.
_KEY_COUNTERS = ("token_window_count", "prompt_tokens", "completion_tokens", "total_tokens")
_LOG_COLUMNS = ("call_id", "model", "prompt_tokens", "completion_tokens", "total_tokens", "target")


def upgrade() -> None:
    # On SQLite, batch mode copies the spend log into a new table to make `token` nullable (SQLite cannot alter a
    # column): the whole log is rewritten once, inside the migration's transaction. PostgreSQL alters in place.
    with op.batch_alter_table("passthru_spend_logs") as batch:
        batch.alter_column("token", existing_type=sa.String(64), nullable=True)
        batch.add_column(sa.Column("call_id", sa.String(128)))
        batch.add_column(sa.Column("model", sa.Text))
        batch.add_column(sa.Column("prompt_tokens", sa.BigInteger))
        batch.add_column(sa.Column("completion_tokens", sa.BigInteger))
        batch.add_column(sa.Column("total_tokens", sa.BigInteger))
        batch.add_column(sa.Column("target", sa.Text))
    with op.batch_alter_table("passthru_keys") as batch:
        batch.add_column(sa.Column("tpm_limit", sa.Integer))
        batch.add_column(sa.Column("budget_duration", sa.String(16)))
        batch.add_column(sa.Column("budget_reset_at", sa.Double))
        batch.add_column(sa.Column("token_window_start", sa.Double, nullable=False, server_default=sa.text("0")))
        for name in _KEY_COUNTERS:
            batch.add_column(sa.Column(name, sa.BigInteger, nullable=False, server_default=sa.text("0")))


def downgrade() -> None:
    with op.batch_alter_table("passthru_keys") as batch:
        for name in ("tpm_limit", "budget_duration", "budget_reset_at", "token_window_start", *_KEY_COUNTERS):
            batch.drop_column(name)
    # 0001 logged virtual-key calls only: the entries of open routes go, as their column does.
    op.execute(sa.text("DELETE FROM passthru_spend_logs WHERE token IS NULL"))
    with op.batch_alter_table("passthru_spend_logs") as batch:
        for name in _LOG_COLUMNS:
            batch.drop_column(name)
        batch.alter_column("token", existing_type=sa.String(64), nullable=False)
