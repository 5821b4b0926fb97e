"""The spend log writer: batches off the request thread, charges keys what admission did not, counts tokens, keeps
entries while the store is down, bounded."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from upstream import wait_until

from passthru.errors import KeyStoreError
from passthru.exchange import Exchange
from passthru.keystore import spend
from passthru.keystore.records import Charge, NewKey, SpendEntry, Tally, Unused
from passthru.keystore.schema import keys
from passthru.keystore.spend import SpendWriter
from passthru.keystore.sql import SqlKeyStore, open_store
from passthru.keystore.store import spend_recorder
from passthru.pricing import Prices, Pricing
from passthru.tracing import begin


def call(token: str | None, route: str = "/r", spend: float = 0.0, precharged: float = 0.0, **usage: Any) -> Charge:
    """A finished call's charge: `spend` in all, `precharged` of it paid at admission."""
    return Charge("", token, route, 200, spend, precharged, 0.01, **usage)


@pytest.fixture
def writer(store: SqlKeyStore) -> Iterator[SpendWriter]:
    """A spend writer on the store (each backend), closed (everything written) at the end."""
    writer = SpendWriter(store)
    try:
        yield writer
    finally:
        writer.close()


class FlakyStore:
    """Just the KeyStore's `record`: refuses the first `failures` batches as an unreachable store would."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.batches: list[list[SpendEntry]] = []
        self.lock = threading.Lock()

    def record(
        self, entries: Sequence[SpendEntry], charges: Mapping[str, Tally] | None = None, unused: Sequence[Unused] = ()
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
            writer.add(Charge(f"call-{n}", token, f"/r{n}", 200, 0.5, precharged=0.5, seconds=0.01))
        assert writer.flush(10)
        entries = store.spend_logs(token, None, None, 5000)
        assert len(entries) == 1200 and len({e.request_id for e in entries}) == 1200
        assert {e.call_id for e in entries} == {f"call-{n}" for n in range(1200)}  # the caller's ids, kept apart
        assert {e.spend for e in entries} == {0.5} and all(e.duration == 0.01 for e in entries)
        assert store.find(token).spend == 0.0  # all of it charged at admission (not here)
    finally:
        writer.close()
        store.close()


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


def test_keys_are_charged_what_admission_did_not_charge(store: SqlKeyStore, writer: SpendWriter) -> None:
    """A key without limits paid nothing at admission: its calls' whole spend is added with their entries. A counted
    key paid cost_per_request at admission: only the rest (the tokens' part) is added at the end. Summed per key, in
    the transaction that writes the entries, batch after batch."""
    one, two, three = (store.create(NewKey(token=c * 64, key_name=f"sk-...{c * 4}")).token for c in "abc")
    for n in range(700):  # more than one batch
        writer.add(call(one, spend=0.25))
        writer.add(call(two, spend=1.0, precharged=1.0 if n % 2 else 0.0))  # odd ones paid at admission
        writer.add(call(three, spend=1.0, precharged=0.25))
    assert writer.flush(10)
    assert store.find(one).spend == pytest.approx(175.0)  # type: ignore[union-attr]
    assert store.find(two).spend == pytest.approx(350.0)  # type: ignore[union-attr]
    assert store.find(three).spend == pytest.approx(525.0)  # type: ignore[union-attr]
    logged = store.spend_logs(None, None, None, 5000)
    assert len(logged) == 2100 and {e.spend for e in logged if e.token == three} == {1.0}  # the call's whole cost


def tokens_window(store: SqlKeyStore, token: str) -> tuple[float, int]:
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(keys.c.token_window_start, keys.c.token_window_count)
                           .where(keys.c.token == token)).one()  # fmt: skip
    return row[0], row[1]


def test_tokens_are_summed_per_key_and_unknown_usage_stays_unknown(store: SqlKeyStore, writer: SpendWriter) -> None:
    token = store.create(NewKey(token="a" * 64, key_name="sk-...aaaa")).token
    other = store.create(NewKey(token="b" * 64, key_name="sk-...bbbb")).token
    for _ in range(600):  # more than one batch
        writer.add(call(token, model="m", prompt_tokens=3, completion_tokens=4, total_tokens=7))
    writer.add(call(token, model="m", prompt_tokens=10, completion_tokens=5))  # no total: its parts count
    writer.add(call(token, route="/unknown"))  # the answer said nothing about usage
    writer.add(call(other, total_tokens=9))  # a total alone
    assert writer.flush(10)
    info = store.find(token)
    assert info is not None
    assert (info.prompt_tokens, info.completion_tokens, info.total_tokens) == (1810, 2405, 4215)
    assert tokens_window(store, token)[1] == 4215  # tpm_limit's window counts them too
    found = store.find(other)
    assert found is not None and (found.prompt_tokens, found.completion_tokens, found.total_tokens) == (0, 0, 9)
    logged = {e.route: e for e in store.spend_logs(token, None, None, 5000)}
    unknown = logged["/unknown"]
    assert (unknown.model, unknown.prompt_tokens, unknown.completion_tokens, unknown.total_tokens) == (None,) * 4
    parts = [e for e in store.spend_logs(token, None, None, 5000) if e.prompt_tokens == 10]
    assert [(e.completion_tokens, e.total_tokens) for e in parts] == [(5, None)]  # not made up in the log


def test_open_routes_and_the_master_key_are_logged_and_charge_nothing(store: SqlKeyStore, writer: SpendWriter) -> None:
    token = store.create(NewKey(token="a" * 64, key_name="sk-...aaaa")).token
    master = "f" * 64  # what auth gives for the master key's calls: its hash, which names no key
    writer.add(call(None, route="/open", spend=2.0, total_tokens=100, target="primary"))
    writer.add(call(master, route="/paid", spend=3.0, total_tokens=100))
    writer.add(call(token, route="/paid", spend=1.0))
    assert writer.flush(10)
    logged = {e.token: e for e in store.spend_logs(None, None, None, 100)}
    assert set(logged) == {None, master, token}
    assert (logged[None].route, logged[None].spend, logged[None].target) == ("/open", 2.0, "primary")
    assert logged[master].total_tokens == 100
    info = store.find(token)
    assert info is not None and (info.spend, info.total_tokens) == (1.0, 0)
    assert store.find(master) is None
    assert [e.route for e in store.spend_logs(master, None, None, 100)] == ["/paid"]


@pytest.mark.parametrize(
    ("usage", "logged"),
    [
        pytest.param({"prompt_tokens": 2**63}, {"prompt_tokens": None}, id="tokens-past-64-bits"),
        pytest.param({"total_tokens": -1}, {"total_tokens": None}, id="negative-tokens"),
        pytest.param({"completion_tokens": True}, {"completion_tokens": None}, id="bool-tokens"),
        pytest.param({"spend": float("nan")}, {"spend": 0.0}, id="nan-spend"),
        pytest.param({"spend": float("inf")}, {"spend": 0.0}, id="infinite-spend"),
        pytest.param({"model": "gpt\x00-4\ud800"}, {"model": "gpt-4"}, id="nul-and-surrogate"),
        pytest.param({"model": "m" * 5000}, {"model": "m" * 255}, id="long-model"),
        pytest.param({"request_id": "r" * 500}, {"call_id": "r" * 128}, id="long-call-id"),
    ],
)
def test_what_an_answer_says_cannot_stop_the_writer(
    store: SqlKeyStore, writer: SpendWriter, usage: dict[str, Any], logged: dict[str, Any]
) -> None:
    """Usage comes from upstream answers: a value the store would refuse would make its batch fail, and be retried
    for ever, holding up every entry after it. Such values are bounded, and the entries after it written."""
    token = store.create(NewKey(token="a" * 64, key_name="sk-...aaaa")).token
    fields = {"request_id": "", "token": token, "route": "/bad", "status": 200, "spend": 1.0, "precharged": 0.0,
              "seconds": 0.0, **usage}  # fmt: skip
    writer.add(Charge(**fields))
    writer.add(call(token, route="/after", spend=1.0))
    assert writer.flush(10)
    entries = {e.route: e for e in store.spend_logs(token, None, None, 10)}
    assert set(entries) == {"/bad", "/after"}
    assert {name: getattr(entries["/bad"], name) for name in logged} == logged
    info = store.find(token)
    assert info is not None and info.spend == 1.0 + entries["/bad"].spend


def test_entries_are_kept_in_order_while_the_store_is_down() -> None:
    store = FlakyStore(failures=3)
    writer = SpendWriter(store)  # type: ignore[arg-type]
    for n in range(5):
        writer.add(call("t" * 64, f"/{n}"))
    assert wait_until(lambda: store.written() == [f"/{n}" for n in range(5)], 5)
    writer.close()


def test_callers_arriving_together_start_one_writer_thread() -> None:
    """The first entries of a worker come from many request threads at once: exactly one writer thread starts, and
    every entry is written once."""
    store = FlakyStore()
    writer = SpendWriter(store)  # type: ignore[arg-type]
    callers = 32
    barrier = threading.Barrier(callers)

    def finish(n: int) -> None:
        barrier.wait(5)
        writer.add(call("t" * 64, f"/{n}"))

    before = set(threading.enumerate())
    threads = [threading.Thread(target=finish, args=(n,)) for n in range(callers)]
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
    writer.add(call("t" * 64, "/x"))
    assert writer.flush(0.3) is False
    writer.close(0.1)


def test_the_backlog_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spend, "BACKLOG", 10)
    store = FlakyStore(failures=10**6)
    writer = SpendWriter(store)  # type: ignore[arg-type]
    for n in range(25):
        writer.add(call("t" * 64, f"/{n}"))
    # At most BACKLOG queued, plus one batch the writer thread may hold while its write fails.
    assert len(writer._pending) <= 2 * 10
    store.failures = 0
    assert writer.flush(5)
    assert store.written()[-1] == "/24" and len(store.written()) <= 2 * 10  # the newest are kept
    writer.close()


def test_a_calls_entry_names_the_target_that_answered() -> None:
    """The recorder's part of a finished exchange (keystore/store.py): the target's name, never its URL."""
    charges: list[Charge] = []
    store = SimpleNamespace(open=lambda: SimpleNamespace(spend=SimpleNamespace(add=charges.append)))
    exchange = Exchange("POST", "/chat", "rid-1", 0.0, begin({}), route="/chat", pricing=Pricing(0.0, Prices(), {}),
                        target="openai-b", attempts=2, status=200)  # fmt: skip
    spend_recorder(store, "m" * 64, True)(exchange)  # type: ignore[arg-type]
    assert [(charge.route, charge.target, charge.status) for charge in charges] == [("/chat", "openai-b", 200)]
