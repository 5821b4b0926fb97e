"""A route's rpm_limit and max_parallel_requests, and a key's max_parallel_requests (limits.py), over HTTP on real
sockets in one process (its slots are the process's own): 429 in LiteLLM's shape before anything goes upstream,
nothing charged, slots let go of however a call ends. Across workers and hosts: tests/test_limits_processes.py."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from conftest import free_port
from test_keys import error_of
from upstream import Upstream, wait_until

from passthru.keystore.schema import keys, route_windows

MASTER = "sk-master-for-limits"
ADMIN = {"Authorization": f"Bearer {MASTER}"}
Serve = Callable[..., str]
SLOW = 1.5  # seconds the slow upstream takes to answer: calls sent together are all in flight at once


def post(url: str, key: str | None = None, timeout: float = 15) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(url, json={"q": 1}, headers=headers, timeout=timeout)


def together(calls: list[Callable[[], requests.Response]]) -> list[requests.Response]:
    """The calls sent at once; their answers."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [future.result(timeout=60) for future in [pool.submit(call) for call in calls]]


def generate(base: str, **fields: Any) -> str:
    response = requests.post(f"{base}/key/generate", json=fields, headers=ADMIN, timeout=15)
    assert response.status_code == 200, response.text
    return response.json()["key"]  # type: ignore[no-any-return]


def info(base: str, key: str) -> dict[str, Any]:
    response = requests.get(f"{base}/key/info", params={"key": key}, headers=ADMIN, timeout=15)
    assert response.status_code == 200, response.text
    return response.json()["info"]  # type: ignore[no-any-return]


def assert_limited(response: requests.Response, retry_after: range, says: str) -> None:
    """A 429 in LiteLLM's shape, with a Retry-After in the range, saying which limit."""
    assert response.status_code == 429, response.text
    error = error_of(response)
    assert error["type"] == "rate_limit_error" and says in error["message"], error
    assert int(response.headers["Retry-After"]) in retry_after


def stored(url: str, table: sa.Table, column: sa.Column[Any], key: str) -> Any:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.select(table).where(column == key)).one()
    finally:
        engine.dispose()


def test_route_rpm_limit_without_a_master_key_uses_the_default_store(serve: Serve, upstream: Upstream,
                                                                      tmp_path: Path) -> None:  # fmt: skip
    base = serve([{"path": "/v1/chat", "target": f"{upstream.url}/echo", "rpm_limit": 3},
                  {"path": "/free", "target": f"{upstream.url}/echo"}])  # fmt: skip
    assert [post(f"{base}/v1/chat").status_code for _ in range(3)] == [200, 200, 200]
    for _ in range(2):
        assert_limited(post(f"{base}/v1/chat"), range(55, 61), "/v1/chat's rpm_limit is reached")
    assert len(upstream.requests) == 3  # nothing refused went upstream
    assert post(f"{base}/free").status_code == 200  # another route is not limited
    assert (tmp_path / "passthru.db").exists()  # ./passthru.db, the default store (conftest works in tmp_path)
    ready = requests.get(f"{base}/health/readiness", timeout=10).json()
    assert ready["db"] == "connected"
    assert requests.post(f"{base}/key/generate", json={}, timeout=10).status_code == 404  # no master key: no key API
    assert stored(f"sqlite:///{tmp_path / 'passthru.db'}", route_windows, route_windows.c.route, "/v1/chat")[2] == 3
    metrics = requests.get(f"{base}/metrics", timeout=10).text
    assert 'passthru_limited_total{limit="rpm_limit",route="/v1/chat"} 2.0' in metrics
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'passthru.db'}")
    try:
        with engine.connect() as conn:  # no master key: nothing could read a spend log, none is written
            assert conn.execute(sa.text("SELECT count(*) FROM passthru_spend_logs")).scalar() == 0
    finally:
        engine.dispose()


def test_a_route_whose_store_is_unreachable_answers_503_and_holds_no_slot(serve: Serve, upstream: Upstream) -> None:
    base = serve([{"path": "/r", "target": f"{upstream.url}/echo", "rpm_limit": 10, "max_parallel_requests": 1}],
                 database_url="postgresql://u:pw-limits-1@127.0.0.1:1/db")  # fmt: skip
    for _ in range(3):  # each one had the slot, and let go of it
        response = post(f"{base}/r")
        assert response.status_code == 503 and error_of(response)["type"] == "service_unavailable"
        assert "pw-limits-1" not in response.text
    assert len(upstream.requests) == 0
    assert requests.get(f"{base}/health/readiness", timeout=10).json()["db"] == "unreachable"


def test_a_call_the_route_refuses_costs_its_key_nothing(database_url: str, serve: Serve, upstream: Upstream) -> None:
    """The route's limits come before the key's count and charge: refused calls leave the key's rpm window and
    spend as they were (and the key's own limits still have room)."""
    base = serve([{"path": "/r", "target": f"{upstream.url}/echo", "auth": True, "rpm_limit": 2,
                   "cost_per_request": 1.0}], master_key=MASTER, database_url=database_url)  # fmt: skip
    key = generate(base, rpm_limit=10, max_budget=100)
    statuses = [post(f"{base}/r", key).status_code for _ in range(6)]
    assert statuses == [200, 200, 429, 429, 429, 429]
    assert info(base, key)["spend"] == 2.0
    row = stored(database_url, keys, keys.c.token, info(base, key)["token"])
    assert row.window_count == 2  # the key counted its two calls, not the four the route refused
    assert len(upstream.requests) == 2


def test_a_call_its_key_refuses_is_given_back_to_the_route(database_url: str, serve: Serve,
                                                           upstream: Upstream) -> None:  # fmt: skip
    """A key at its own limit that keeps calling does not use up the route's rpm_limit for the other keys: each call
    its key refuses goes back to the route's window with the worker's next spend log batch (within about 0.1 s)."""
    base = serve([{"path": "/r", "target": f"{upstream.url}/echo", "auth": True, "rpm_limit": 3}],
                 master_key=MASTER, database_url=database_url)  # fmt: skip
    busy, other = generate(base, rpm_limit=1), generate(base)
    assert post(f"{base}/r", busy).status_code == 200  # opens the route's window
    time.sleep(0.01)  # later calls are surely counted in that window (windows.CLOCK_STEPS)

    def route_count() -> int:
        return int(stored(database_url, route_windows, route_windows.c.route, "/r")[2])

    for _ in range(5):  # more than the route's limit
        assert_limited(post(f"{base}/r", busy), range(1, 61), "this key's rpm_limit is reached")
        assert wait_until(lambda: route_count() == 1, 5), route_count()
    assert [post(f"{base}/r", other).status_code for _ in range(3)] == [200, 200, 429]
    assert len(upstream.requests) == 3


def test_max_parallel_requests_refuses_calls_past_the_bound_and_frees_slots_as_answers_end(
    serve: Serve, upstream: Upstream
) -> None:
    base = serve([{"path": "/slow", "target": f"{upstream.url}/stall?seconds={SLOW}", "max_parallel_requests": 2}])
    started = time.monotonic()
    answers = together([lambda: post(f"{base}/slow")] * 5)
    statuses = Counter(answer.status_code for answer in answers)
    assert statuses == {200: 2, 429: 3}, statuses
    for answer in answers:
        if answer.status_code == 429:
            assert_limited(answer, range(1, 2), "/slow has its max_parallel_requests calls in flight")
            assert answer.elapsed.total_seconds() < SLOW / 2  # refused at once, not after waiting
    assert time.monotonic() - started < 3 * SLOW
    assert len(upstream.requests) == 2
    assert Counter(answer.status_code for answer in together([lambda: post(f"{base}/slow")] * 2)) == {200: 2}


def test_slots_are_let_go_of_when_the_upstream_fails_or_the_caller_hangs_up(serve: Serve, upstream: Upstream) -> None:
    """A client that calls again as soon as it has an answer finds the slot free (it is let go of as the answer's
    last byte is handed to the server, not once the server is done with the exchange)."""
    base = serve([{"path": "/down", "target": f"http://127.0.0.1:{free_port()}/x", "max_parallel_requests": 1},
                  {"path": "/sse", "target": f"{upstream.url}/sse?n=50&gap=0.2", "max_parallel_requests": 1},
                  {"path": "/one", "target": f"{upstream.url}/echo", "max_parallel_requests": 1}])  # fmt: skip
    assert [post(f"{base}/down").status_code for _ in range(20)] == [502] * 20  # each one had the slot
    assert [post(f"{base}/one").status_code for _ in range(20)] == [200] * 20
    with requests.Session() as kept_alive:
        assert [kept_alive.post(f"{base}/one", timeout=10).status_code for _ in range(20)] == [200] * 20
        assert [kept_alive.head(f"{base}/one", timeout=10).status_code for _ in range(20)] == [200] * 20

    def sse_status() -> int:
        with requests.get(f"{base}/sse", stream=True, timeout=10) as answer:
            return answer.status_code

    with requests.get(f"{base}/sse", stream=True, timeout=10) as stream:
        assert stream.status_code == 200
        next(stream.iter_content(64))  # the first event: the call holds its slot
        assert sse_status() == 429
    # Hung up mid-stream: the slot is free once the server notices (a write after the hang-up fails).
    assert wait_until(lambda: sse_status() == 200, 10)


def test_a_key_max_parallel_requests_is_accepted_shown_and_enforced(database_url: str, serve: Serve,
                                                                    upstream: Upstream) -> None:  # fmt: skip
    base = serve([{"path": "/slow", "target": f"{upstream.url}/stall?seconds={SLOW}", "auth": True,
                   "cost_per_request": 1.0}], master_key=MASTER, database_url=database_url)  # fmt: skip
    key = generate(base, max_parallel_requests=1, max_budget=100)
    assert info(base, key)["max_parallel_requests"] == 1
    answers = together([lambda: post(f"{base}/slow", key)] * 3 + [lambda: post(f"{base}/slow", MASTER)] * 2)
    assert [answer.status_code for answer in answers[3:]] == [200, 200]  # the master key has no such bound
    assert sorted(answer.status_code for answer in answers[:3]) == [200, 429, 429]
    for answer in answers[:3]:
        if answer.status_code == 429:
            assert_limited(answer, range(1, 2), "this key has its max_parallel_requests calls in flight")
    assert info(base, key)["spend"] == 1.0  # the refused calls were not charged
    requests.post(f"{base}/key/update", json={"key": key, "max_parallel_requests": 0}, headers=ADMIN, timeout=10)
    assert post(f"{base}/slow", key).status_code == 429  # 0: no call at all, as in LiteLLM
    requests.post(f"{base}/key/update", json={"key": key, "max_parallel_requests": None}, headers=ADMIN, timeout=10)
    assert sorted(a.status_code for a in together([lambda: post(f"{base}/slow", key)] * 3)) == [200, 200, 200]


@pytest.mark.parametrize(
    ("value", "status"),
    [pytest.param(10_000, 200, id="most"), pytest.param(10_001, 400, id="too-many"),
     pytest.param(-1, 400, id="negative"), pytest.param(2.0, 400, id="float"), pytest.param("2", 400, id="string")],
)  # fmt: skip
def test_key_max_parallel_requests_is_range_checked(database_url: str, serve: Serve, upstream: Upstream,
                                                    value: object, status: int) -> None:  # fmt: skip
    base = serve([{"path": "/r", "target": f"{upstream.url}/echo", "auth": True}], master_key=MASTER,
                 database_url=database_url)  # fmt: skip
    response = requests.post(f"{base}/key/generate", json={"max_parallel_requests": value}, headers=ADMIN, timeout=10)
    assert response.status_code == status, response.text
    if status == 400:
        assert error_of(response)["param"] == "max_parallel_requests"
        assert re.search("max_parallel_requests must be", error_of(response)["message"])
