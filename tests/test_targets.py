"""Picking and cooldowns (targets.py), without a server: a clock of the test's own, counted picks."""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate

import pytest

from passthru.targets import MAX_RETRY_AFTER, Rotation, retry_after


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rotation(weights: list[float], orders: list[int] | None = None, allowed_fails: int = 3,
             cooldown_time: float = 30.0) -> tuple[Rotation, Clock]:  # fmt: skip
    clock = Clock()
    return Rotation(weights, orders or [1] * len(weights), allowed_fails, cooldown_time, clock), clock


def test_weights_share_exactly_and_spread_out() -> None:
    targets, _ = rotation([3, 1])
    picks = [targets.pick() for _ in range(400)]
    assert Counter(picks) == {0: 300, 1: 100}
    assert picks[:8] == [0, 0, 1, 0, 0, 0, 1, 0]  # nginx's smooth order: never four of one in a row
    assert "0000" not in "".join(map(str, picks))


def test_weights_share_exactly_across_threads() -> None:
    targets, _ = rotation([1, 2, 1])
    with ThreadPoolExecutor(8) as pool:
        runs = list(pool.map(lambda _: Counter(targets.pick() for _ in range(1000)), range(8)))
    assert sum(runs, Counter()) == {0: 2000, 1: 4000, 2: 2000}


def test_a_higher_order_gets_nothing_while_a_lower_one_is_ready() -> None:
    targets, clock = rotation([1, 1, 5], [1, 1, 2], allowed_fails=1)
    assert 2 not in {targets.pick() for _ in range(100)}
    assert targets.pick(tried=(0, 1)) == 2  # both of order 1 failed for this call
    targets.failed(0)
    assert {targets.pick() for _ in range(10)} == {1}
    targets.failed(1)
    assert {targets.pick() for _ in range(10)} == {2}  # every order-1 target cooling: everything to order 2
    clock.now += 30
    assert {targets.pick() for _ in range(10)} == {0, 1}


def test_allowed_fails_in_a_row_cool_a_target_and_a_success_resets_the_count() -> None:
    targets, clock = rotation([1, 1], allowed_fails=3, cooldown_time=30)
    assert targets.failed(0) == 0 and targets.failed(0) == 0
    targets.succeeded(0)
    assert targets.failed(0) == 0 and targets.failed(0) == 0
    assert targets.cooling() == [0, 0]
    assert targets.failed(0) == 30  # the third in a row
    assert targets.cooling() == [30, 0]
    assert {targets.pick() for _ in range(10)} == {1}
    clock.now += 29.5
    assert targets.cooling() == [0.5, 0] and {targets.pick() for _ in range(10)} == {1}
    clock.now += 0.5
    assert targets.cooling() == [0, 0] and {targets.pick() for _ in range(10)} == {0, 1}
    assert targets.failed(0) == 0  # after its cooldown it has allowed_fails chances again


def test_when_every_target_cools_the_one_whose_cooldown_ends_first_is_tried() -> None:
    targets, clock = rotation([1, 1, 1], [1, 1, 2], allowed_fails=1, cooldown_time=30)
    targets.failed(1)
    clock.now += 10
    targets.failed(2)
    clock.now += 10
    targets.failed(0)
    assert {targets.pick() for _ in range(5)} == {1}  # ends in 10 s; the others in 20 and 30
    assert targets.pick(tried=(1,)) == 2


def test_a_call_tries_each_target_before_any_again() -> None:
    targets, _ = rotation([1, 1, 1])
    assert targets.pick(tried=(0, 2)) == 1
    assert targets.pick(tried=(0, 1, 2)) in (0, 1, 2)


def test_a_single_target_is_always_the_pick() -> None:
    targets, _ = rotation([1], allowed_fails=1)
    assert targets.failed(0) == 30
    assert targets.pick() == 0 and targets.pick(tried=(0,)) == 0


def test_failing_while_cooling_extends_the_cooldown_without_beginning_another() -> None:
    targets, clock = rotation([1], allowed_fails=2, cooldown_time=30)
    assert targets.failed(0) == 0 and targets.failed(0) == 30
    clock.now += 10
    assert targets.failed(0) == 0 and targets.failed(0) == 0  # tried anyway (the only one), failed twice more
    assert targets.cooling() == [30]
    clock.now += 30
    assert targets.failed(0) == 0 and targets.failed(0) == 30  # over: the next cooldown begins


@pytest.mark.parametrize(
    ("given", "cools"),
    [
        pytest.param(120.0, 120.0, id="longer-than-cooldown_time"),
        pytest.param(10.0, 0.0, id="shorter-counts-as-one-failure"),
        pytest.param(10 * MAX_RETRY_AFTER, MAX_RETRY_AFTER, id="capped"),
        pytest.param(None, 0.0, id="absent"),
    ],
)
def test_retry_after_longer_than_cooldown_time_cools_at_once(given: float | None, cools: float) -> None:
    targets, _ = rotation([1, 1], allowed_fails=2, cooldown_time=30)
    assert targets.failed(0, given) == cools
    assert targets.cooling()[0] == cools


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param("120", 120.0, id="seconds"),
        pytest.param(" 7 ", 7.0, id="spaces"),
        pytest.param(None, None, id="absent"),
        pytest.param("", None, id="empty"),
        pytest.param("-5", None, id="negative"),
        pytest.param("soon", None, id="garbage"),
        pytest.param("Wed, 21 Oct 2015 07:28:00 GMT", 0.0, id="date-past"),
    ],
)
def test_retry_after_reads_seconds_and_dates(value: str | None, seconds: float | None) -> None:
    assert retry_after(value) == seconds


def test_retry_after_reads_a_future_date() -> None:
    later = time.time() + 100
    for date in (formatdate(later, usegmt=True), formatdate(later)):  # "GMT", and "-0000"
        assert 95 <= (retry_after(date) or 0) <= 100, date
