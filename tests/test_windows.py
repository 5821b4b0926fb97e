"""Routes' rpm_limit windows (keystore/windows.py) and their leases, against real SQLite and PostgreSQL: a fixed window
shared by every host, never more than the limit admitted in it, calls given back only to the window they counted in.
"""

from __future__ import annotations

import threading
import time

import sqlalchemy as sa
from alembic import command
from test_leases import admitted_by
from test_store import new_key

from passthru.keystore.engine import alembic_config, head_revision, open_engine, upgrade
from passthru.keystore.leases import SHARE, Leases
from passthru.keystore.records import Refusal, Unused
from passthru.keystore.schema import route_windows
from passthru.keystore.sql import SqlKeyStore, open_store

ROUTE = "/v1/chat/completions"


def window(store: SqlKeyStore, route: str = ROUTE) -> tuple[float, int]:
    """The route's window (start, count), as stored."""
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(route_windows.c.window_start, route_windows.c.window_count)
                           .where(route_windows.c.route == route)).one()  # fmt: skip
    return row[0], row[1]


def test_a_route_window_admits_its_limit_and_says_when_it_ends(store: SqlKeyStore) -> None:
    first = store.routes.admit(ROUTE, 3)
    assert first is None  # it opened the window: which window it counted in is not known for sure (windows.py)
    time.sleep(0.01)
    second, third = store.routes.admit(ROUTE, 3), store.routes.admit(ROUTE, 3)
    start = window(store)[0]
    assert second == third == start and window(store) == (start, 3)
    refusal = store.routes.admit(ROUTE, 3)
    assert isinstance(refusal, Refusal) and refusal.reason == "rpm" and 55 <= refusal.retry_after <= 60
    assert window(store)[1] == 3  # a refused call is not counted
    assert store.routes.admit("/other", 1) is None  # each route its own window
    assert isinstance(store.routes.admit(ROUTE, 4), float)  # the limit is the caller's: an edited config's
    assert isinstance(store.routes.admit(ROUTE, 4), Refusal)


def test_a_new_route_window_opens_when_the_last_one_ends(database_url: str) -> None:
    opened = open_store(database_url)
    short = SqlKeyStore(opened.engine, window=1.0)
    try:
        assert short.routes.admit(ROUTE, 1) is None
        refusal = short.routes.admit(ROUTE, 1)
        assert isinstance(refusal, Refusal) and refusal.retry_after == 1
        time.sleep(1.05)
        assert not isinstance(short.routes.admit(ROUTE, 1), Refusal)
        assert window(short)[1] == 1
    finally:
        opened.close()


def test_hosts_share_a_route_window(store: SqlKeyStore, other_host: SqlKeyStore) -> None:
    """Two hosts, eight threads each, on a route never called before: exactly the limit admitted in all."""
    admitted: list[bool] = []
    lock = threading.Lock()
    start = threading.Barrier(16)

    def call(host: SqlKeyStore) -> None:
        start.wait(10)
        for _ in range(10):
            outcome = host.routes.admit(ROUTE, 45)
            with lock:
                admitted.append(not isinstance(outcome, Refusal))

    threads = [threading.Thread(target=call, args=((store, other_host)[n % 2],)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(admitted) == 160 and admitted.count(True) == 45
    assert window(store)[1] == 45


def test_route_leases_count_only_with_room_and_give_back_to_their_window(store: SqlKeyStore) -> None:
    assert store.routes.lease(ROUTE, 200, 2, 128, 1.0) is None  # never called: its first call makes its row
    store.routes.admit(ROUTE, 200)
    start = store.routes.lease(ROUTE, 200, 2, 128, 1.0)
    assert start is not None and window(store) == (start, 3)
    assert store.routes.lease(ROUTE, 200, 2, 198, 1.0) is None  # 3 + 198 would pass the limit: nothing counted
    store.record([], None, [Unused(ROUTE, 2, 0.0, start, route=True), Unused(ROUTE, 1, 0.0, start - 60, route=True)])
    assert window(store) == (start, 1)  # only what was counted in this window goes back to it


def test_route_leases_across_hosts_never_pass_the_limit(store: SqlKeyStore, other_host: SqlKeyStore) -> None:
    """A busy route with room for leases: never more than rpm_limit admitted; once the hosts give back what they did
    not use, calls are admitted again up to exactly rpm_limit."""
    limit = 8 * SHARE
    hosts = [Leases(store), Leases(other_host)]
    admitted = [admitted_by(hosts, limit, lambda leases: not isinstance(leases.admit_route(ROUTE, limit), Refusal))]
    assert admitted[0] <= limit and window(store)[1] == limit
    for leases, host in zip(hosts, (store, other_host), strict=True):
        host.record([], None, leases.unused(everything=True))
    assert window(store)[1] == admitted[0]
    while not isinstance(hosts[0].admit_route(ROUTE, limit), Refusal) and admitted[0] <= limit:
        admitted[0] += 1
    assert admitted[0] == limit


def test_a_call_given_back_by_a_route_goes_back_to_its_window(store: SqlKeyStore) -> None:
    """A call the route counted and its key then refused: admitted again, once the writer gave it back; calls
    given back together are one entry per route and window."""
    leases = Leases(store)
    assert leases.admit_route(ROUTE, 2) is None  # opens the window
    time.sleep(0.01)
    counted = leases.admit_route(ROUTE, 2)
    assert isinstance(counted, float) and isinstance(leases.admit_route(ROUTE, 2), Refusal)
    leases.give_back_route(ROUTE, counted)
    leases.give_back_route("/other", counted)
    leases.give_back_route(ROUTE, counted - 60)
    unused = leases.unused()
    assert sorted((u.token, u.calls, u.window_start) for u in unused) == [("/other", 1, counted),
                                                                          (ROUTE, 1, counted - 60),
                                                                          (ROUTE, 1, counted)]  # fmt: skip
    leases.give_back_route(ROUTE, counted)
    leases.give_back_route(ROUTE, counted)
    assert [(u.token, u.calls) for u in leases.unused()] == [(ROUTE, 2)]
    store.record([], None, unused)
    assert window(store)[1] == 1
    assert not isinstance(leases.admit_route(ROUTE, 2), Refusal)
    assert isinstance(leases.admit_route(ROUTE, 2), Refusal)


def test_0003_upgrades_a_0002_store(database_url: str) -> None:
    """Keys keep their fields and have no max_parallel_requests; route windows start empty. Then back down and up."""
    engine = open_engine(database_url)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0002")
        store = SqlKeyStore(engine)
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO passthru_keys (token, key_name, created_at, rpm_limit) "
                                 "VALUES (:t, 'sk-...0001', 1700000000, 5)"), {"t": "1" * 64})  # fmt: skip
        assert upgrade(engine) == head_revision() == "0003"
        info = store.find("1" * 64)
        assert info is not None and (info.rpm_limit, info.max_parallel_requests) == (5, None)
        assert store.routes.admit(ROUTE, 1) is None and isinstance(store.routes.admit(ROUTE, 1), Refusal)
        made = store.create(new_key(2, max_parallel_requests=3))
        assert made.max_parallel_requests == 3
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "0002")
        assert "passthru_route_windows" not in sa.inspect(engine).get_table_names()
        assert upgrade(engine) == "0003"
    finally:
        engine.dispose()
