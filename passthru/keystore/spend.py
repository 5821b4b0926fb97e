"""The spend log's writer: finished calls queue their charge; one thread per worker writes them in batches.

Writing each entry on the request's own thread cost a second write transaction per call, more than the rest of
the key check together. Here a call pays for an id and an append to a queue; the entries reach the store within
about INTERVAL, a few hundred per transaction, with what each key is still owed summed per key (records.Tally).
"""

from __future__ import annotations

import atexit
import logging
import math
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from passthru.errors import KeyStoreError
from passthru.keystore.records import CallStore, Charge, SpendEntry, Tally, Unused

log = logging.getLogger("passthru")

INTERVAL = 0.05  # seconds between two batches while entries keep coming
BATCH = 500  # entries per transaction at most
BACKLOG = 100_000  # entries kept while the store is down; past that the oldest are dropped (and said so)
# An answer's usage is believed up to this many tokens per count: the columns are 64-bit, and a key's totals sum them.
MAX_TOKENS = 2**53
MAX_CALL_ID = 128  # the call_id column; x-request-id is at most this long (exchange.SANE_REQUEST_ID)
MAX_NAME = 255  # a model's or a target's name, as logged


def entry_id(now: float) -> str:
    """A spend log entry's id: a UUIDv7 (RFC 9562), the time in milliseconds and then random bits.

    Time-ordered, so the log's primary key grows at its end. Random (v4) ids land all over an index that outgrows
    SQLite's page cache: 2.6 times the CPU per entry by 350,000 entries, 2.9 by 1.5 million, where v7 stays flat
    (bench/spend_log_ids.py).

    Its random bits come from `random`, not os.urandom, which would let go of the GIL on every call (random is
    reseeded in each forked worker).
    """
    value = (int(now * 1000) << 80) | random.getrandbits(80)
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # the RFC's variant
    return str(uuid.UUID(int=value))


class SpendWriter:
    """Queues entries from any thread; a daemon thread, started on first use (after gunicorn forks), writes them."""

    def __init__(self, store: CallStore, unused: Callable[[bool], list[Unused]] | None = None) -> None:
        self.store = store
        # Leased calls to give back (Leases.unused): asked each round, written with the entries.
        self._unused_source = unused
        self._unused: list[Unused] = []  # asked for, not yet written (only the writing thread touches it)
        self._ending = False  # the worker is exiting: every lease ends and gives back what is left
        # Each call's entry id, when its answer ended, and its charge. The id is made when it is queued: a batch that
        # failed midway is retried with the same ids, which the store then skips (SqlKeyStore.record).
        self._pending: deque[tuple[str, float, Charge]] = deque()  # append and popleft are atomic: no lock needed
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._lock = threading.Lock()  # guards starting the thread
        self._thread: threading.Thread | None = None
        self._dropped = 0
        self._closed = False

    def add(self, charge: Charge) -> None:
        """Queue a call that just finished: its spend log entry, and what its key (if any) is still owed: the spend
        not charged at admission, and its tokens, all added when the entry is written."""
        now = time.time()
        self._idle.clear()  # before the append: flush() must not see "idle" with this entry unwritten
        self._pending.append((entry_id(now), now, charge))
        if len(self._pending) > BACKLOG:
            self._pending.popleft()
            self._dropped += 1
        if self._thread is None:
            self.start()
        if len(self._pending) >= BATCH:
            self._wake.set()

    def start(self) -> None:
        """Start the writing thread, once: in the process that serves, after gunicorn forked."""
        with self._lock:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="passthru-spend-log", daemon=True)
                thread.start()
                self._thread = thread  # once started: close() may join it from another thread
                atexit.register(self._end)  # a worker that exits cleanly writes what it still holds

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(INTERVAL)
            self._wake.clear()
            self._write()

    def _write(self) -> None:
        if self._unused_source is not None:
            self._unused.extend(self._unused_source(self._ending))
        while self._pending or self._unused:
            batch = [self._pending.popleft() for _ in range(min(BATCH, len(self._pending)))]
            entries = [_entry(ident, ended, charge) for ident, ended, charge in batch]
            logged = [entry for entry, (_, _, charge) in zip(entries, batch, strict=True) if charge.logged]
            try:
                self.store.record(logged, _tallies(entries, batch), self._unused)
            except KeyStoreError:
                # Already logged by the store; keep the entries (in order) and try again next round.
                self._pending.extendleft(reversed(batch))
                return
            except Exception:
                log.exception(
                    "spend log entries dropped: %d; unused leased calls not given back: %d",
                    len(batch),
                    len(self._unused),
                )
            self._unused = []
        if self._dropped:
            log.warning("spend log: %d entries dropped while the key store was unavailable", self._dropped)
            self._dropped = 0
        if not self._pending and not self._unused:
            self._idle.set()

    def flush(self, timeout: float = 5.0) -> bool:
        """Write everything queued so far, the batch being written included; False if not done within `timeout`."""
        deadline = time.monotonic() + timeout
        while not (self._idle.is_set() and not self._pending) and time.monotonic() < deadline:
            if self._thread is None or not self._thread.is_alive():
                self._write()  # no thread (never started, or the interpreter is exiting): write here
                if self._pending:
                    time.sleep(0.05)  # the store is down: try again until the deadline
                continue
            self._wake.set()
            if not self._idle.wait(min(0.1, max(0.0, deadline - time.monotonic()))) or self._pending:
                time.sleep(0.001)
        return self._idle.is_set() and not self._pending

    def _end(self, timeout: float = 5.0) -> bool:
        """Flush, every lease ended and given back first: the process is exiting."""
        self._ending = True
        self._idle.clear()  # a round must run, to end the leases, even with no entry queued
        return self.flush(timeout)

    def close(self, timeout: float = 5.0) -> bool:
        """Flush, then stop the thread: the store can be closed after this (an app thrown away, tests, reload)."""
        atexit.unregister(self._end)
        done = self._end(timeout)
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        return done


def _entry(ident: str, ended: float, charge: Charge) -> SpendEntry:
    """The call's spend log entry. What an upstream's answer said (usage, model) is bounded here, so that no value can
    make the store refuse a batch, which would then be retried for ever: a count out of range is unknown, a spend
    that is not a number is 0, a name loses its control characters."""
    return SpendEntry(
        ident, charge.token, charge.route, charge.status, _amount(charge.spend), ended - charge.seconds,
        charge.seconds, _name(charge.request_id, MAX_CALL_ID) or None, _name(charge.model, MAX_NAME),
        _count(charge.prompt_tokens), _count(charge.completion_tokens), _count(charge.total_tokens),
        _name(charge.target, MAX_NAME),
    )  # fmt: skip


def _tallies(entries: list[SpendEntry], batch: list[tuple[str, float, Charge]]) -> dict[str, Tally]:
    """What the batch adds to each key: spend not charged at admission, and tokens (the master key's hash matches
    no key, and open routes' calls have none: their entries charge nothing)."""
    sums: dict[str, list[Any]] = {}
    for entry, (_, _, charge) in zip(entries, batch, strict=True):
        if entry.token is None:
            continue
        owed = entry.spend - _amount(charge.precharged)
        prompt, completion = entry.prompt_tokens or 0, entry.completion_tokens or 0
        # What tpm_limit counts: the answer's total, or the parts it gave.
        tokens = entry.total_tokens if entry.total_tokens is not None else prompt + completion
        if owed or tokens or prompt or completion:
            tally = sums.get(entry.token) or sums.setdefault(entry.token, [0.0, 0, 0, 0])
            tally[0] += owed
            tally[1] += prompt
            tally[2] += completion
            tally[3] += tokens
    return {token: Tally(*tally) for token, tally in sums.items()}


def _amount(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def _count(value: int | None) -> int | None:
    return value if type(value) is int and 0 <= value <= MAX_TOKENS else None  # not a bool either


def _name(value: str | None, most: int) -> str | None:
    if value is None or (value.isascii() and value.isprintable()):
        return value if value is None else value[:most]
    # Printable only: no NUL (PostgreSQL's text refuses it), no lone surrogate (UTF-8 cannot encode it).
    return "".join(ch for ch in value[: 4 * most] if ch.isprintable())[:most]
