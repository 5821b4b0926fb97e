"""Leases (leases.py): a counted key's calls taken from the store a few at a time, against real SQLite and PostgreSQL.

What must hold is what held call by call: never more than rpm_limit in a window, never spend past max_budget but
for the crossing call, the unused calls given back, and a block seen within HOLD.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import sqlalchemy as sa
from test_store import new_key
from upstream import wait_until

from passthru.keystore.leases import SHARE, Leases
from passthru.keystore.records import Charge, Refusal, Tally, Unused
from passthru.keystore.schema import keys
from passthru.keystore.spend import SpendWriter
from passthru.keystore.sql import SqlKeyStore, open_store


class Asking:
    """A store that counts the questions Leases asks it (admit and lease)."""

    def __init__(self, store: SqlKeyStore) -> None:
        self.store = store
        self.asked: list[int] = []  # calls asked for, one item per question

    @property
    def edits(self) -> int:
        return self.store.edits

    def admit(self, token: str, cost: float) -> Refusal | None:
        self.asked.append(1)
        return self.store.admit(token, cost)

    def lease(self, token: str, cost: float, calls: int, room: int, hold: float) -> float | None:
        self.asked.append(calls)
        return self.store.lease(token, cost, calls, room, hold)


def window(store: SqlKeyStore, token: str) -> tuple[float, int, float]:
    """The key's rpm window (start, count) and spend, as stored."""
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(keys.c.window_start, keys.c.window_count, keys.c.spend)
                           .where(keys.c.token == token)).one()  # fmt: skip
    return row[0], row[1], row[2]


# --- the store's side ----------------------------------------------------------------------------------------


def test_a_lease_counts_and_charges_its_calls_only_with_room_for_more(store: SqlKeyStore) -> None:
    token = store.create(new_key(1, rpm_limit=200)).token
    start = store.lease(token, 0.5, 2, 128, 1.0)
    assert start is not None and window(store, token) == (start, 2, 1.0)
    assert store.lease(token, 0.5, 2, 199, 1.0) is None  # 2 + 199 calls would pass rpm_limit: nothing counted
    assert window(store, token) == (start, 2, 1.0)
    assert store.admit(token, 0.5) is None and window(store, token) == (start, 3, 1.5)

    budget = store.create(new_key(2, max_budget=10.0)).token
    assert store.lease(budget, 1.0, 2, 10, 1.0) is not None  # the 10th call would start at spend 9 < 10
    assert store.lease(budget, 1.0, 2, 10, 1.0) is None  # from spend 2 the 10th would start at 11
    assert window(store, budget)[2] == 2.0

    expiring = store.create(new_key(3, duration=0.5)).token
    assert store.lease(expiring, 0.0, 2, 2, 1.0) is None  # ends within the lease's second: one by one
    assert store.admit(expiring, 0.0) is None

    blocked = store.create(new_key(4)).token
    store.update(blocked, {"blocked": True})
    assert store.lease(blocked, 0.0, 2, 2, 1.0) is None
    assert store.lease("f" * 64, 0.0, 2, 2, 1.0) is None


def test_a_lease_is_not_taken_in_a_window_about_to_end(database_url: str) -> None:
    opened = open_store(database_url)
    short = SqlKeyStore(opened.engine, window=1.0)
    try:
        token = short.create(new_key(1, rpm_limit=1000)).token
        assert short.admit(token, 0.0) is None  # opens a window of 1 s
        assert short.lease(token, 0.0, 2, 2, 1.0) is None  # the calls would outlive the window they count in
        time.sleep(1.05)
        assert short.lease(token, 0.0, 2, 2, 1.0) is not None  # a fresh window: 1 s left
        assert window(short, token)[1] == 2
    finally:
        opened.close()


def test_unused_calls_go_back_to_their_window_and_spend(store: SqlKeyStore) -> None:
    token = store.create(new_key(1, rpm_limit=1000)).token
    start = store.lease(token, 0.25, 8, 8, 1.0)
    assert start is not None and window(store, token) == (start, 8, 2.0)
    store.record([], None, [Unused(token, 5, 1.25, start)])
    assert window(store, token) == (start, 3, 0.75)
    store.record([], None, [Unused(token, 1, 0.25, start - 60.0), Unused("f" * 64, 1, 0.25, start)])
    assert window(store, token) == (start, 3, 0.5)  # counted in an earlier window: only the cost goes back


# --- Leases, one worker and several ----------------------------------------------------------------------------


def test_a_busy_key_is_leased_more_calls_at_a_time_and_gives_back_what_is_left(store: SqlKeyStore) -> None:
    token = store.create(new_key(1, max_budget=1e9)).token
    info = store.find(token)
    assert info is not None
    asking = Asking(store)
    leases = Leases(asking, most=16)  # type: ignore[arg-type]
    assert [leases.admit(info, 0.5) for _ in range(40)] == [None] * 40
    assert asking.asked == [1, 2, 4, 8, 16, 16]  # 47 calls charged for 40 made
    assert window(store, token)[1:] == (47, 23.5)
    assert leases.unused() == []  # the last lease still runs
    unused = leases.unused(everything=True)
    assert [(u.token, u.calls, u.amount) for u in unused] == [(token, 7, 3.5)]
    store.record([], None, unused)
    assert window(store, token)[1:] == (40, 20.0)


def test_a_key_near_its_limits_or_seldom_called_is_asked_for_call_by_call(store: SqlKeyStore) -> None:
    small = store.create(new_key(1, rpm_limit=2 * SHARE - 1)).token  # too small a limit for any lease
    info = store.find(small)
    assert info is not None
    asking = Asking(store)
    leases = Leases(asking)  # type: ignore[arg-type]
    results = [leases.admit(info, 0.0) for _ in range(2 * SHARE)]
    assert results[:-1] == [None] * (2 * SHARE - 1) and results[-1] is not None and results[-1].reason == "rpm"
    assert set(asking.asked) == {1}

    budget = store.create(new_key(2, max_budget=3 * SHARE)).token  # room for a lease of 2, then not
    info = store.find(budget)
    assert info is not None
    asking.asked.clear()
    results = [leases.admit(info, 1.0) for _ in range(3 * SHARE + 1)]
    assert results[:-1] == [None] * (3 * SHARE) and results[-1] is not None and results[-1].reason == "budget"
    assert window(store, budget)[2] == 3 * SHARE  # spend reached max_budget exactly, never past it
    assert asking.asked.count(2) <= 3  # refused leases back off: one try per HOLD, then one by one

    slow = Leases(Asking(store), hold=0.05)  # type: ignore[arg-type]
    other = store.create(new_key(3, max_budget=1e9)).token
    info = store.find(other)
    assert info is not None
    for _ in range(3):
        assert slow.admit(info, 0.0) is None
        time.sleep(0.06)  # slower than one call per HOLD: never leased
    assert slow.store.asked == [1, 1, 1]  # type: ignore[attr-defined]


def test_a_key_with_a_tpm_limit_is_never_leased(store: SqlKeyStore) -> None:
    """Its tokens come in when calls end: no lease could know the room left, so each call asks the store, which
    refuses the first one once the window holds tpm_limit tokens."""
    token = store.create(new_key(1, tpm_limit=100, rpm_limit=1000)).token
    info = store.find(token)
    assert info is not None
    asking = Asking(store)
    leases = Leases(asking)  # type: ignore[arg-type]
    assert [leases.admit(info, 0.0) for _ in range(20)] == [None] * 20
    assert asking.asked == [1] * 20
    store.record([], {token: Tally(total_tokens=100)})
    refusal = leases.admit(info, 0.0)
    assert refusal is not None and refusal.reason == "tpm"


def test_hosts_leasing_one_key_never_pass_its_rpm_limit(store: SqlKeyStore, other_host: SqlKeyStore) -> None:
    """Two hosts, four threads each, on a key with room for leases: never more than rpm_limit admitted; once the
    hosts give back what they did not use, calls are admitted again up to exactly rpm_limit."""
    limit = 8 * SHARE
    token = store.create(new_key(1, rpm_limit=limit)).token
    info = store.find(token)
    assert info is not None
    hosts = [Leases(store), Leases(other_host)]
    admitted = [admitted_by(hosts, limit, lambda leases: leases.admit(info, 0.0) is None)]
    assert admitted[0] <= limit and window(store, token)[1] == limit
    for leases, host in zip(hosts, (store, other_host), strict=True):
        host.record([], None, leases.unused(everything=True))
    assert window(store, token)[1] == admitted[0]
    while hosts[0].admit(info, 0.0) is None and admitted[0] <= limit:
        admitted[0] += 1
    assert admitted[0] == limit


def admitted_by(hosts: list[Leases], calls: int, admit: Callable[[Leases], bool]) -> int:
    """Eight threads, alternating between the hosts, each calling until one is refused or `calls` are made: how many
    were admitted in all."""
    admitted = [0]
    lock = threading.Lock()

    def call(leases: Leases) -> None:
        for _ in range(calls):
            if not admit(leases):
                return
            with lock:
                admitted[0] += 1

    threads = [threading.Thread(target=call, args=(hosts[n % 2],)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    return admitted[0]


def test_a_block_ends_leases_at_once_here_and_within_hold_elsewhere(
    store: SqlKeyStore, other_host: SqlKeyStore
) -> None:
    token = store.create(new_key(1, rpm_limit=1000)).token
    info = store.find(token)
    assert info is not None
    here, there = Leases(store), Leases(other_host, hold=0.3)
    assert [here.admit(info, 0.0) for _ in range(4)] == [None] * 4
    assert [there.admit(info, 0.0) for _ in range(3)] == [None] * 3
    leased = time.monotonic()
    assert there.admit(info, 0.0) is None  # a lease of 4: three calls left in it, for 0.3 s at most
    store.update(token, {"blocked": True})  # through this worker: its store's edits end its leases
    refusal = here.admit(info, 0.0)
    assert refusal is not None and refusal.reason == "blocked"
    time.sleep(max(0.0, leased + 0.3 - time.monotonic()))  # the other host's lease is over by now, whatever is left
    refusal = there.admit(info, 0.0)
    assert refusal is not None and refusal.reason == "blocked"


def test_the_spend_writer_gives_back_unused_calls(store: SqlKeyStore) -> None:
    token = store.create(new_key(1, max_budget=1e9)).token
    info = store.find(token)
    assert info is not None
    leases = Leases(store, hold=0.2)
    writer = SpendWriter(store, leases.unused)
    try:
        for _ in range(4):  # leases of 1, 2 and 4: 7 charged for 4
            assert leases.admit(info, 1.0) is None
            writer.add(Charge("", token, "/r", 200, 1.0, precharged=1.0, seconds=0.0))
        assert window(store, token)[2] == 7.0
        assert wait_until(lambda: window(store, token)[1:] == (4, 4.0), 2)  # the lease's time over: given back
        assert leases.admit(info, 1.0) is None  # asked again: a lease of 1 (the last one outlived its calls)
        writer.add(Charge("", token, "/r", 200, 1.0, precharged=1.0, seconds=0.0))
    finally:
        assert writer.close()  # a worker's exit ends every lease
    assert window(store, token)[1:] == (5, 5.0)
