"""Virtual keys across processes: several gunicorn workers on one SQLite file, two passthru hosts on one
PostgreSQL, and no plain key in the store or in any log line."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
from conftest import PROXY_VARIABLES, ROOT, Gunicorn, StoreRelay, free_port, wait_for_port, write_config
from upstream import Upstream, wait_until

from passthru.auth import CACHE_SECONDS
from passthru.keystore.guard import STALL
from passthru.keystore.leases import HOLD, SHARE
from passthru.keystore.records import Charge
from passthru.keystore.spend import SpendWriter
from passthru.keystore.sql import open_store

MASTER = "sk-master-key-for-processes"
ADMIN = {"Authorization": f"Bearer {MASTER}"}


def entries(upstream: Upstream) -> list[dict[str, Any]]:
    return [{"path": "/v1/rerank", "target": f"{upstream.url}/v1/rerank", "auth": True, "cost_per_request": 0.5}]


def call(base: str, key: str) -> int:
    """One call on a fresh connection, so gunicorn hands it to any of its workers."""
    return requests.post(
        f"{base}/v1/rerank", json={}, headers={"Authorization": f"Bearer {key}", "Connection": "close"}, timeout=15
    ).status_code


def admin(base: str, path: str, **body: Any) -> dict[str, Any]:
    response = requests.post(base + path, json=body, headers=ADMIN, timeout=15)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def burst(calls: list[Callable[[], int]], threads: int = 12) -> Counter[int]:
    """Run the calls concurrently; the statuses they got."""
    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(c) for c in calls]
        return Counter(f.result(timeout=60) for f in futures)


def access_pids(log: str) -> set[str]:
    """The worker pids that wrote access lines for the pass-through route."""
    return set(re.findall(r"\[(\d+)\] \[[^\]]*\] passthru: POST /v1/rerank ", log))


def test_several_workers_share_one_sqlite_file(gunicorn: Callable[..., Gunicorn], upstream: Upstream,
                                               tmp_path: Path) -> None:  # fmt: skip
    db = tmp_path / "keys.db"
    server = gunicorn(entries(upstream), workers=4, master_key=MASTER, database_url=f"sqlite:///{db}")
    base = server.url
    limited = admin(base, "/key/generate", rpm_limit=40)["key"]
    free = admin(base, "/key/generate")["key"]

    # rpm_limit is one count for all four workers: exactly 40 of 100 concurrent calls get through.
    statuses = burst([lambda: call(base, limited)] * 100)
    assert statuses == {200: 40, 429: 60}, statuses
    # Concurrent writers on one file: every call admitted, charged and logged, and not one "database is locked".
    statuses = burst([lambda: call(base, free)] * 200, threads=16)
    assert statuses == {200: 200}, statuses

    def logged() -> int:
        response = requests.get(f"{base}/spend/logs", params={"key": free, "limit": 1000}, headers=ADMIN, timeout=15)
        return len(response.json())

    # A key without limits is charged with its spend log entries, in the same transaction.
    assert wait_until(lambda: logged() == 200, 10)
    info = requests.get(f"{base}/key/info", params={"key": free}, headers=ADMIN, timeout=15).json()["info"]
    assert info["spend"] == 100.0
    # Blocked on one worker (the one that answers /key/block): a key with a small rpm_limit is decided by the store
    # on every call, so every worker refuses it at once; a key without limits, or one whose calls a worker may
    # lease a few at a time (leases.py), once the workers' memory of it or their lease is over.
    small, expiring = (
        admin(base, "/key/generate", rpm_limit=100)["key"],
        admin(base, "/key/generate", duration="1h")["key"],
    )
    assert burst([lambda: call(base, small)] * 8 + [lambda: call(base, expiring)] * 8) == {200: 16}
    for key in (small, expiring, free):
        admin(base, "/key/block", key=key)
    statuses = burst([lambda: call(base, small)] * 40)
    assert statuses == {401: 40}, statuses
    time.sleep(CACHE_SECONDS)
    statuses = burst([lambda: call(base, free)] * 40 + [lambda: call(base, expiring)] * 40)
    assert statuses == {401: 80}, statuses
    output = server.output()
    assert len(access_pids(output)) >= 2, "the calls should have been spread over several workers"
    assert "database is locked" not in output and "Traceback" not in output
    assert "key store error" not in output


def test_tpm_limit_holds_across_workers(gunicorn: Callable[..., Gunicorn], upstream: Upstream, tmp_path: Path) -> None:
    """Four workers decide one key's calls on its tokens, counted in the store as answers end: under the limit every
    call passes, at it every worker refuses (429, Retry-After), whichever one a call reaches. The usage reader is not
    wired into the request path yet: the tokens are written as a worker's spend writer writes them."""
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    server = gunicorn(entries(upstream), workers=4, master_key=MASTER, database_url=url)
    base = server.url
    made = admin(base, "/key/generate", tpm_limit=1000)
    key, token = made["key"], made["token"]
    store = open_store(url)
    writer = SpendWriter(store)
    try:
        assert burst([lambda: call(base, key)] * 40) == {200: 40}
        writer.add(Charge("", token, "/v1/rerank", 200, 0.5, 0.5, 1.0, model="m", total_tokens=999))
        assert writer.flush(10)
        assert burst([lambda: call(base, key)] * 40) == {200: 40}  # 999 of 1000: not there yet
        writer.add(Charge("", token, "/v1/rerank", 200, 0.5, 0.5, 1.0, model="m", prompt_tokens=1))
        assert writer.flush(10)

        def refused() -> int:
            response = requests.post(f"{base}/v1/rerank", json={}, timeout=15,
                                     headers={"Authorization": f"Bearer {key}", "Connection": "close"})  # fmt: skip
            retry = int(response.headers.get("Retry-After", "0"))
            return response.status_code if 1 <= retry <= 60 and "tpm_limit is reached" in response.text else -1

        assert burst([refused] * 80) == {429: 80}
    finally:
        writer.close()
        store.close()
    info = requests.get(f"{base}/key/info", params={"key": token}, headers=ADMIN, timeout=15).json()["info"]
    assert (info["total_tokens"], info["prompt_tokens"], info["spend"]) == (1000, 1, 40.0)  # 80 calls at 0.5
    output = server.output()
    assert len(access_pids(output)) >= 2, "the calls should have been spread over several workers"
    assert "Traceback" not in output and "key store error" not in output


# A passthru host (`python -m passthru`: its own gunicorn master and workers) is run and stopped like gunicorn.
Host = Gunicorn


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Callable[[Path, str], Host]]:
    started: list[Host] = []

    def start(config: Path, name: str) -> Host:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}
        log = tmp_path / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "passthru", "--config", str(config), "--host", "127.0.0.1", "--port",
                 str(port), "--num_workers", "2"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        host = Host(process, f"http://127.0.0.1:{port}", log)
        started.append(host)
        try:
            wait_for_port(port, 30, alive=lambda: process.poll() is None)
        except AssertionError:
            raise AssertionError(f"passthru {name} did not start:\n{host.output()}") from None
        return host

    try:
        yield start
    finally:
        for host in started:
            host.stop()


def test_two_hosts_share_limits_and_blocks_through_postgres(postgres_url: str, hosts: Callable[[Path, str], Host],
                                                            upstream: Upstream, tmp_path: Path) -> None:  # fmt: skip
    config = write_config(tmp_path, entries(upstream), master_key=MASTER, database_url=postgres_url)
    one, two = hosts(config, "one"), hosts(config, "two")
    key = admin(one.url, "/key/generate", rpm_limit=30)["key"]

    # 90 concurrent calls, alternating between the hosts: 30 in all get through, not 30 per host.
    statuses = burst([lambda i=i: call((one, two)[i % 2].url, key) for i in range(90)])  # type: ignore[misc]
    assert statuses == {200: 30, 429: 60}, statuses

    # A limit with room for leases (leases.py): each host takes a few calls at a time, and the two never pass the
    # limit together. What a host leased and did not use goes back within HOLD, and is admitted then.
    busy = admin(one.url, "/key/generate", rpm_limit=4 * SHARE)["key"]
    statuses = burst([lambda i=i: call((one, two)[i % 2].url, busy) for i in range(6 * SHARE)], threads=16)  # type: ignore[misc]
    assert statuses[200] <= 4 * SHARE and statuses[200] + statuses[429] == 6 * SHARE, statuses
    more, deadline = 0, time.monotonic() + HOLD + 5  # the leases' time, and a round of each spend log writer
    while statuses[200] + more < 4 * SHARE and time.monotonic() < deadline:
        if call((one, two)[more % 2].url, busy) == 200:
            more += 1
        else:
            time.sleep(0.1)  # a host still holds calls it leased: they come back within HOLD
    assert statuses[200] + more == 4 * SHARE, (statuses, more)
    assert call(one.url, busy) == 429 and call(two.url, busy) == 429  # and not one more

    other = admin(two.url, "/key/generate")["key"]
    assert call(one.url, other) == 200  # made on one host, usable on the other at once
    admin(one.url, "/key/block", key=other)
    assert wait_until(lambda: call(two.url, other) == 401, 1.0)
    assert burst([lambda: call(two.url, other)] * 10) == {401: 10}
    admin(two.url, "/key/unblock", key=other)
    assert call(one.url, other) == 200
    admin(two.url, "/key/delete", keys=[other])
    assert wait_until(lambda: call(one.url, other) == 401, 1.0)
    for host in (one, two):
        output = host.output()
        assert "Traceback" not in output and "key store error" not in output, output
        assert key not in output and other not in output


def test_no_plain_key_in_the_store_or_any_log_line(database_url: str, gunicorn: Callable[..., Gunicorn],
                                                   upstream: Upstream, tmp_path: Path) -> None:  # fmt: skip
    routes = [*entries(upstream), {"path": "/fwd", "target": f"{upstream.url}/echo", "auth": True,
                                   "forward_headers": True}]  # fmt: skip
    server = gunicorn(routes, workers=2, master_key=MASTER, database_url=database_url)
    base = server.url
    custom = "sk-custom-plain-key-0123456789"
    keys = [admin(base, "/key/generate", key_alias="a")["key"], admin(base, "/key/generate", key=custom)["key"]]
    for key in keys:
        for header in ("Authorization", "x-litellm-api-key", "api-key", "x-api-key", "x-goog-api-key"):
            value = f"Bearer {key}" if header == "Authorization" else key
            for path in ("/v1/rerank", "/fwd"):
                assert requests.post(base + path, json={}, headers={header: value}, timeout=15).status_code == 200
        assert requests.get(f"{base}/key/info", params={"key": key}, headers=ADMIN, timeout=15).status_code == 200
        admin(base, "/key/update", key=key, rpm_limit=100)
        admin(base, "/key/block", key=key)
        time.sleep(CACHE_SECONDS)  # the other worker may still know the key as it was before the update
        assert call(base, key) == 401
        admin(base, "/key/unblock", key=key)
        response = requests.get(f"{base}/spend/logs", params={"key": key}, headers=ADMIN, timeout=15)
        assert response.status_code == 200 and key not in response.text
    assert requests.get(f"{base}/key/info", params={"key": "sk-unknown-but-plain-1"}, headers=ADMIN,
                        timeout=15).status_code == 404  # fmt: skip
    token = hashlib.sha256(keys[0].encode()).hexdigest()
    assert wait_until(lambda: len(requests.get(f"{base}/spend/logs", params={"key": token}, headers=ADMIN,
                                               timeout=15).json()) == 10, 10)  # fmt: skip
    server.stop()
    output = server.output()
    assert "/key/info" in output and "/v1/rerank" in output  # the lines are there, the keys are not
    for key in (*keys, "sk-unknown-but-plain-1"):
        assert key not in output
        assert all(key not in value for seen in upstream.requests for _, value in seen.headers)
    stored = _everything_stored(database_url, tmp_path)
    assert token.encode() in stored  # the hash is what is kept
    for key in keys:
        assert key.encode() not in stored


def _everything_stored(database_url: str, tmp_path: Path) -> bytes:
    """Every byte of the SQLite files, or every row of the PostgreSQL schema as text."""
    if database_url.startswith("sqlite"):
        files = [p for p in tmp_path.iterdir() if p.name.startswith("keys.db")]
        assert files
        return b"".join(p.read_bytes() for p in files)
    schema = database_url.split("search_path%3D")[1].split("&")[0]
    with psycopg.connect(f"host=127.0.0.1 dbname=test user=postgres options=-csearch_path={schema}") as conn:
        rows = [r[0] for table in ("passthru_keys", "passthru_spend_logs", "passthru_alembic_version")
                for r in conn.execute(f"SELECT row_to_json(t)::text FROM {table} t")]  # fmt: skip
    return "\n".join(rows).encode()


def test_werkzeug_request_lines_are_masked(serve: Callable[..., str], upstream: Upstream,
                                           caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    base = serve(entries(upstream), master_key=MASTER)
    key = admin(base, "/key/generate")["key"]
    with caplog.at_level(logging.INFO, logger="werkzeug"):
        requests.get(f"{base}/key/info", params={"key": key}, headers=ADMIN, timeout=15)
        assert wait_until(lambda: any("/key/info" in r.getMessage() for r in caplog.records), 5)
    assert all(key not in record.getMessage() for record in caplog.records)


def test_gunicorn_stops_with_one_line_when_the_store_is_unreachable(upstream: Upstream, tmp_path: Path) -> None:
    config = write_config(tmp_path, entries(upstream), master_key=MASTER,
                          database_url="postgresql://u:pw-never-shown@127.0.0.1:1/db")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}
    env.update(PASSTHRU_CONFIG=str(config), PORT=str(free_port()), HOST="127.0.0.1")
    done = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py", "wsgi:app"], cwd=ROOT,
                          env=env, capture_output=True, timeout=60)  # fmt: skip
    output = (done.stdout + done.stderr).decode()
    assert done.returncode != 0
    assert "passthru: cannot open the key store at postgresql+psycopg://u:***@127.0.0.1:1/db" in output, output
    assert "pw-never-shown" not in output and "Traceback" not in output


def test_master_key_calls_are_answered_while_unknown_keys_meet_a_store_that_does_not_answer(
    postgres_url: str, store_relay: StoreRelay, gunicorn: Callable[..., Gunicorn], upstream: Upstream
) -> None:
    """The store's host goes dark (no refusal, no reply) and 200 calls with made-up keys arrive at once at a worker
    of the shipped config (128 threads): they used to take every thread, each waiting for the 5 s connect timeout or
    the pool's 10 s, while master-key calls, which never touch the store, waited behind them."""
    server = gunicorn(entries(upstream), workers=1, master_key=MASTER, database_url=store_relay.url(postgres_url))
    assert call(server.url, MASTER) == 200
    store_relay.blackhole()
    waits: list[float] = []
    with ThreadPoolExecutor(200) as pool:
        unknown = [pool.submit(call, server.url, f"sk-made-up-key-{n:04d}") for n in range(200)]
        time.sleep(0.2)  # they are in
        until = time.monotonic() + 6  # past the connect timeout
        while time.monotonic() < until:
            start = time.monotonic()
            assert call(server.url, MASTER) == 200
            waits.append(time.monotonic() - start)
        statuses = Counter(future.result(timeout=60) for future in unknown)
    assert statuses == {503: 200}, statuses
    # At worst the calls queued behind those waiting for a slot, which give up after STALL (5 to 15 s before).
    assert len(waits) >= 6 and max(waits) < STALL + 2, waits
