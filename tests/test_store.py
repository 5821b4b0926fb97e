"""The key store against real SQLite files and a real PostgreSQL: migrations, the atomic admission, the queries."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from upstream import wait_until

import passthru.keystore.sql
from passthru.errors import KeyStoreError, RequestError
from passthru.keystore.engine import (
    SQLITE_BUSY_MS,
    VERSION_TABLE,
    alembic_config,
    current_revision,
    head_revision,
    migrate,
    open_engine,
    pool_slots,
    upgrade,
)
from passthru.keystore.guard import STALL
from passthru.keystore.records import NewKey, SpendEntry, Tally
from passthru.keystore.schema import metadata
from passthru.keystore.sql import SqlKeyStore, open_store
from passthru.keystore.store import COOL_OFF, LazyStore

ROOT = Path(__file__).resolve().parent.parent


def new_key(n: int, **fields: object) -> NewKey:
    return NewKey(token=f"{n:064x}", key_name=f"sk-...{n:04d}", **fields)  # type: ignore[arg-type]


# --- migrations ----------------------------------------------------------------------------------------------


def test_migrations_create_exactly_the_tables_the_code_uses(store: SqlKeyStore) -> None:
    assert current_revision(store.engine) == head_revision()
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "version_table": VERSION_TABLE})
        assert compare_metadata(context, metadata) == []
        tables = set(sa.inspect(conn).get_table_names())
    assert tables == {"passthru_keys", "passthru_spend_logs", "passthru_route_windows", "passthru_alembic_version"}


def test_0002_upgrades_a_0001_store_with_rows_in_it(database_url: str) -> None:
    """Keys and entries written by 0001 keep their values; the new columns start unknown (NULL) or at 0; and the
    store works on them: a call logged without a key, a key admitted and charged tokens. Then back down and up."""
    engine = open_engine(database_url)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0001")
            # As 0001 wrote them, in its own columns (schema.py describes the newest).
            conn.execute(
                sa.text(
                    "INSERT INTO passthru_keys (token, key_name, created_at, max_budget, spend, rpm_limit,"
                    " metadata) VALUES (:t, 'sk-...0001', 1700000000, 10, 2.5, 5, '{\"a\": 1}')"
                ),
                {"t": "1" * 64},
            )
            conn.execute(sa.text("INSERT INTO passthru_spend_logs (request_id, token, route, status, spend, start_time,"
                                 " duration) VALUES (:id, :t, '/v1/rerank', 200, 0.5, 1700000001, 0.25)"),
                         {"id": "0190a000-0000-7000-8000-000000000001", "t": "1" * 64})  # fmt: skip
        assert current_revision(engine) == "0001"
        assert upgrade(engine) == head_revision()
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True, "version_table": VERSION_TABLE})
            assert compare_metadata(context, metadata) == []  # indexes kept through SQLite's table copy
        store = SqlKeyStore(engine)
        info = store.find("1" * 64)
        assert info is not None and (info.spend, info.max_budget, info.rpm_limit, dict(info.metadata)) == (
            2.5, 10.0, 5, {"a": 1})  # fmt: skip
        assert (info.tpm_limit, info.budget_duration, info.budget_reset_at, info.total_tokens) == (None, None, None, 0)
        [old] = store.spend_logs(None, None, None, 10)
        assert (old.token, old.route, old.spend, old.start_time, old.duration) == ("1" * 64, "/v1/rerank", 0.5,
                                                                                   1700000001.0, 0.25)  # fmt: skip
        assert (old.call_id, old.model, old.prompt_tokens, old.total_tokens, old.target) == (None,) * 5
        store.record([SpendEntry(str(uuid.uuid4()), None, "/open", 200, 0.0, time.time(), 0.1, call_id="c1",
                                 total_tokens=7)], {"1" * 64: Tally(0.5, 1, 2, 3)})  # fmt: skip
        assert store.admit("1" * 64, 1.0) is None
        info = store.find("1" * 64)
        assert info is not None and (info.spend, info.prompt_tokens, info.total_tokens) == (4.0, 1, 3)
        assert [e.call_id for e in store.spend_logs(None, None, None, 10)] == ["c1", None]

        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "0001")  # the entries without a key go with their column
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM passthru_spend_logs")).scalar() == 1
        assert upgrade(engine) == head_revision()
    finally:
        engine.dispose()


def test_upgrade_again_is_a_no_op(store: SqlKeyStore) -> None:
    store.create(new_key(1))
    assert upgrade(store.engine) == head_revision()
    assert store.find(new_key(1).token) is not None


def test_processes_racing_to_migrate_all_succeed(database_url: str) -> None:
    code = "import sys; from passthru.keystore.engine import migrate; print(migrate(sys.argv[1]))"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", code, database_url], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )  # fmt: skip
        for _ in range(4)
    ]
    outputs = [racer.communicate(timeout=60)[0].decode() for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0, 0, 0], outputs
    assert all(output.strip() == head_revision() for output in outputs), outputs


def test_sqlite_connections_use_wal_and_wait_for_locks(tmp_path: Path) -> None:
    engine = open_engine(f"sqlite:///{tmp_path / 'k.db'}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == SQLITE_BUSY_MS
    finally:
        engine.dispose()


def test_relative_sqlite_path_is_the_working_directory_at_start(tmp_path: Path) -> None:
    store = open_store("sqlite:///passthru.db")  # conftest runs each test in its own folder
    store.close()
    assert (tmp_path / "passthru.db").exists()


def test_unreachable_postgres_is_a_key_store_error_without_password() -> None:
    started = time.monotonic()
    with pytest.raises(KeyStoreError) as info:
        migrate("postgresql+psycopg://u:pw-secret-9@127.0.0.1:1/test")
    assert time.monotonic() - started < 10
    assert "pw-secret-9" not in str(info.value)
    assert "127.0.0.1:1" in str(info.value) and info.value.status == 503


def test_store_failing_at_run_time_is_a_key_store_error(postgres: str) -> None:
    broken = SqlKeyStore(open_engine("postgresql+psycopg://postgres@127.0.0.1:1/test"))
    try:
        for call in (lambda: broken.admit("0" * 64, 0.0), lambda: broken.find("0" * 64),
                     lambda: broken.record([entry("0" * 64, "/r", 200)]), lambda: broken.page(1, 10)):  # fmt: skip
            with pytest.raises(KeyStoreError, match="the key store is unavailable"):
                call()
    finally:
        broken.close()


# --- the per-call admission ----------------------------------------------------------------------------------


def test_rpm_limit_counts_in_a_fixed_window(store: SqlKeyStore) -> None:
    token = store.create(new_key(1, rpm_limit=3)).token
    assert [store.admit(token, 0.0) for _ in range(3)] == [None, None, None]
    refusal = store.admit(token, 0.0)
    assert refusal is not None and refusal.reason == "rpm"
    assert 55 <= refusal.retry_after <= 60


def test_a_new_window_starts_when_the_last_one_ends(database_url: str) -> None:
    opened = open_store(database_url)
    short = SqlKeyStore(opened.engine, window=1.0)
    try:
        token = short.create(new_key(1, rpm_limit=2)).token
        assert short.admit(token, 0.0) is None and short.admit(token, 0.0) is None
        refusal = short.admit(token, 0.0)
        assert refusal is not None and refusal.retry_after == 1
        time.sleep(1.1)
        assert short.admit(token, 0.0) is None
    finally:
        opened.close()


def test_rpm_limit_holds_under_concurrent_callers(store: SqlKeyStore) -> None:
    token = store.create(new_key(1, rpm_limit=25)).token
    results: list[object] = []
    lock = threading.Lock()

    def call() -> None:
        for _ in range(10):
            outcome = store.admit(token, 0.5)
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 80
    assert results.count(None) == 25
    info = store.find(token)
    assert info is not None and info.spend == pytest.approx(12.5)  # only admitted calls are charged


def test_tpm_limit_refuses_once_the_window_holds_its_tokens(store: SqlKeyStore) -> None:
    """Tokens are counted when calls end (the spend writer's charges), in a fixed window per key: a call is refused
    once the window holds tpm_limit tokens, whatever overshot it."""
    token = store.create(new_key(1, tpm_limit=100)).token
    assert store.find(token).counted  # type: ignore[union-attr]
    assert store.admit(token, 0.0) is None
    store.record([], {token: Tally(total_tokens=60)})  # opens the window
    assert store.admit(token, 0.0) is None and store.admit(token, 0.0) is None  # 60 < 100: calls still pass
    store.record([], {token: Tally(total_tokens=90)})  # two long answers end together: 150
    refusal = store.admit(token, 0.0)
    assert refusal is not None and refusal.reason == "tpm" and 55 <= refusal.retry_after <= 60
    store.update(token, {"tpm_limit": 151})
    assert store.admit(token, 0.0) is None
    store.update(token, {"tpm_limit": None})
    assert store.admit(token, 0.0) is None


def test_a_new_token_window_starts_when_the_last_one_ends(database_url: str) -> None:
    opened = open_store(database_url)
    short = SqlKeyStore(opened.engine, window=2.0)
    try:
        token = short.create(new_key(1, tpm_limit=100)).token
        short.record([], {token: Tally(total_tokens=150)})
        assert short.admit(token, 0.0).reason == "tpm"  # type: ignore[union-attr]
        assert wait_until(lambda: short.admit(token, 0.0) is None, 10)  # once the window is over
        short.record([], {token: Tally(total_tokens=99)})  # the first tokens after it: a new window, from 0
        assert short.admit(token, 0.0) is None
    finally:
        opened.close()


def test_budget_is_checked_before_the_call_and_spent_at_it(store: SqlKeyStore) -> None:
    token = store.create(new_key(1, max_budget=1.0)).token
    assert [store.admit(token, 0.4) for _ in range(3)] == [None, None, None]
    refusal = store.admit(token, 0.4)
    assert refusal is not None and refusal.reason == "budget"
    assert refusal.spend == pytest.approx(1.2) and refusal.max_budget == 1.0


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        pytest.param({"blocked": True}, "blocked", id="blocked"),
        pytest.param({"duration": 0}, "expired", id="expired"),
        pytest.param({"max_budget": 0.0}, "budget", id="zero-budget"),
        pytest.param({"rpm_limit": 0}, "rpm", id="zero-rpm"),
    ],
)
def test_refusal_reasons(store: SqlKeyStore, fields: dict[str, object], reason: str) -> None:
    token = store.create(new_key(1)).token
    assert store.admit(token, 1.0) is None
    store.update(token, fields)
    refusal = store.admit(token, 1.0)
    assert refusal is not None and refusal.reason == reason
    assert store.admit("f" * 64, 0.0).reason == "unknown"  # type: ignore[union-attr]


def entry(token: str, route: str, status: int, start: float | None = None) -> SpendEntry:
    return SpendEntry(str(uuid.uuid4()), token, route, status, 0.5, time.time() if start is None else start, 0.25)


def test_spend_log_entries(store: SqlKeyStore) -> None:
    one, two = store.create(new_key(1)).token, store.create(new_key(2)).token
    now = time.time()
    store.record([entry(one, "/a", 200, start=now - 10), entry(two, "/b", 502, start=now - 5)])
    store.record([entry(one, "/old", 200, start=now - 7200)])
    entries = store.spend_logs(one, None, None, 100)
    assert [(e.route, e.status, e.spend, e.duration) for e in entries] == [("/a", 200, 0.5, 0.25),
                                                                          ("/old", 200, 0.5, 0.25)]  # fmt: skip
    assert [e.route for e in store.spend_logs(None, None, None, 100)] == ["/b", "/a", "/old"]  # newest first
    assert [e.route for e in store.spend_logs(None, now - 3600, None, 100)] == ["/b", "/a"]
    assert [e.route for e in store.spend_logs(None, now - 9000, now - 3600, 100)] == ["/old"]
    assert store.spend_logs(None, now + 3600, None, 100) == []
    assert len(store.spend_logs(None, None, None, 1)) == 1


def test_entries_and_charges_are_written_together(store: SqlKeyStore) -> None:
    """The costs of calls not charged at admission (keys without limits) reach the keys with their entries."""
    one, two = store.create(new_key(1)).token, store.create(new_key(2)).token
    store.record([entry(one, "/a", 200), entry(two, "/b", 200)], {one: Tally(1.5), two: Tally(0.25)})
    # A key deleted meanwhile (or the master key's hash): nothing to charge.
    store.record([entry(one, "/a", 200)], {one: Tally(1.0), "f" * 64: Tally(9.0)})
    assert (store.find(one).spend, store.find(two).spend) == (2.5, 0.25)  # type: ignore[union-attr]
    assert len(store.spend_logs(None, None, None, 100)) == 3


class Spy:
    """Wraps keys.dbapi_cursor: records the SQL of every statement, and fails the `fail_at`-th one (counting from 1)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_at: int = 0) -> None:
        self.sql: list[str] = []
        self.fail_at = fail_at
        real = passthru.keystore.sql.dbapi_cursor

        @contextmanager
        def spied(engine: sa.Engine, *, atomic: bool = False) -> Iterator[Any]:
            with real(engine, atomic=atomic) as cursor:
                yield _SpiedCursor(self, cursor, engine.dialect.loaded_dbapi.OperationalError)

        monkeypatch.setattr(passthru.keystore.sql, "dbapi_cursor", spied)


class _SpiedCursor:
    def __init__(self, spy: Spy, cursor: Any, error: type[Exception]) -> None:
        self.spy, self.cursor, self.error = spy, cursor, error

    def execute(self, sql: str, args: Any) -> None:
        self.spy.sql.append(sql)
        if len(self.spy.sql) == self.spy.fail_at:
            raise self.error("database is locked")  # as a write lock held too long would
        self.cursor.execute(sql, args)

    def executemany(self, sql: str, args: Any) -> None:
        self.spy.sql.append(sql)
        self.cursor.executemany(sql, args)


def test_spend_log_inserts_come_in_eight_sizes(store: SqlKeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver keeps each statement it saw prepared, per connection: one size per batch length grew SQLite's
    memory by up to 4 MB per pooled connection."""
    token = store.create(new_key(1)).token
    spy = Spy(monkeypatch)
    written = 0
    for count in range(1, 301):
        store.record([entry(token, "/a", 200) for _ in range(count)])
        written += count
    assert len(set(spy.sql)) <= 8
    assert len(store.spend_logs(token, None, None, written + 1)) == written


def test_a_batch_that_failed_midway_is_written_once_when_retried(
    store: SqlKeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite a batch of entries alone is several transactions: after a failure some are written, and SpendWriter
    retries the whole batch. The retry must neither trip on the entries already written nor write any twice."""
    token = store.create(new_key(1)).token
    entries = [entry(token, "/a", 200) for _ in range(300)]
    Spy(monkeypatch, fail_at=2)
    with pytest.raises(KeyStoreError):
        store.record(entries)
    store.record(entries)
    assert sorted(e.request_id for e in store.spend_logs(token, None, None, 1000)) == sorted(
        e.request_id for e in entries
    )


# --- administration ------------------------------------------------------------------------------------------


def test_create_refuses_a_taken_key_or_alias(store: SqlKeyStore) -> None:
    info = store.create(new_key(1, key_alias="team-a", duration=3600.0, allowed_routes=("/x",), metadata={"a": 1}))
    assert info.expires is not None and 3590 < info.expires - info.created_at <= 3600.001
    assert (info.allowed_routes, dict(info.metadata), info.spend, info.blocked) == (("/x",), {"a": 1}, 0.0, False)
    with pytest.raises(RequestError, match="already exists"):
        store.create(new_key(1))
    with pytest.raises(RequestError, match="key_alias 'team-a' is already used"):
        store.create(new_key(2, key_alias="team-a"))
    with pytest.raises(RequestError, match="already used"):
        store.update(store.create(new_key(3)).token, {"key_alias": "team-a"})


def test_update_sets_and_clears(store: SqlKeyStore) -> None:
    token = store.create(new_key(1, max_budget=5.0, duration=60.0)).token
    info = store.update(token, {"max_budget": None, "duration": None, "rpm_limit": 7, "allowed_routes": None,
                                "metadata": {"team": "x"}, "spend": 1.5})  # fmt: skip
    assert info is not None
    assert (info.max_budget, info.expires, info.rpm_limit, info.spend) == (None, None, 7, 1.5)
    assert dict(info.metadata) == {"team": "x"}
    assert store.update("f" * 64, {"blocked": True}) is None


def test_delete_is_all_or_nothing(store: SqlKeyStore) -> None:
    one, two = store.create(new_key(1)).token, store.create(new_key(2)).token
    assert store.delete([one, "f" * 64]) == ["f" * 64]
    assert store.find(one) is not None
    assert store.delete([one, two]) == []
    assert store.find(one) is None and store.find(two) is None


def test_pages_newest_first(store: SqlKeyStore) -> None:
    tokens = [store.create(new_key(n, key_alias=f"k{n}")).token for n in range(5)]
    first, total = store.page(1, 2)
    assert total == 5 and [i.token for i in first] == tokens[:-3:-1]
    last, _ = store.page(3, 2)
    assert [i.token for i in last] == tokens[:1]
    assert [i.token for i in store.page(1, 10, key_alias="k3")[0]] == [tokens[3]]


# --- a store that does not answer ------------------------------------------------------------------------------


def _timed(calls: int, call: Callable[[], object]) -> list[float]:
    """Make `calls` calls at once, each on its own thread; the seconds each took to fail with KeyStoreError."""
    took: list[float] = []

    def one() -> None:
        start = time.monotonic()
        try:
            call()
        except KeyStoreError:
            took.append(time.monotonic() - start)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(calls)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 12  # one deadline for all: a test that fails still ends within it
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return sorted(took)


def test_a_store_that_does_not_answer_holds_no_more_threads_than_its_connections(blackhole: int) -> None:
    """40 calls at once: those that got a connection slot wait for the connect timeout (5 s); the others fail once
    the store has made no progress for STALL, instead of waiting in the pool (10 s). Then calls fail at once."""
    store = SqlKeyStore(open_engine(f"postgresql+psycopg://postgres@127.0.0.1:{blackhole}/test"))
    try:
        took = _timed(40, lambda: store.find("0" * 64))
        assert len(took) == 40, took
        assert len([t for t in took if t > STALL + 0.5]) <= pool_slots(store.engine), took
        assert _timed(10, lambda: store.find("0" * 64))[-1] < 0.2  # cooling off: no connect tried
    finally:
        store.close()


def test_a_failed_opening_is_not_waited_for_again(blackhole: int) -> None:
    """A store that must be migrated on first use and cannot be reached: the first opening is waited for (5 s), then
    calls fail at once for COOL_OFF; after it, one call tries again while the others still fail at once."""
    lazy = LazyStore(f"postgresql+psycopg://postgres@127.0.0.1:{blackhole}/test")
    assert len(_timed(10, lazy.open)) == 10
    assert _timed(20, lazy.open)[-1] < 0.2
    time.sleep(COOL_OFF)
    took = _timed(10, lazy.open)
    assert len(took) == 10 and took[-2] < 0.2 and took[-1] > 4, took  # one tried, the others did not wait for it
