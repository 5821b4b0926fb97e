"""What the gunicorn master and its workers load: the key store's driver (SQLAlchemy, Alembic) only in a worker that
needs the store, never in the master, so a worker that serves the master key stays small; the OpenTelemetry SDK only
in workers that export spans."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from conftest import ROOT, Gunicorn, start_gunicorn, write_config
from test_deploy import require_gevent, worker_pid
from upstream import Upstream, wait_until

from passthru.errors import KeyStoreError
from passthru.keystore import engine, sql, store
from passthru.keystore.engine import current_revision, head_revision, open_engine

MASTER = "sk-master-key-for-footprint"
ADMIN = {"Authorization": f"Bearer {MASTER}"}


def entries(upstream: Upstream) -> list[dict[str, object]]:
    return [{"path": "/auth", "target": f"{upstream.url}/echo", "auth": True},
            {"path": "/open", "target": f"{upstream.url}/echo"}]  # fmt: skip


def maps_sqlalchemy(pid: int) -> bool:
    """Whether the process has SQLAlchemy's compiled modules (site-packages/sqlalchemy/*.so) mapped: imported."""
    return "/site-packages/sqlalchemy/" in Path(f"/proc/{pid}/maps").read_text()


def test_without_spend_logs_master_key_and_open_routes_never_load_the_store(
    gunicorn: Callable[..., Gunicorn], upstream: Upstream
) -> None:
    """disable_spend_logs: calls no key pays for are not logged, so a worker serving only those never loads the
    store's driver (by default every call is logged: tests/test_metering.py)."""
    server = gunicorn(entries(upstream), master_key=MASTER, disable_spend_logs=True)
    for _ in range(3):
        assert requests.post(f"{server.url}/auth", json={}, headers=ADMIN, timeout=10).status_code == 200
        assert requests.post(f"{server.url}/open", json={}, timeout=10).status_code == 200
        assert requests.post(f"{server.url}/auth", json={}, timeout=10).status_code == 401  # no key: no store either
        assert requests.get(f"{server.url}/health/liveliness", timeout=10).status_code == 200
    worker = worker_pid(server)
    assert not maps_sqlalchemy(server.process.pid), "the gunicorn master imported SQLAlchemy"
    assert not maps_sqlalchemy(worker), "a worker that served only the master key imported SQLAlchemy"

    # The first virtual-key business opens the store in the worker (and the check above can see it).
    made = requests.post(f"{server.url}/key/generate", json={}, headers=ADMIN, timeout=15)
    assert made.status_code == 200, made.text
    virtual = {"Authorization": f"Bearer {made.json()['key']}"}
    assert requests.post(f"{server.url}/auth", json={}, headers=virtual, timeout=10).status_code == 200
    assert maps_sqlalchemy(worker)
    assert not maps_sqlalchemy(server.process.pid)


def test_route_limits_load_the_store_only_where_a_route_counts_in_it(gunicorn: Callable[..., Gunicorn],
                                                                     upstream: Upstream) -> None:  # fmt: skip
    """No master key: max_parallel_requests is counted on the host and never needs the store; a route's rpm_limit
    does, in the worker that serves that route, the first time."""
    server = gunicorn([{"path": "/parallel", "target": f"{upstream.url}/echo", "max_parallel_requests": 2},
                       {"path": "/counted", "target": f"{upstream.url}/echo", "rpm_limit": 100}])  # fmt: skip
    worker = worker_pid(server)
    for _ in range(3):
        assert requests.post(f"{server.url}/parallel", json={}, timeout=10).status_code == 200
    assert not maps_sqlalchemy(worker) and not maps_sqlalchemy(server.process.pid)
    assert requests.post(f"{server.url}/counted", json={}, timeout=15).status_code == 200
    assert maps_sqlalchemy(worker) and not maps_sqlalchemy(server.process.pid)
    server.stop()
    no_store = gunicorn([{"path": "/parallel", "target": f"{upstream.url}/echo", "max_parallel_requests": 2}])
    assert requests.post(f"{no_store.url}/parallel", json={}, timeout=10).status_code == 200
    ready = requests.get(f"{no_store.url}/health/readiness", timeout=10).json()
    assert ready["db"] == "not configured" and not maps_sqlalchemy(worker_pid(no_store))


@pytest.mark.parametrize("first_use", ["virtual key", "readiness"])
def test_first_use_opens_the_store_once_per_worker(gunicorn: Callable[..., Gunicorn], upstream: Upstream,
                                                   first_use: str) -> None:  # fmt: skip
    server = gunicorn(entries(upstream), master_key=MASTER)
    worker = worker_pid(server)
    if first_use == "readiness":
        answer = requests.get(f"{server.url}/health/readiness", timeout=15)
        assert (answer.status_code, answer.json()["db"]) == (200, "connected")
    else:
        unknown = {"Authorization": "Bearer sk-not-a-key-of-this-store"}
        assert requests.post(f"{server.url}/auth", json={}, headers=unknown, timeout=15).status_code == 401
    assert maps_sqlalchemy(worker)


PROBE = """\
import runpy, sys
settings = runpy.run_path({conf!r})
globals().update({{k: v for k, v in settings.items() if not k.startswith('__')}})
def loaded():
    return ','.join(m for m in ('sqlalchemy', 'alembic') if m in sys.modules) or 'none'
def pre_fork(server, worker):
    print('probe master:', loaded(), flush=True)
def post_request(worker, req, environ, resp):
    print('probe worker:', req.path, loaded(), flush=True)
"""


@pytest.mark.parametrize("conf", ["deploy/gunicorn.conf.py", "deploy/gunicorn.gevent.conf.py"])
def test_workers_of_a_migrating_master_never_import_alembic(tmp_path: Path, upstream: Upstream, conf: str) -> None:
    """The master migrates (in a child, at start and on reload) and tells its workers: they open the store without
    loading Alembic."""
    if conf.endswith("gevent.conf.py"):
        require_gevent()
    probe = tmp_path / "probe.conf.py"
    probe.write_text(PROBE.format(conf=str(ROOT / conf)))
    config = write_config(tmp_path, entries(upstream), master_key=MASTER)
    server = start_gunicorn(config, tmp_path / "gunicorn.log", conf=str(probe))
    try:
        server.process.send_signal(signal.SIGHUP)  # the workers that answer below are forked after the reload
        assert wait_until(lambda: server.output().count("probe master:") == 2, 10), server.output()
        made = requests.post(f"{server.url}/key/generate", json={}, headers=ADMIN, timeout=15)
        assert made.status_code == 200, made.text
        virtual = {"Authorization": f"Bearer {made.json()['key']}"}
        assert requests.post(f"{server.url}/auth", json={}, headers=virtual, timeout=10).status_code == 200
        assert wait_until(lambda: "probe worker: /auth" in server.output(), 5), server.output()
        time.sleep(0.2)
    finally:
        server.stop()
    output = server.output()
    assert re.findall(r"^probe master: (\S+)$", output, re.M) == ["none", "none"], output
    assert re.findall(r"^probe worker: (\S+) (\S+)$", output, re.M) == [("/key/generate", "sqlalchemy"),
                                                                        ("/auth", "sqlalchemy")], output  # fmt: skip


OTEL_PROBE = """\
import runpy, sys
settings = runpy.run_path({conf!r})
globals().update({{k: v for k, v in settings.items() if not k.startswith('__')}})
def loaded():
    return ','.join(m for m in ('opentelemetry', 'opentelemetry.sdk', 'google.protobuf') if m in sys.modules) or 'none'
def pre_fork(server, worker):
    print('probe master:', loaded(), flush=True)
def post_request(worker, req, environ, resp):
    print('probe worker:', loaded(), flush=True)
"""


@pytest.mark.parametrize("export", [False, True])
def test_only_workers_that_export_load_opentelemetry(tmp_path: Path, upstream: Upstream, export: bool) -> None:
    """The W3C trace context needs no package; the SDK, the exporter and protobuf are loaded by a worker only when
    spans are exported, and never by the master, which checks the otel settings all the same."""
    probe = tmp_path / "probe.conf.py"
    probe.write_text(OTEL_PROBE.format(conf=str(ROOT / "deploy/gunicorn.conf.py")))
    config = write_config(tmp_path, [{"path": "/open", "target": f"{upstream.url}/echo"}])
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"} if export else {}
    server = start_gunicorn(config, tmp_path / "gunicorn.log", env, conf=str(probe))
    try:
        answer = requests.get(f"{server.url}/open", headers={"traceparent": f"00-{'1' * 32}-{'2' * 16}-01"}, timeout=10)
        assert answer.status_code == 200 and answer.headers["traceparent"].startswith(f"00-{'1' * 32}-")
        assert wait_until(lambda: "probe worker:" in server.output(), 5), server.output()
    finally:
        server.stop()
    output = server.output()
    assert re.findall(r"^probe master: (\S+)$", output, re.M) == ["none"], output
    worker = "opentelemetry,opentelemetry.sdk,google.protobuf" if export else "none"
    assert re.findall(r"^probe worker: (\S+)$", output, re.M) == [worker], output


def test_threads_at_first_use_share_one_opening(monkeypatch: pytest.MonkeyPatch) -> None:
    """gthread: many calls may need the store at once; one opens it, the others wait for that one. An opening that
    failed is not waited for again: calls fail at once for the cool-off, then the store is tried again."""
    opened: list[object] = []
    failures: list[KeyStoreError] = []
    tried: list[str] = []

    def slow_open(url: str) -> object:
        tried.append(url)
        if failures:
            raise failures.pop()
        time.sleep(0.2)
        opened.append(object())
        return opened[-1]

    monkeypatch.setattr(store, "_open", slow_open)
    lazy = store.LazyStore("sqlite:///never-opened.db")
    start = threading.Barrier(16)

    def first_use() -> object:
        start.wait(5)
        return lazy.open()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: first_use(), range(16), timeout=10))
    assert len(opened) == 1 and all(result is opened[0] for result in results)

    failing = store.LazyStore("sqlite:///never-opened.db", cool_off=0.1)
    failures.append(KeyStoreError("the key store is unavailable; try again shortly"))
    tried.clear()
    for _ in range(3):
        with pytest.raises(KeyStoreError):
            failing.open()
    assert len(tried) == 1  # cooling off: the two calls after the failure did not try
    time.sleep(0.1)
    assert failing.open() is opened[-1] and len(opened) == 2


# --- the master's migration, in a child process ----------------------------------------------------------------


@pytest.fixture
def marker(monkeypatch: pytest.MonkeyPatch) -> None:
    """migrate_in_child sets or drops the variable in os.environ: put it back as it was after the test."""
    monkeypatch.setenv(store.MIGRATED_VARIABLE, "from an earlier migration")


def test_migration_child_migrates_and_tells_the_workers(database_url: str, marker: None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    store.migrate_in_child(database_url)
    engine = open_engine(database_url)
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()
    assert os.environ[store.MIGRATED_VARIABLE] not in ("from an earlier migration", database_url)

    def schema_check(url: str) -> None:
        raise AssertionError(f"{url} was migrated by the master: no schema check")

    monkeypatch.setattr(sql, "open_store", schema_check)
    lazy = store.LazyStore(database_url)
    try:
        assert lazy.open().keys.find("0" * 64) is None
    finally:
        lazy.close()
    with pytest.raises(AssertionError, match="no schema check"):  # another store is checked, as before
        store.LazyStore("sqlite:///another.db").open()


def test_migration_child_failing_says_why_in_one_line(marker: None) -> None:
    with pytest.raises(KeyStoreError) as info:
        store.migrate_in_child("postgresql+psycopg://u:pw-secret-7@127.0.0.1:1/test")
    assert str(info.value).startswith("cannot open the key store at postgresql+psycopg://u:***@127.0.0.1:1/test: ")
    assert "\n" not in str(info.value) and "pw-secret-7" not in str(info.value)
    assert store.MIGRATED_VARIABLE not in os.environ  # the workers will check the schema themselves


def test_migration_child_that_hangs_is_killed(monkeypatch: pytest.MonkeyPatch, marker: None) -> None:
    monkeypatch.setattr(engine, "migrate", lambda url: time.sleep(30))  # the child is a fork: it runs this too
    started = time.monotonic()
    with pytest.raises(KeyStoreError, match=r"took more than 0.5 s and was stopped"):
        store.migrate_in_child("sqlite:///never-migrated.db", timeout=0.5)
    assert time.monotonic() - started < 5
    assert store.MIGRATED_VARIABLE not in os.environ


def test_migration_child_never_quotes_the_password(monkeypatch: pytest.MonkeyPatch, marker: None,
                                                   capfd: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    def broken(url: str) -> str:
        raise RuntimeError(f"cannot use {url}")

    monkeypatch.setattr(engine, "migrate", broken)
    with pytest.raises(KeyStoreError) as info:
        store.migrate_in_child("postgresql+psycopg://u:pw%2Fsecret-8@127.0.0.1:1/test")
    said = str(info.value) + capfd.readouterr().err  # the child's traceback goes to the master's stderr
    assert "RuntimeError: cannot use postgresql+psycopg://u:***@127.0.0.1:1/test" in said
    assert "secret-8" not in said


def test_migration_child_with_an_unexpected_error_says_what(monkeypatch: pytest.MonkeyPatch, marker: None) -> None:
    def broken(url: str) -> str:
        raise RuntimeError("no migrations folder")

    monkeypatch.setattr(engine, "migrate", broken)
    with pytest.raises(KeyStoreError, match="^migrating the key store failed: RuntimeError: no migrations folder$"):
        store.migrate_in_child("sqlite:///never-migrated.db")
