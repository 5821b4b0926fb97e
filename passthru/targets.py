"""Which target a route's next attempt goes to, and which of its targets are cooling down.

One Rotation per route in each worker, made at start-up: cooldowns are counted per worker, each from the calls it
sent. Picking is smooth weighted round robin (nginx's upstream picking), in each worker: over any run of calls each
target of an order gets its weight's share, spread out rather than in bursts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence
from datetime import UTC
from email.utils import parsedate_to_datetime

# An upstream's Retry-After is honoured up to this long: a wrong or hostile one cannot park a target for days.
MAX_RETRY_AFTER = 3600.0


class Rotation:
    """The targets of one route: their weights and orders, each one's failures in a row and cooldown."""

    def __init__(
        self,
        weights: Sequence[float],
        orders: Sequence[int],
        allowed_fails: int,
        cooldown_time: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.single = len(weights) == 1  # nothing to pick, and no lock taken on the way to the one target
        self._weights = tuple(weights)
        # The targets' indices by order, lowest order first.
        self._orders = tuple(tuple(i for i, o in enumerate(orders) if o == order) for order in sorted(set(orders)))
        self._allowed_fails = allowed_fails
        self._cooldown_time = cooldown_time
        self._clock = clock
        self._current = [0.0] * len(weights)  # smooth weighted round robin's running weights
        self._fails = [0] * len(weights)  # failed attempts in a row
        self._until = [0.0] * len(weights)  # when each cooldown ends (clock time); past: not cooling
        self._lock = threading.Lock()

    def pick(self, tried: Collection[int] = ()) -> int:
        """The target of the next attempt: by weight among the lowest order with a target that this call has not
        tried and that is not cooling down; else the untried one whose cooldown ends first. Once every target has
        been tried, any may be tried again."""
        if self.single:
            return 0
        with self._lock:
            now = self._clock()
            untried = [i for i in range(len(self._weights)) if i not in tried] or range(len(self._weights))
            for order in self._orders:
                ready = [i for i in order if i in untried and self._until[i] <= now]
                if ready:
                    return self._smooth(ready)
            return min(untried, key=self._until.__getitem__)

    def _smooth(self, ready: list[int]) -> int:
        """nginx's smooth weighted round robin: each ready target gains its weight, the richest is picked and pays
        the total."""
        current, weights = self._current, self._weights
        best, total = ready[0], 0.0
        for i in ready:
            current[i] += weights[i]
            total += weights[i]
            if current[i] > current[best]:
                best = i
        current[best] -= total
        return best

    def failed(self, index: int, retry_after: float | None = None) -> float:
        """Count a failed attempt; the seconds of the cooldown it begins (0: none begins).

        `allowed_fails` in a row cool the target for `cooldown_time`; an upstream's Retry-After longer than that
        cools it at once, for that long. A target tried while cooling (every target was) may cool for longer.
        """
        with self._lock:
            if retry_after is not None and retry_after > self._cooldown_time:
                seconds = min(retry_after, MAX_RETRY_AFTER)
            else:
                self._fails[index] += 1
                if self._fails[index] < self._allowed_fails or self._cooldown_time <= 0:
                    return 0.0
                seconds = self._cooldown_time
            self._fails[index] = 0  # once the cooldown is over, it gets allowed_fails chances again
            now = self._clock()
            began = self._until[index] <= now
            self._until[index] = max(self._until[index], now + seconds)
            return seconds if began else 0.0

    def succeeded(self, index: int) -> None:
        """An attempt that was answered: the target's failures in a row start again from zero."""
        if self._fails[index]:  # read without the lock: a success mostly has nothing to reset
            with self._lock:
                self._fails[index] = 0

    def cooling(self) -> list[float]:
        """Each target's seconds of cooldown left, 0 for a target that is not cooling down."""
        now = self._clock()
        return [max(0.0, until - now) for until in self._until]


def retry_after(value: str | None) -> float | None:
    """An upstream's Retry-After in seconds: a number of seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000": RFC 9110 dates are GMT all the same
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - time.time())
