"""What route and key limits cost a call, in-process, by hand: `.venv/bin/python bench/limits.py [--postgres]`.

Issue 15's target: a route's rpm_limit costs no more than a virtual key with limits does. Two tables, process CPU per
call (the spend log writer's thread is in the process and counted):

- the checks alone, as routes._serve runs them (Authenticator.admit, Limits.enter and the release): best of 5;
- whole calls through the app (Flask's test client, the upstream in a process of its own), one thread: 300 calls and
  the flush of their spend log entries, the configurations interleaved, the median of 7 rounds.

A busy key or route with room is counted in leases of up to 64 calls (leases.py); "one by one" is the same check
when every call asks the store (near a limit, or a limit under 128 a minute).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from passthru.app import create_app  # noqa: E402
from passthru.auth import Authenticator, digest  # noqa: E402
from passthru.config import parse_settings  # noqa: E402
from passthru.errors import RateLimited  # noqa: E402
from passthru.keystore.leases import Leases  # noqa: E402
from passthru.keystore.records import NewKey  # noqa: E402
from passthru.keystore.store import LazyStore  # noqa: E402
from passthru.limits import Limits  # noqa: E402
from passthru.server_config import read_server_settings  # noqa: E402
from passthru.slots import SlotFile, region_of  # noqa: E402

MASTER = "sk-bench-master-key"
BIG = 2**31 - 1


def cpu_us(run: Callable[[], object], loops: int, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        for _ in range(loops):
            run()
        best = min(best, time.process_time() - started)
    return best / loops * 1e6


def settings(url: str, **route: Any) -> Any:
    entry = {"path": "/r", "target": "http://127.0.0.1:9/r", "cost_per_request": 0.001, **route}
    raw = {"general_settings": {"master_key": MASTER, "database_url": url, "pass_through_endpoints": [entry]}}
    return parse_settings(raw, "bench", {})


def checks(url: str, slots_dir: str) -> list[tuple[str, float]]:
    """Per call: the key check and the route's limits alone."""
    store = LazyStore(url)
    opened = store.open()
    key = "sk-bench-" + uuid.uuid4().hex
    token = digest(key).hex()
    opened.keys.create(NewKey(token, "sk-...0000", rpm_limit=BIG, max_budget=1e12))
    parallel_key = "sk-bench-" + uuid.uuid4().hex
    opened.keys.create(NewKey(digest(parallel_key).hex(), "sk-...0001", max_parallel_requests=50))
    auth = Authenticator(MASTER, store)
    route_slots = SlotFile(os.path.join(slots_dir, "routes.slots"))
    key_slots = SlotFile(os.path.join(slots_dir, "keys.slots"))
    plain = settings(url).endpoints[0]
    rpm = settings(url, rpm_limit=BIG).endpoints[0]
    parallel = settings(url, max_parallel_requests=50).endpoints[0]
    both = settings(url, rpm_limit=BIG, max_parallel_requests=50).endpoints[0]
    keyed = Limits(plain, store, route_slots, key_slots)
    rows = []

    def admit(key: str, endpoint: Any, limits: Limits | None) -> Callable[[], object]:
        def run() -> object:
            held = auth.admit(key, endpoint, limits)[2]
            if held is not None:
                held.release()
            return held

        return run

    def enter(limits: Limits) -> Callable[[], object]:
        def run() -> object:
            held = limits.enter(None)
            if held is not None:
                held.release()
            return held

        return run

    rows.append(("master key, no limits", cpu_us(admit(MASTER, plain, None), 20_000)))
    rows.append(("virtual key with limits (rpm_limit, max_budget), leased", cpu_us(admit(key, plain, keyed), 20_000)))
    rows.append(
        ("route rpm_limit, open route, leased", cpu_us(enter(Limits(rpm, store, route_slots, key_slots)), 20_000))
    )
    for name, endpoint in (("route max_parallel_requests 50, slot file", parallel),
                           ("route rpm_limit + max_parallel_requests, leased", both)):  # fmt: skip
        rows.append((name, cpu_us(enter(Limits(endpoint, store, route_slots, key_slots)), 20_000)))
    rows.append(("virtual key with limits + route rpm_limit, leased",
                 cpu_us(admit(key, rpm, Limits(rpm, store, route_slots, key_slots)), 20_000)))  # fmt: skip
    rows.append(("key max_parallel_requests 50 (no other limit)", cpu_us(admit(parallel_key, plain, keyed), 20_000)))
    one_by_one = Leases(opened.keys, most=1)
    info = opened.keys.find(token)
    assert info is not None
    rows.append(("virtual key with limits, one by one", cpu_us(lambda: one_by_one.admit(info, 0.001), 2_000)))
    rows.append(("route rpm_limit, one by one", cpu_us(lambda: one_by_one.admit_route("/one", BIG), 2_000)))

    # A full bound: another process holds all 50 slots; each refusal tries every one of them.
    hold = ("import sys, time; sys.path.insert(0, sys.argv[1]); from passthru.slots import SlotFile, region_of;"
            "s = SlotFile(sys.argv[2]); [s.take(region_of('/r'), 50) for _ in range(50)]; print('held', flush=True);"
            "time.sleep(600)")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", hold, str(ROOT), os.path.join(slots_dir, "routes.slots")],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    full = Limits(parallel, store, route_slots, key_slots)
    assert full.region == region_of("/r")

    def refused() -> object:
        try:
            full.enter(None)
        except RateLimited as exc:
            return exc
        raise AssertionError("a slot was free")

    rows.append(("route max_parallel_requests 50, all 50 held elsewhere: the refusal", cpu_us(refused, 2_000)))
    holder.kill()
    holder.wait()
    holder.stdout.close()
    store.close()
    return rows


def calls(url: str, slots_dir: str, upstream: str, rounds: int = 7) -> list[tuple[str, float]]:
    """Per call: whole calls through the app, the configurations interleaved round by round (the host's load
    moves; a median of rounds compares them at the same moments)."""
    os.environ["PASSTHRU_LIMITS_DIR"] = slots_dir
    server = read_server_settings()
    runs: list[tuple[str, Callable[[], object], Any]] = []
    for name, general, route, caller in (
        ("no limits, no key store", {}, {}, None),
        ("auth: true, virtual key with limits (spend log on)", {"master_key": MASTER}, {"auth": True},
         {"rpm_limit": BIG, "max_budget": 1e12}),
        ("route rpm_limit, no master key (no spend log)", {}, {"rpm_limit": BIG}, None),
        ("route rpm_limit, master key calling (spend log on)", {"master_key": MASTER},
         {"rpm_limit": BIG, "auth": True}, "master"),
        ("route max_parallel_requests, no key store", {}, {"max_parallel_requests": 50}, None),
    ):  # fmt: skip
        entry = {"path": "/r", "target": f"{upstream}/echo", "cost_per_request": 0.001, **route}
        if general or "rpm_limit" in route:  # a store: for the keys, or the route's counts
            general = {**general, "database_url": url}
        raw = {"general_settings": {**general, "pass_through_endpoints": [entry]}}
        app = create_app(parse_settings(raw, "bench", {}), server=server)
        client = app.test_client()
        headers = {}
        if caller == "master":
            headers = {"Authorization": f"Bearer {MASTER}"}
        elif caller is not None:
            made = client.post("/key/generate", json=caller, headers={"Authorization": f"Bearer {MASTER}"})
            headers = {"Authorization": f"Bearer {made.get_json()['key']}"}

        def run(client: Any = client, headers: dict[str, str] = headers) -> object:
            response = client.post("/r", data=b'{"q": 1}', headers=headers, content_type="application/json")
            assert response.status_code == 200, response.data
            response.close()
            return response

        runs.append((name, run, app))
    figures: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    for _ in range(rounds):
        for name, run, app in runs:
            started = time.process_time()
            for _ in range(300):
                run()
            store = app.extensions.get("passthru.key_store")
            if store is not None:  # its spend log entries written, on this configuration's clock
                store.open().spend.flush(10)
            figures[name].append((time.process_time() - started) / 300 * 1e6)
    for _, _, app in runs:
        if "passthru.key_store" in app.extensions:
            app.extensions["passthru.key_store"].close()
    return [(name, statistics.median(values)) for name, values in figures.items()]


def postgres_url() -> str:
    import psycopg

    schema = f"passthru_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect("host=127.0.0.1 port=5432 dbname=test user=postgres", autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"


def main() -> None:
    directory = tempfile.mkdtemp(prefix="passthru-bench-limits-")
    url = postgres_url() if "--postgres" in sys.argv else f"sqlite:///{directory}/bench.db"
    upstream = subprocess.Popen([sys.executable, str(ROOT / "bench" / "py_upstream.py")], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert upstream.stdout is not None
    port = upstream.stdout.readline().strip()
    try:
        print(f"store: {url.split('?')[0]}")
        print("\n| the check alone, per call | CPU µs |\n| --- | --- |")
        for name, us in checks(url, directory):
            print(f"| {name} | {us:.1f} |")
        print("\n| a whole call through the app, one thread | CPU µs |\n| --- | --- |")
        for name, us in calls(url, directory, f"http://127.0.0.1:{port}"):
            print(f"| {name} | {us:.0f} |")
    finally:
        upstream.kill()
        upstream.wait()


if __name__ == "__main__":
    main()
