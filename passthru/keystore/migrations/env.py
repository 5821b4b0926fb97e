"""Alembic's entry point: migrate on the connection (and inside the transaction) that engine.upgrade opened.

A new migration is a new file in versions/: `python -c "from alembic import command; from
passthru.keystore.engine import alembic_config; command.revision(alembic_config(), 'what changes')"` writes one from
script.py.mako; write its operations by hand so that the schema matches the tables in passthru/keystore/schema.py
(tests/test_store.py checks that).
"""

from __future__ import annotations

from alembic import context

from passthru.keystore.engine import VERSION_TABLE
from passthru.keystore.schema import metadata

if context.is_offline_mode():
    raise SystemExit("passthru migrates a live database only (no --sql mode)")

connection = context.config.attributes.get("connection")
if connection is None:
    raise SystemExit("run migrations with `passthru db upgrade --config F`, which opens the connection")

# render_as_batch: SQLite cannot ALTER most things in place; batch mode copies the table instead.
context.configure(connection=connection, target_metadata=metadata, version_table=VERSION_TABLE, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
