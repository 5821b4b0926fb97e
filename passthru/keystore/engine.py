"""Opening the key store's database (SQLite pragmas, pools, locking) and bringing its schema up to date with Alembic.

One engine per process, made after gunicorn forks; migrations run once per process tree and are safe when several
processes or hosts start together (SQLite's write lock, PostgreSQL's advisory lock). Alembic is imported by the
migration functions only: a worker whose gunicorn master migrated the store never loads it (11 MB).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from passthru.errors import KeyStoreError
from passthru.keystore.url import masked

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger("passthru")

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# Alembic's bookkeeping table, named so that passthru can share a database (LiteLLM's, say) with other apps.
VERSION_TABLE = "passthru_alembic_version"
# Any constant 64-bit number; every passthru process asks for the same one while it migrates PostgreSQL.
ADVISORY_LOCK = 0x70617373_7468_7275  # "passthru"
# How long a SQLite writer waits for another's lock before the call fails with 503 (writes take microseconds).
SQLITE_BUSY_MS = 5000
# Threads per worker (deploy/gunicorn.conf.py): a SQLite connection is a file handle, so each thread may hold one.
# LIFO: the most recently used connection is reused first; on SQLite its page cache is the one still valid.
SQLITE_POOL = {"pool_size": 8, "max_overflow": 56, "pool_timeout": 10, "pool_use_lifo": True}
# PostgreSQL connections are a server-wide budget (max_connections, 100 by default) shared by every worker and host;
# a call holds one for a single statement, so a few per worker serve 128 threads (the next one waits its turn).
# No overflow: an overflow connection is closed when it is returned, so under load every few calls would pay for a
# new connection (a fork on the server) — the bench saw 7 % of calls do so, and most of the store's CPU go there.
POSTGRES_POOL = {"pool_size": 8, "max_overflow": 0, "pool_timeout": 10, "pool_use_lifo": True}
CURSOR_STATEMENT = "(a statement on a pooled DBAPI cursor)"  # what dbapi_cursor's errors name as their statement
READ_ONLY = "passthru_read_only"  # execution option: a SQLite transaction that only reads takes no write lock

# URLs migrated by this process: open_store skips the check. (A gunicorn master migrates in a child process and tells
# its workers through the environment: store.MIGRATED_VARIABLE.)
_migrated: set[str] = set()


def open_engine(url: str) -> Engine:
    """An engine for the store; connects lazily, so it is cheap to make and safe to make before any fork."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        # Resolved once, here: a relative file is the working directory's at start-up, whatever happens later.
        parsed = parsed.set(database=os.path.abspath(parsed.database or ""))
        _create_private(parsed.database or "")
        engine = sa.create_engine(parsed, **SQLITE_POOL)
        sa.event.listen(engine, "connect", _sqlite_connect)
        sa.event.listen(engine, "begin", _sqlite_begin)
        return engine
    # connect_timeout: an unreachable server is a 503 in seconds, not a thread stuck for the TCP timeout.
    engine = sa.create_engine(parsed, connect_args={"connect_timeout": 5}, **POSTGRES_POOL)
    sa.event.listen(engine, "connect", _postgres_connect)
    sa.event.listen(engine, "begin", _postgres_begin)
    return engine


def _create_private(path: str) -> None:
    """Create the store's file readable by its owner only, whatever the umask: it holds the keys' hashes and spend.

    SQLite gives the -wal and -shm files it makes later the database file's own permissions. An existing file is
    left as the operator set it; a file that cannot be made here is left to SQLite, which reports why.
    """
    with suppress(OSError):
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            os.fchmod(fd, 0o600)  # os.open's mode passes through the umask, which may take the owner's write bit
        finally:
            os.close(fd)


def pool_slots(engine: Engine) -> int:
    """How many connections the engine's pool holds at most (SQLITE_POOL, POSTGRES_POOL)."""
    pool = SQLITE_POOL if engine.dialect.name == "sqlite" else POSTGRES_POOL
    return int(pool["pool_size"]) + int(pool["max_overflow"])


def _sqlite_connect(dbapi_connection: Any, record: Any) -> None:
    # The sqlite3 module would BEGIN lazily and deferred; a deferred transaction that reads and then writes fails at
    # once with "database is locked" when another process writes. passthru emits its own BEGIN (below).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_MS}")  # first: the WAL switch below may wait for a lock
    cursor.execute("PRAGMA journal_mode = WAL")  # readers never block the writer, nor it them
    # In WAL mode NORMAL is safe against corruption and skips an fsync per commit: a power cut may lose the last
    # few spend entries, never the file.
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    # IMMEDIATE takes the write lock up front, waiting up to busy_timeout for it, so a transaction never has to
    # upgrade a read lock (which SQLite refuses without waiting).
    read_only = connection.get_execution_options().get(READ_ONLY, False)
    connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def _postgres_connect(dbapi_connection: Any, record: Any) -> None:
    # Per-call counters and spend entries commit without waiting for the WAL flush (a third of the call's time
    # here): a crash of the server can lose the last fraction of a second of counts, never corrupt anything.
    dbapi_connection.autocommit = True
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit TO off")
    dbapi_connection.autocommit = False


def _postgres_begin(connection: Connection) -> None:
    # Key changes, unlike counters, are flushed before /key/* answers: a key that was shown must exist.
    if not connection.get_execution_options().get(READ_ONLY, False):
        connection.exec_driver_sql("SET LOCAL synchronous_commit TO on")


class Statement:
    """A Core statement compiled once for an engine, to run on a pooled DBAPI cursor from `dbapi_cursor`.

    The per-call statements (the admission UPDATE, the spend charge) skip Core's per-execution machinery (events,
    autobegin, result metadata), which costs several times SQLite's own work. Only types that need no bind or
    result processing (strings, numbers) may be bound or returned.
    """

    def __init__(self, engine: Engine, statement: ClauseElement) -> None:
        compiled = statement.compile(dialect=engine.dialect)
        assert isinstance(compiled, SQLCompiler)
        self.sql = str(compiled)
        self.defaults = dict(compiled.params)  # values fixed when the statement was built (the window length)
        self.positions = compiled.positiontup if compiled.positional else None

    def args(self, values: Mapping[str, Any]) -> Any:
        """The DBAPI parameters: a list for SQLite's ?, a dict for psycopg's %(name)s."""
        merged = {**self.defaults, **values}
        return [merged[name] for name in self.positions] if self.positions is not None else merged


@contextmanager
def dbapi_cursor(engine: Engine, *, atomic: bool = False) -> Iterator[Any]:
    """A pooled DBAPI cursor whose statements each commit on their own (autocommit), or, `atomic`, all together.

    Autocommit is one round trip per statement on PostgreSQL and no BEGIN/COMMIT on SQLite, where a lone write
    still waits up to busy_timeout for the lock. Driver errors come out as SQLAlchemy's DBAPIError, and a
    connection the driver reports lost is dropped from the pool, exactly as Core would do.
    """
    sqlite = engine.dialect.name == "sqlite"
    dbapi_error = engine.dialect.loaded_dbapi.Error
    try:
        raw = engine.raw_connection()  # unlike Connection, this lets the driver's connect errors through
    except dbapi_error as exc:
        raise DBAPIError.instance(None, None, exc, dbapi_error) from exc
    driver: Any = raw.driver_connection
    cursor = None
    try:
        if not sqlite and not atomic:
            driver.autocommit = True  # client-side only in psycopg 3: no round trip
        cursor = raw.cursor()
        if sqlite and atomic:
            cursor.execute("BEGIN IMMEDIATE")  # isolation_level is None (see _sqlite_connect): we say when
        try:
            yield cursor
            if atomic:
                cursor.execute("COMMIT") if sqlite else raw.commit()
        except BaseException:
            if atomic:
                with suppress(Exception):
                    cursor.execute("ROLLBACK") if sqlite else raw.rollback()
            raise
    except dbapi_error as exc:
        lost = engine.dialect.is_disconnect(exc, raw, cursor)
        if lost:
            raw.invalidate(exc)
        # A statement (its SQL is not at hand here) tells this error from a failed connect, which has none: the
        # store answered, or lost the connection (guard.unreachable).
        raise DBAPIError.instance(CURSOR_STATEMENT, None, exc, dbapi_error, connection_invalidated=lost) from exc
    finally:
        with suppress(Exception):
            if cursor is not None:
                cursor.close()
            if not sqlite and not atomic and raw.is_valid:
                driver.autocommit = False
        raw.close()


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's Config built in code (no alembic.ini): the migrations folder inside the package."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest migration this code knows."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None: never migrated)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        connection = connection.execution_options(**{READ_ONLY: True})
        return MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE}).get_current_revision()


def upgrade(engine: Engine) -> str:
    """Bring the schema to the newest revision; a no-op when it is there. Safe when processes race to do it."""
    from alembic import command

    url = engine.url.render_as_string(hide_password=False)
    try:
        with engine.begin() as connection:  # on SQLite: BEGIN IMMEDIATE, so one migrator at a time
            if connection.dialect.name == "postgresql":
                # Held until this transaction ends; PostgreSQL runs the DDL inside it, so the next process waits
                # and then finds the schema at head.
                connection.execute(sa.select(sa.func.pg_advisory_xact_lock(ADVISORY_LOCK)))
            command.upgrade(alembic_config(connection), "head")
    except SQLAlchemyError as exc:
        # Not render_as_string(hide_password=True): it leaves a ?password= in the query as it is.
        raise KeyStoreError(f"cannot open the key store at {masked(url)}: {describe(exc)}") from exc
    _migrated.add(url)
    return head_revision()


def migrate(url: str) -> str:
    """Open the store, bring it to the newest revision, close it again (`passthru db upgrade`, store.migrate_in_child).

    The master must hold no connection when it forks: workers open their own.
    """
    engine = open_engine(url)
    try:
        return upgrade(engine)
    finally:
        engine.dispose()


def ensure_schema(engine: Engine) -> None:
    """Migrate unless this process already did for this database."""
    if engine.url.render_as_string(hide_password=False) not in _migrated:
        upgrade(engine)


def describe(exc: BaseException) -> str:
    """The driver's error class and first line, for logs and start-up messages; the URL's password is not in it."""
    orig = getattr(exc, "orig", None) or exc
    first = str(orig).strip().splitlines()[0] if str(orig).strip() else ""
    return f"{type(orig).__name__}: {first}" if first else type(orig).__name__
