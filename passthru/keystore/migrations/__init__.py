"""Alembic migrations of the key store; run in code by passthru.keystore.engine.upgrade (no alembic.ini needed)."""
