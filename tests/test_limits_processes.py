"""Route and key limits across processes: a route's rpm_limit over four gunicorn workers and over two passthru hosts
on one PostgreSQL, calls in flight bounded across a host's workers, and the slots of a worker killed mid-call freed
by the kernel."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import requests
from conftest import Gunicorn, write_config
from test_deploy import processes
from test_footprint import maps_sqlalchemy
from test_keys_processes import Host, access_pids, burst, hosts  # noqa: F401  (hosts: the fixture)
from upstream import Upstream, wait_until

from passthru.keystore.engine import current_revision, head_revision, open_engine
from passthru.keystore.leases import HOLD, SHARE

MASTER = "sk-master-for-limit-processes"


def call(base: str, path: str = "/v1/rerank", key: str | None = None, timeout: float = 30) -> int:
    """One call on a fresh connection, so gunicorn hands it to any of its workers."""
    headers = {"Connection": "close", **({"Authorization": f"Bearer {key}"} if key else {})}
    return requests.post(f"{base}{path}", json={}, headers=headers, timeout=timeout).status_code


def test_a_route_rpm_limit_holds_across_four_workers(gunicorn: Callable[..., Gunicorn], upstream: Upstream,
                                                     tmp_path: Path) -> None:  # fmt: skip
    """No master key: the store is there for the route's counts, migrated by the master before any worker needs it
    (and the master never loads its driver)."""
    db = tmp_path / "routes.db"
    server = gunicorn([{"path": "/v1/rerank", "target": f"{upstream.url}/v1/rerank", "rpm_limit": 40},
                       {"path": "/open", "target": f"{upstream.url}/echo"}], workers=4,
                      env={"DATABASE_URL": f"sqlite:///{db}"})  # fmt: skip
    engine = open_engine(f"sqlite:///{db}")
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()
    statuses = burst([lambda: call(server.url)] * 100)
    assert statuses == {200: 40, 429: 60}, statuses
    assert len([seen for seen in upstream.requests if seen.target == "/v1/rerank"]) == 40
    assert burst([lambda: call(server.url, "/open")] * 20) == {200: 20}
    output = server.output()
    assert len(access_pids(output)) >= 2, "the calls should have been spread over several workers"
    assert "Traceback" not in output and "key store error" not in output
    assert not maps_sqlalchemy(server.process.pid)


def test_two_hosts_on_one_postgres_share_a_route_rpm_limit(postgres_url: str, hosts: Callable[[Path, str], Host],  # noqa: F811
                                                           upstream: Upstream, tmp_path: Path) -> None:  # fmt: skip
    busy_limit = 4 * SHARE  # room for leases: each host counts a few calls at a time
    config = write_config(tmp_path, [{"path": "/v1/rerank", "target": f"{upstream.url}/v1/rerank", "rpm_limit": 30},
                                     {"path": "/busy", "target": f"{upstream.url}/echo", "rpm_limit": busy_limit}],
                          database_url=postgres_url)  # fmt: skip
    one, two = hosts(config, "one"), hosts(config, "two")

    # 90 concurrent calls, alternating between the hosts: 30 in all get through, not 30 per host.
    statuses = burst([lambda i=i: call((one, two)[i % 2].url) for i in range(90)])  # type: ignore[misc]
    assert statuses == {200: 30, 429: 60}, statuses

    # Leased: never more than the limit; what a host leased and did not use comes back within HOLD.
    statuses = burst([lambda i=i: call((one, two)[i % 2].url, "/busy") for i in range(6 * SHARE)], threads=16)  # type: ignore[misc]
    assert statuses[200] <= busy_limit and statuses[200] + statuses[429] == 6 * SHARE, statuses
    more, deadline = 0, time.monotonic() + HOLD + 5
    while statuses[200] + more < busy_limit and time.monotonic() < deadline:
        if call((one, two)[more % 2].url, "/busy") == 200:
            more += 1
        else:
            time.sleep(0.1)
    assert statuses[200] + more == busy_limit, (statuses, more)
    assert call(one.url, "/busy") == 429 and call(two.url, "/busy") == 429  # and not one more
    for host in (one, two):
        output = host.output()
        assert "Traceback" not in output and "key store error" not in output, output


def slot_locks(directory: Path) -> list[int]:
    """The pid holding each locked byte of the route slots' file (/proc/locks; a process's locks on adjacent bytes
    are one line there)."""
    path = directory / "routes.slots"
    if not path.exists():
        return []
    inode = os.stat(path).st_ino
    pids = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "POSIX" in fields and not line.split(":", 1)[1].lstrip().startswith("->"):
            if fields[5].rsplit(":", 1)[1] == str(inode):
                pids += [int(fields[4])] * (int(fields[7]) - int(fields[6]) + 1)
    return pids


def test_calls_in_flight_are_bounded_across_workers_and_a_killed_worker_frees_its_slots(
    gunicorn: Callable[..., Gunicorn], upstream: Upstream, tmp_path: Path
) -> None:
    limits_dir = tmp_path / "limits"
    limits_dir.mkdir()
    slow = f"{upstream.url}/stall?seconds=2"
    server = gunicorn([{"path": "/slow", "target": slow, "max_parallel_requests": 2},
                       {"path": "/hang", "target": f"{upstream.url}/stall?seconds=12", "max_parallel_requests": 2},
                       {"path": "/keyed", "target": slow, "auth": True},
                       {"path": "/one", "target": f"{upstream.url}/echo", "max_parallel_requests": 1}], workers=4,
                      master_key=MASTER,
                      env={"PASSTHRU_LIMITS_DIR": str(limits_dir)})  # fmt: skip
    base = server.url
    made = requests.post(f"{base}/key/generate", json={"max_parallel_requests": 2},
                         headers={"Authorization": f"Bearer {MASTER}"}, timeout=15)  # fmt: skip
    assert made.status_code == 200, made.text
    key = made.json()["key"]

    # Five slow calls at once, each on its own connection (so on any worker): two served, three refused at once.
    started = time.monotonic()
    statuses = burst([lambda: call(base, "/slow")] * 5 + [lambda: call(base, "/keyed", key)] * 5, threads=10)
    assert statuses == {200: 4, 429: 6}, statuses
    assert time.monotonic() - started < 10
    assert len(set(re.findall(r"\[(\d+)\] \[[^\]]*\] passthru: POST /(?:slow|keyed) ", server.output()))) >= 2

    # One at a time, each call sent as soon as the last one's answer is in: never refused, on one worker or several.
    assert [call(base, "/one") for _ in range(20)] == [200] * 20
    with requests.Session() as kept_alive:
        assert [kept_alive.post(f"{base}/one", timeout=10).status_code for _ in range(20)] == [200] * 20
        assert [kept_alive.head(f"{base}/one", timeout=10).status_code for _ in range(20)] == [200] * 20

    # Two calls hold the route's slots; the worker of one is killed mid-call: the kernel frees its slot (both, when
    # the two calls went to that one worker), and new calls take them; the other worker's call keeps its own.
    hanging: list[int] = []
    threads = [threading.Thread(target=lambda: hanging.append(_failed_call(base, "/hang"))) for _ in range(2)]
    for thread in threads:
        thread.start()
    assert wait_until(lambda: len(slot_locks(limits_dir)) == 2, 5), slot_locks(limits_dir)
    assert call(base, "/hang", timeout=5) == 429
    holders = slot_locks(limits_dir)
    assert set(holders) <= {pid for pid, _, ppid, _ in processes() if ppid == server.process.pid}
    victim = holders[0]
    lost = holders.count(victim)
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: len(slot_locks(limits_dir)) == 2 - lost, 5), slot_locks(limits_dir)
    taken: list[int] = []
    takers = [threading.Thread(target=lambda: taken.append(_failed_call(base, "/hang"))) for _ in range(lost)]
    for thread in takers:
        thread.start()
    assert wait_until(lambda: len(slot_locks(limits_dir)) == 2, 5), slot_locks(limits_dir)
    assert victim not in slot_locks(limits_dir)
    assert call(base, "/hang", timeout=5) == 429  # and the bound is whole again: two in flight
    for thread in [*threads, *takers]:
        thread.join(40)
    assert sorted(hanging) == [-1] * lost + [200] * (2 - lost) and taken == [200] * lost, (hanging, taken)


def _failed_call(base: str, path: str) -> int:
    """A call's status, or -1 when its connection broke (its worker was killed)."""
    try:
        return call(base, path)
    except requests.ConnectionError:
        return -1
