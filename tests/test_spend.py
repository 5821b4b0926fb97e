"""The spend log writer: batches off the request thread, keeps entries while the store is down, bounded."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from upstream import wait_until

from passthru.errors import KeyStoreError
from passthru.keystore import spend
from passthru.keystore.records import Charge, NewKey, SpendEntry, Unused
from passthru.keystore.spend import SpendWriter
from passthru.keystore.sql import open_store


class FlakyStore:
    """Just the KeyStore's `record`: refuses the first `failures` batches as an unreachable store would."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.batches: list[list[SpendEntry]] = []
        self.lock = threading.Lock()

    def record(
        self, entries: Sequence[SpendEntry], charges: Mapping[str, float] | None = None, unused: Sequence[Unused] = ()
    ) -> None:
        with self.lock:
            if self.failures:
                self.failures -= 1
                raise KeyStoreError("the key store is unavailable; try again shortly")
            self.batches.append(list(entries))

    def written(self) -> list[str]:
        with self.lock:
            return [entry.route for batch in self.batches for entry in batch]


def test_entries_reach_a_real_store_in_batches(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'k.db'}")
    writer = SpendWriter(store)
    try:
        token = store.create(NewKey(token="a" * 64, key_name="sk-...aaaa")).token
        for n in range(1200):
            writer.add(Charge("", token, f"/r{n}", 200, 0.5, 0.5, 0.01))
        assert writer.flush(10)
        entries = store.spend_logs(token, None, None, 5000)
        assert len(entries) == 1200 and len({e.request_id for e in entries}) == 1200
        assert {e.spend for e in entries} == {0.5} and all(e.duration == 0.01 for e in entries)
        assert store.find(token).spend == 0.0  # charged at admission (not here) unless the entry says otherwise
    finally:
        writer.close()


def test_entry_ids_are_uuid7_in_time_order() -> None:
    """Ids made later sort later (the log's primary key grows at its end); each is a valid UUIDv7 carrying its
    millisecond, and ids of the same millisecond still differ."""
    start = 1_764_000_000.0
    times = [start + n * 0.0004 for n in range(5000)]  # 2.5 ids a millisecond
    ids = [spend.entry_id(t) for t in times]
    assert len(set(ids)) == len(ids)
    # As text, the way the database's index orders them: every id of a millisecond before those of the next.
    assert [uuid.UUID(ident).int >> 80 for ident in sorted(ids)] == [int(t * 1000) for t in times]
    for ident, t in zip(ids[:50], times, strict=False):
        parsed = uuid.UUID(ident)
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122 and str(parsed) == ident
        assert parsed.int >> 80 == int(t * 1000)


def test_uncharged_costs_reach_the_key_with_the_entries(tmp_path: Path) -> None:
    """A key without limits is not charged at admission: its calls' costs are added with their entries, summed per
    key, in the transaction that writes the entries."""
    store = open_store(f"sqlite:///{tmp_path / 'k.db'}")
    writer = SpendWriter(store)
    try:
        one = store.create(NewKey(token="a" * 64, key_name="sk-...aaaa")).token
        two = store.create(NewKey(token="b" * 64, key_name="sk-...bbbb")).token
        for n in range(700):  # more than one batch
            writer.add(Charge("", one, f"/r{n}", 200, 0.25, 0.0, 0.01))
            writer.add(
                Charge("", two, f"/r{n}", 200, 1.0, 0.0 if n % 2 == 0 else 1.0, 0.01)
            )  # odd ones were charged at admission
        assert writer.flush(10)
        assert store.find(one).spend == pytest.approx(175.0)
        assert store.find(two).spend == pytest.approx(350.0)
        assert len(store.spend_logs(None, None, None, 5000)) == 1400
    finally:
        writer.close()
        store.close()


def test_entries_are_kept_in_order_while_the_store_is_down() -> None:
    store = FlakyStore(failures=3)
    writer = SpendWriter(store)  # type: ignore[arg-type]
    for n in range(5):
        writer.add(Charge("", "t" * 64, f"/{n}", 200, 0.0, 0.0, 0.0))
    assert wait_until(lambda: store.written() == [f"/{n}" for n in range(5)], 5)
    writer.close()


def test_callers_arriving_together_start_one_writer_thread() -> None:
    """The first entries of a worker come from many request threads at once: exactly one writer thread starts, and
    every entry is written once."""
    store = FlakyStore()
    writer = SpendWriter(store)  # type: ignore[arg-type]
    callers = 32
    barrier = threading.Barrier(callers)

    def call(n: int) -> None:
        barrier.wait(5)
        writer.add(Charge("", "t" * 64, f"/{n}", 200, 0.0, 0.0, 0.0))

    before = set(threading.enumerate())
    threads = [threading.Thread(target=call, args=(n,)) for n in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    try:
        started = [t for t in threading.enumerate() if t.name == "passthru-spend-log" and t not in before]
        assert len(started) == 1
        assert writer.flush(5)
        assert sorted(store.written()) == sorted(f"/{n}" for n in range(callers))
    finally:
        writer.close()


def test_flush_gives_up_after_its_timeout() -> None:
    store = FlakyStore(failures=10**6)
    writer = SpendWriter(store)  # type: ignore[arg-type]
    writer.add(Charge("", "t" * 64, "/x", 200, 0.0, 0.0, 0.0))
    assert writer.flush(0.3) is False
    writer.close(0.1)


def test_the_backlog_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spend, "BACKLOG", 10)
    store = FlakyStore(failures=10**6)
    writer = SpendWriter(store)  # type: ignore[arg-type]
    for n in range(25):
        writer.add(Charge("", "t" * 64, f"/{n}", 200, 0.0, 0.0, 0.0))
    # At most BACKLOG queued, plus one batch the writer thread may hold while its write fails.
    assert len(writer._pending) <= 2 * 10
    store.failures = 0
    assert writer.flush(5)
    assert store.written()[-1] == "/24" and len(store.written()) <= 2 * 10  # the newest are kept
    writer.close()
