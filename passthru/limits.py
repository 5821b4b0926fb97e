"""What a call must pass before it goes upstream besides its key (issue 15): its route's max_parallel_requests and
rpm_limit, and its key's max_parallel_requests. Bound per route at start-up; held by each admitted call until its
answer ends.

The order (auth.Authenticator.admit): the key is identified first (401, 403: from memory, nothing counted), then
these, cheapest first: the route's calls in flight and the key's (this host's lock files, slots.py), then the
route's rpm_limit (the key store, or a lease of it). Then the key's own limits are counted, last, so a call refused
here costs its key nothing (no rpm count, no spend). A call the key's limits then refuse lets go of what it held
and is given back to the route's window, so that a key hammering its own limit does not use up the route's.
"""

from __future__ import annotations

from passthru.config import Endpoint
from passthru.errors import RateLimited
from passthru.exchange import Exchange
from passthru.keystore.records import KeyInfo, Refusal, Store
from passthru.slots import SlotFile, region_of, region_of_token

# A call in flight ends in anything from milliseconds to minutes: a slot is worth asking for again after a second.
PARALLEL_RETRY_AFTER = 1


class Limits:
    """One route's limits, and its callers' max_parallel_requests: `enter` before the call's key is counted."""

    def __init__(self, endpoint: Endpoint, store: Store | None, route_slots: SlotFile, key_slots: SlotFile) -> None:
        self.route = endpoint.path
        self.rpm_limit = endpoint.limits.rpm_limit
        self.parallel = endpoint.limits.max_parallel_requests
        self.store = store  # set whenever rpm_limit is (config.py opens a store for it)
        self.region = region_of(endpoint.path)
        self.route_slots = route_slots
        self.key_slots = key_slots

    def enter(self, info: KeyInfo | None) -> Held | None:
        """Take a slot of the route and of the key (`info`; None: the master key, or an open route) and count the
        call in the route's rpm window: what the call then holds, or None when it holds nothing. RateLimited (429)
        when one of them is full, having let go of the others."""
        route_slot = key_slot = None
        key_region = 0
        if self.parallel is not None:
            route_slot = self.route_slots.take(self.region, self.parallel)
            if route_slot is None:
                raise RateLimited(f"Rate limit exceeded: {self.route} has its max_parallel_requests calls in flight; "
                                  f"retry in {PARALLEL_RETRY_AFTER}s", retry_after=PARALLEL_RETRY_AFTER,
                                  limit="max_parallel_requests")  # fmt: skip
        if info is not None and info.max_parallel_requests is not None:
            key_region = region_of_token(info.token)
            key_slot = self.key_slots.take(key_region, info.max_parallel_requests)
            if key_slot is None:
                self.let_go(route_slot, key_region, None)
                raise RateLimited("Rate limit exceeded: this key has its max_parallel_requests calls in flight; "
                                  f"retry in {PARALLEL_RETRY_AFTER}s", retry_after=PARALLEL_RETRY_AFTER,
                                  limit="key_max_parallel_requests")  # fmt: skip
        window: float | None = None
        if self.rpm_limit is not None:
            assert self.store is not None
            try:
                counted = self.store.open().leases.admit_route(self.route, self.rpm_limit)
            except BaseException:  # the store is unavailable (503): the call is not made, its slots are free
                self.let_go(route_slot, key_region, key_slot)
                raise
            if isinstance(counted, Refusal):
                self.let_go(route_slot, key_region, key_slot)
                raise RateLimited(f"Rate limit exceeded: {self.route}'s rpm_limit is reached; retry in "
                                  f"{counted.retry_after}s", retry_after=counted.retry_after,
                                  limit="rpm_limit")  # fmt: skip
            window = counted
        if route_slot is None and key_slot is None and window is None:
            return None
        return Held(self, route_slot, key_region, key_slot, window)

    def let_go(self, route_slot: int | None, key_region: int, key_slot: int | None) -> None:
        """Give back a call's slots (None: it took none there)."""
        if route_slot is not None:
            self.route_slots.give(self.region, route_slot)
        if key_slot is not None:
            self.key_slots.give(key_region, key_slot)


class Held:
    """What one admitted call holds: slots until its answer ends (release), and its count in the route's rpm window,
    given back when its key refuses it after all (undo)."""

    __slots__ = ("limits", "route_slot", "key_region", "key_slot", "window", "_done")

    def __init__(
        self, limits: Limits, route_slot: int | None, key_region: int, key_slot: int | None, window: float | None
    ) -> None:
        self.limits = limits
        self.route_slot = route_slot
        self.key_region = key_region
        self.key_slot = key_slot
        self.window = window  # the rpm window the call was counted in, when known for sure (windows.py)
        self._done = False

    def release(self) -> None:
        """Let go of the slots (once): the call's answer is over."""
        if not self._done:
            self._done = True
            self.limits.let_go(self.route_slot, self.key_region, self.key_slot)

    def undo(self) -> None:
        """The call is not made after all: its slots, and its count in the route's window."""
        if self._done:
            return
        self.release()
        limits = self.limits
        if self.window is not None and limits.store is not None:
            limits.store.open().leases.give_back_route(limits.route, self.window)


def bind(endpoint: Endpoint, keyed: bool, *, store: Store | None, slots: tuple[SlotFile, SlotFile]) -> Limits | None:
    """The route's limits, or None when its calls have none: no limits of its own, and no virtual key to bring
    its own max_parallel_requests (`keyed`: an auth: true route)."""
    if not keyed and endpoint.limits.rpm_limit is None and endpoint.limits.max_parallel_requests is None:
        return None
    return Limits(endpoint, store, *slots)


def release(exchange: Exchange) -> None:
    """The exchange's first recorder: an answer that ended lets go of its call's slots, on every path (a cut
    stream, a client gone, an upstream failure)."""
    held = exchange.held
    if held is not None:
        held.release()
