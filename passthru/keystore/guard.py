"""Every call into the key store passes here: the driver's errors become KeyStoreError (503), and a store that stalls
or cannot be reached is failed fast instead of pinning the worker's threads.

Without it, a store that stops answering (a blackholed host: no refusal, no reply) held each thread that asked it
for PostgreSQL's connect timeout (5 s), and the threads queued behind them for the pool's timeout (10 s): 128 calls
with unknown keys took every thread of a worker, and master-key calls, which never touch the store, waited behind
them. Now at most as many threads as the pool has connections wait on the store, and only while it makes progress.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.exc import DBAPIError, DisconnectionError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from passthru.errors import KeyStoreError
from passthru.keystore.engine import describe
from passthru.keystore.store import COOL_OFF, UNAVAILABLE

log = logging.getLogger("passthru")

# A thread waits for a free slot only while the store makes progress: if no call entered or left it for this long
# with every slot taken, the store is stalled, and the waiting calls fail. Calls take milliseconds; a SQLite write
# waiting for another process's lock may take longer, and keeps waiting as long as others come and go.
STALL = 1.0


class StoreGuard:
    """`with guard("doing what"):` around each use of the store's engine. At most `slots` threads inside at once: the
    connections the pool holds, so that no thread ever waits in the pool itself, where it could not give up."""

    def __init__(self, slots: int, cool_off: float = COOL_OFF, stall: float = STALL) -> None:
        self.slots = slots
        self.cool_off = cool_off
        self.stall = stall
        self._changed = threading.Condition()
        self._inside = 0
        self._moved = time.monotonic()  # when a call last entered or left: the store was making progress then
        self._down_until = 0.0  # found unreachable: fail at once until then (monotonic clock)
        self._probing = False  # after a cool-off, one call tries the store; the others fail until it is through

    @contextmanager
    def __call__(self, what: str) -> Iterator[None]:
        probe = self._enter()
        reachable = True
        try:
            yield
        except SQLAlchemyError as exc:
            reachable = not unreachable(exc)
            log.warning("key store error while %s: %s", what, describe(exc))
            raise KeyStoreError(UNAVAILABLE) from exc
        finally:
            self._leave(probe, reachable)

    def _enter(self) -> bool:
        """Take a slot; True when this call is the one trying the store after a cool-off."""
        with self._changed:
            now = time.monotonic()
            if now < self._down_until or self._probing:
                raise KeyStoreError(UNAVAILABLE)
            probe = self._down_until > 0.0
            while self._inside >= self.slots:
                waited = now - self._moved
                if waited >= self.stall:
                    raise KeyStoreError(UNAVAILABLE)
                self._changed.wait(self.stall - waited)
                now = time.monotonic()
                if now < self._down_until:
                    raise KeyStoreError(UNAVAILABLE)
            self._inside += 1
            self._moved = now
            self._probing = probe
            return probe

    def _leave(self, probe: bool, reachable: bool) -> None:
        with self._changed:
            self._inside -= 1
            self._moved = time.monotonic()
            if probe:
                self._probing = False
            if not reachable:
                if self._down_until <= self._moved:
                    log.warning("key store unreachable: calls that need it fail at once for %g s", self.cool_off)
                self._down_until = self._moved + self.cool_off
            elif probe:
                self._down_until = 0.0
            # A slot is free; and once the store is found down, every waiter fails at once rather than at its stall.
            self._changed.notify() if reachable else self._changed.notify_all()


def unreachable(exc: SQLAlchemyError) -> bool:
    """Whether the error says the store cannot be reached: a connection that could not be made (the driver's error
    has no statement then), or one the driver reports lost. Not an error a statement got from a store that answered
    (a SQLite lock waited for in vain, a missing table): those fail their own call only."""
    if isinstance(exc, (DisconnectionError, PoolTimeout)):
        return True
    return isinstance(exc, DBAPIError) and (exc.connection_invalidated or exc.statement is None)
