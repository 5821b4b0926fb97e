"""Calls of a counted key that a worker admits from memory: leases, taken from the store a few calls at a time.

A key with an rpm_limit, a max_budget or an expiry is decided by the store (KeyInfo.counted). Asking it on every
call is a write and two GIL hand-offs per call, a third more CPU than the call itself (bench/). A worker that
calls a key often takes several calls at once instead: one UPDATE counts them all in the key's rpm window and
charges them all, and it passes only if every one of them would have passed one by one (SqlKeyStore.lease). The
worker then admits them from memory for at most HOLD seconds; what it has not used by then goes back to the key
(count and spend) with the next spend log batch (SpendWriter).

What holds as before: no window admits more than rpm_limit calls, and spend never passes max_budget by more than the
one call that crosses it. Blocking, deleting and expiry reach every worker within HOLD, the bound the README gives.
What it costs: for up to HOLD, calls leased by one worker and not used are missing to the others. So a lease is
taken only far from the limits, and is at most 1/SHARE of what the key has left; near a limit, and for a key a
worker calls seldom, every call is decided by the store, one by one, exactly as before.

A key with a tpm_limit is never leased. Its tokens are known only when its calls end, so no lease could know how
much room is left, and calls admitted from memory would pass for up to HOLD after the limit was reached: each of its
calls is decided by the store, which refuses the first one after the window holds tpm_limit tokens.

A route's rpm_limit (windows.py) is leased the same way, by the same rule (admit_route): its window never admits more
than the limit; a busy route with room costs one UPDATE per lease instead of one per call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from passthru.keystore.records import CallStore, KeyInfo, Refusal, Unused

HOLD = 1.0  # seconds a lease is used for: the bound on blocking, deleting and expiry (auth.CACHE_SECONDS)
MOST = 64  # calls in one lease at most
# A lease of n calls needs room for n × SHARE more calls in the key's window and budget: at most 1/SHARE of what is
# left is ever held by one worker, and a key with an rpm_limit under 2 × SHARE is never leased.
SHARE = 64
FORGET_AFTER = 10_000  # keys whose lease size a worker remembers, past which it forgets those without a lease


@dataclass(frozen=True)
class Lease:
    """Calls of one key at one cost, counted and charged by the store, that this worker may still admit."""

    token: str
    cost: float
    calls: int  # how many the store counted
    left: list[None]  # one item per call not yet admitted: list.pop is atomic, so taking one needs no lock
    until: float  # on the monotonic clock
    edits: int  # the store's edits when taken: a key changed by this worker ends its leases at once
    window_start: float | None  # the rpm window they were counted in (None: one call, nothing to give back)
    route: bool = False  # a route's calls (admit_route), not a key's


class Leases:
    """The leases of one worker; `admit` is the whole per-call check of a counted key, `admit_route` the count of a
    route's rpm_limit. A key's slot is (its token, the call's cost), a route's (its path, 0): a path starts with /,
    a token never does, so the two never meet."""

    def __init__(self, store: CallStore, hold: float = HOLD, most: int = MOST) -> None:
        self.store = store
        self.hold = hold
        self.most = most
        self._leases: dict[tuple[str, float], Lease] = {}
        self._locks: dict[tuple[str, float], threading.Lock] = {}
        self._sizes: dict[tuple[str, float], int] = {}  # the size of a key's next lease
        self._no_lease_until: dict[tuple[str, float], float] = {}  # a lease was refused: not asked again before
        self._unused: list[Unused] = []  # calls of ended leases, to give back (guarded by _lock)
        self._lock = threading.Lock()

    def admit(self, info: KeyInfo, cost: float) -> Refusal | None:
        """Admit one call of this counted key from a lease, or ask the store; None when admitted."""
        slot = (info.token, cost)
        lease = self._leases.get(slot)
        if lease is not None and self._take(lease):
            return None
        most = self.most if info.rpm_limit is None else info.rpm_limit // SHARE
        if info.tpm_limit is not None:
            most = 1  # see the module docstring
        one, many = partial(self.store.admit, info.token, cost), partial(self.store.lease, info.token, cost)
        outcome = self._count(slot, most, one, many, False)
        return outcome if isinstance(outcome, Refusal) else None

    def admit_route(self, route: str, limit: int) -> float | Refusal | None:
        """Count one call on a route with an rpm_limit, from a lease or by the store: the start of the window it was
        counted in (to give it back in, give_back_route), None when that is not known, or why not."""
        slot = (route, 0.0)
        lease = self._leases.get(slot)
        if lease is not None and self._take(lease):
            return lease.window_start
        one, many = partial(self.store.routes.admit, route, limit), partial(self.store.routes.lease, route, limit)
        return self._count(slot, limit // SHARE, one, many, True)

    def give_back_route(self, route: str, window_start: float) -> None:
        """A route's call that was counted and did not go upstream (its key refused it): given back with the next
        spend log batch, to the window it was counted in if that still lasts."""
        with self._lock:
            self._unused.append(Unused(route, 1, 0.0, window_start, route=True))

    def _count(
        self,
        slot: tuple[str, float],
        most: int,
        one: Callable[[], float | Refusal | None],
        many: Callable[[int, int, float], float | None],
        route: bool,
    ) -> float | Refusal | None:
        """Take a call from the slot's lease, else ask the store for a lease of the slot's next size (`most` at
        most), else for the call alone: the window it was counted in, or None (admitted all the same), or why not."""
        lock = self._locks.get(slot) or self._locks.setdefault(slot, threading.Lock())
        with lock:  # one thread per slot asks the store; the others then take from the lease it got
            lease = self._leases.get(slot)
            if lease is not None:
                if self._take(lease):
                    return lease.window_start
                self._end(slot, lease)
            started = time.monotonic()  # before the store's clock reads: the lease never outlives HOLD there
            edits = self.store.edits
            size = min(self._sizes.get(slot, 1), most)
            token, cost = slot
            if size > 1 and self._no_lease_until.get(slot, 0.0) <= started:
                window_start = many(size, size * SHARE, self.hold)
                if window_start is not None:
                    left: list[None] = [None] * (size - 1)
                    lease = Lease(token, cost, size, left, started + self.hold, edits, window_start, route)
                    self._start(slot, lease)
                    return window_start
                self._no_lease_until[slot] = started + self.hold  # near a limit: one by one for a while
            outcome = one()
            if isinstance(outcome, Refusal):
                self._sizes[slot] = 1
            else:
                # A lease of one call, used at once: if the next call comes within HOLD, the one after is leased.
                self._start(slot, Lease(token, cost, 1, [], started + self.hold, edits, outcome, route))
            return outcome

    def _start(self, slot: tuple[str, float], lease: Lease) -> None:
        # Another thread may have got a lease meanwhile, if the slot's lock was forgotten (see unused): its calls
        # are kept to give back, never lost.
        current = self._leases.get(slot)
        if current is not None:
            self._end(slot, current)
        self._leases[slot] = lease

    def _take(self, lease: Lease) -> bool:
        if lease.until <= time.monotonic() or lease.edits != self.store.edits:
            return False
        try:
            lease.left.pop()
        except IndexError:
            return False
        return True

    def _end(self, slot: tuple[str, float], lease: Lease) -> None:
        """Forget an used-up or outlived lease, keep its unused calls to give back, and size the next one."""
        if self._leases.get(slot) is lease:
            del self._leases[slot]
        unused = 0
        while True:  # pop, not len(): a thread may still take one meanwhile, and then it is used
            try:
                lease.left.pop()
            except IndexError:
                break
            unused += 1
        if unused and lease.window_start is not None:
            with self._lock:
                self._unused.append(Unused(lease.token, unused, unused * lease.cost, lease.window_start, lease.route))
        used_up_in_time = unused == 0 and lease.until > time.monotonic()
        self._sizes[slot] = min(self.most, 2 * lease.calls) if used_up_in_time else max(1, lease.calls - unused)

    def unused(self, everything: bool = False) -> list[Unused]:
        """End the leases past their time (all of them, `everything`), and hand over the calls to give back.

        SpendWriter calls this each round and writes what it gets with the spend log entries.
        """
        now = time.monotonic()
        for slot, lease in list(self._leases.items()):  # list(): one step under the GIL, while threads add leases
            if everything or lease.until <= now or lease.edits != self.store.edits:
                lock = self._locks.get(slot)
                if lock is not None and lock.acquire(blocking=everything):
                    try:
                        if self._leases.get(slot) is lease:
                            self._end(slot, lease)
                    finally:
                        lock.release()
        if len(self._locks) > FORGET_AFTER:  # keys no longer called: forget their sizes and locks
            for slot in [slot for slot in list(self._locks) if slot not in self._leases]:
                self._locks.pop(slot, None)
                self._sizes.pop(slot, None)
                self._no_lease_until.pop(slot, None)
        with self._lock:
            unused, self._unused = self._unused, []
        return _merged(unused) if len(unused) > 1 else unused


def _merged(unused: list[Unused]) -> list[Unused]:
    """One entry per key or route and window: a route whose calls a busy key keeps refusing gets one UPDATE a batch."""
    sums: dict[tuple[str, float, bool], tuple[int, float]] = {}
    for u in unused:
        calls, amount = sums.get((u.token, u.window_start, u.route), (0, 0.0))
        sums[u.token, u.window_start, u.route] = (calls + u.calls, amount + u.amount)
    return [Unused(token, calls, amount, start, route) for (token, start, route), (calls, amount) in sums.items()]
