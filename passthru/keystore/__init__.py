"""The key store: virtual keys and their spend, and routes' rpm_limit windows, behind the Protocols in records.py:
CallStore for each call, KeyAdmin for /key/* and `passthru keys`.

    records.py   what the store takes and returns, and the Protocols the app's modules depend on
    store.py     the store of a server process: opened on first use, migrated by the gunicorn master in a child
    sql.py       the store on SQLAlchemy Core: each call's admission and spend, budget resets, the /key/* operations
    statements.py  the per-call statements (admission, leases, charge, spend log, reset), built once per engine
    admin.py     the /key/* operations' queries; report.py, /global/spend/report's
    budget.py    a key's budget period (budget_duration): when its spend next goes back to 0
    guard.py     every call into the store: driver errors as 503, a store that stalls or is down failed fast
    leases.py    a busy key's (or route's) calls admitted a few at a time
    windows.py   routes' rpm_limit windows: counted as a key's, in a table of their own
    spend.py     the spend log writer, one thread per worker, in batches
    engine.py    the engine (SQLite pragmas, pools), and the schema migrated with Alembic (migrations/)
    schema.py    the tables
    url.py       the database URL, read from the config and shown with its passwords masked (no SQLAlchemy)

Only records.py, budget.py and url.py are imported before the store is opened: SQLAlchemy loads with the store
(store.py).
"""
