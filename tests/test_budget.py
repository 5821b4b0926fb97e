"""Budget periods (budget_duration, keystore/budget.py): when a key's spend goes back to 0, and that it does so exactly
once however many hosts find the reset due, whether the key is called or only read."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from test_store import new_key

from passthru.keystore import budget
from passthru.keystore.records import KeyInfo, Unused
from passthru.keystore.schema import keys, store_now
from passthru.keystore.sql import SqlKeyStore


def at(*fields: int) -> float:
    return datetime(*fields, tzinfo=UTC).timestamp()  # type: ignore[arg-type,misc]


@pytest.mark.parametrize(
    ("start", "duration", "now", "expected"),
    [
        pytest.param(at(2026, 1, 1), "30s", at(2026, 1, 1), at(2026, 1, 1, 0, 0, 30), id="one-period-from-now"),
        pytest.param(at(2026, 1, 1), "1d", at(2026, 1, 3, 5), at(2026, 1, 4), id="late-keeps-the-schedule"),
        pytest.param(at(2026, 1, 1), "7d", at(2026, 1, 8), at(2026, 1, 15), id="due-exactly-now"),
        pytest.param(at(2026, 1, 31, 12), "1mo", at(2026, 1, 31, 12), at(2026, 2, 28, 12), id="month-end"),
        pytest.param(at(2028, 1, 31), "1mo", at(2028, 2, 1), at(2028, 2, 29), id="leap-february"),
        pytest.param(at(2026, 1, 31), "1mo", at(2026, 3, 1), at(2026, 3, 31), id="day-kept-from-start"),
        pytest.param(at(2026, 12, 15), "1mo", at(2026, 12, 15), at(2027, 1, 15), id="december"),
        pytest.param(at(2026, 11, 15), "2mo", at(2027, 5, 20), at(2027, 7, 15), id="months-late"),
        pytest.param(at(2026, 3, 1), "1mo", at(2026, 3, 31), at(2026, 4, 1), id="not-30-days"),
    ],
)
def test_the_next_reset(start: float, duration: str, now: float, expected: float) -> None:
    """Counted from the reset that was due, by whole periods, past now; "mo" is a calendar month, as in LiteLLM."""
    assert budget.next_reset(start, duration, now) == expected


def due(store: SqlKeyStore, token: str, ago: float = 10.0) -> float:
    """Make the key's budget reset due, `ago` seconds in the past on the store's clock; that reset time."""
    with store.engine.begin() as conn:
        seen = conn.scalar(sa.select(store_now())) - ago  # type: ignore[operator]
        conn.execute(sa.update(keys).where(keys.c.token == token).values(budget_reset_at=seen))
    return float(seen)


def test_a_key_created_or_updated_with_a_period_resets_one_period_later(store: SqlKeyStore) -> None:
    info = store.create(new_key(1, budget_duration="1h"))
    assert info.budget_duration == "1h" and info.budget_reset_at is not None
    assert 3590 < info.budget_reset_at - info.created_at <= 3600.01
    updated = store.update(info.token, {"budget_duration": "1mo"})
    assert updated is not None and updated.budget_reset_at is not None
    assert 28 * 86400 - 10 < updated.budget_reset_at - info.created_at <= 31 * 86400 + 10
    cleared = store.update(info.token, {"budget_duration": None})
    assert cleared is not None and (cleared.budget_duration, cleared.budget_reset_at) == (None, None)


def test_the_reset_happens_when_the_key_is_called(store: SqlKeyStore) -> None:
    token = store.create(new_key(1, max_budget=5.0, budget_duration="1d")).token
    assert [store.admit(token, 2.5) for _ in range(2)] == [None, None]
    assert store.admit(token, 2.5).reason == "budget"  # type: ignore[union-attr]
    seen = due(store, token)
    assert store.admit(token, 2.5) is None  # the new period's first call
    assert stored(store, token) == (2.5, seen + 86400)
    under = store.create(new_key(2, max_budget=5.0, budget_duration="1d")).token
    assert store.admit(under, 1.0) is None
    seen = due(store, under)
    assert store.admit(under, 2.0) is None  # charged in the new period, not in the old one before its reset
    assert stored(store, under) == (2.0, seen + 86400)


def test_the_reset_happens_when_the_key_is_only_read(store: SqlKeyStore) -> None:
    one = store.create(new_key(1, budget_duration="30d")).token
    two = store.create(new_key(2, budget_duration="1h", key_alias="two")).token
    for token in (one, two):
        store.update(token, {"spend": 7.0})
    seen_one, seen_two = due(store, one), due(store, two, ago=7200.5)
    info = store.find(one)
    assert info is not None and info.spend == 0.0 and info.budget_reset_at == seen_one + 30 * 86400
    [listed] = store.page(1, 10, key_alias="two")[0]
    assert listed.spend == 0.0 and listed.budget_reset_at == seen_two + 3 * 3600  # three periods on: past now
    assert stored(store, two) == (0.0, seen_two + 3 * 3600)


def test_leased_calls_given_back_after_a_reset_do_not_make_spend_negative(store: SqlKeyStore) -> None:
    """A lease charged its calls in the old period; what it did not use goes back after the reset: the new period
    was never charged for them, so its spend stays at 0 rather than going below."""
    token = store.create(new_key(1, max_budget=1e6, budget_duration="1d")).token
    start = store.lease(token, 1.0, 8, 8, 1.0)
    assert start is not None and stored(store, token)[0] == 8.0
    due(store, token)
    assert store.find(token).spend == 0.0  # type: ignore[union-attr]
    store.record([], None, [Unused(token, 5, 5.0, start)])
    assert stored(store, token)[0] == 0.0


def test_hosts_finding_one_reset_due_make_it_exactly_once(
    store: SqlKeyStore, other_host: SqlKeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both hosts see the reset due before either makes it; one admits a call in the new period before the other
    tries: that call's charge must survive. Counted: exactly one UPDATE moved budget_reset_at."""
    token = store.create(new_key(1, max_budget=100.0, budget_duration="1d")).token
    store.update(token, {"spend": 50.0})
    seen = due(store, token)
    both_saw_it, charged = threading.Barrier(2), threading.Event()
    made: list[tuple[str, bool]] = []
    real = SqlKeyStore._reset

    def racing(self: SqlKeyStore, *args: object) -> bool:
        both_saw_it.wait(10)
        if self is other_host:
            charged.wait(10)  # the first host has reset the key and charged a call in the new period
        won = real(self, *args)  # type: ignore[arg-type]
        made.append(("here" if self is store else "there", won))
        return won

    monkeypatch.setattr(SqlKeyStore, "_reset", racing)

    def call_here() -> None:
        assert store.admit(token, 1.0) is None
        charged.set()

    found: list[KeyInfo | None] = []
    threads = [
        threading.Thread(target=call_here),
        threading.Thread(target=lambda: found.append(other_host.find(token))),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(made) == [("here", True), ("there", False)]
    assert found[0] is not None and found[0].spend == 1.0  # the other host reads the new period, not a second reset
    assert stored(store, token) == (1.0, seen + 86400)


def stored(store: SqlKeyStore, token: str) -> tuple[float, float | None]:
    """The key's spend and budget_reset_at as stored, read without the reset a read would make."""
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(keys.c.spend, keys.c.budget_reset_at).where(keys.c.token == token)).one()
    return row[0], row[1]
