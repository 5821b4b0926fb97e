"""Alembic migrations of the key store; run in code by passthru.db.upgrade (no alembic.ini needed)."""
