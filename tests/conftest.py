"""Shared fixtures: a real upstream, passthru served on real sockets (werkzeug in a thread, or real gunicorn)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from upstream import Upstream, start_upstream
from werkzeug.serving import make_server

from passthru import create_app

ROOT = Path(__file__).resolve().parent.parent
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
                   "no_proxy", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")  # fmt: skip


POSTGRES = "host=127.0.0.1 port=5432 dbname=test user=postgres connect_timeout=5"
ON_CI = os.environ.get("CI", "").strip().lower() in ("true", "1")


@pytest.fixture(autouse=True)
def _no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test traffic goes straight to 127.0.0.1 whatever the machine's proxy settings say."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _work_in_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A config with master_key and no database_url makes ./passthru.db: in the test's own folder, not the repo."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATABASE_URL", raising=False)


def require(found: bool, what: str, how: str) -> None:
    """The one rule for a tool a test needs (nginx, PostgreSQL, gevent, systemd-analyze): when it is missing the test
    skips on a laptop, and fails under CI=true, since .ci/run installs every one of them."""
    if found:
        return
    if ON_CI:
        pytest.fail(f"{what} is missing, and CI=true: .ci/run installs it ({how})", pytrace=False)
    pytest.skip(f"{what} is missing ({how})")


def importable(module: str) -> bool:
    """Whether a module can be imported here (gevent is an optional requirement), without importing it."""
    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="session")
def postgres() -> str:
    """The libpq DSN of the test PostgreSQL (.ci/run starts it); `require`d: skipped when it is down, except in CI."""
    try:
        psycopg.connect(POSTGRES).close()
    except psycopg.OperationalError as exc:
        require(False, "PostgreSQL on 127.0.0.1:5432 (database test)", f"not reachable: {str(exc).strip()[:200]}")
    return POSTGRES


def _fresh_schema(dsn: str) -> Iterator[str]:
    """A schema of its own for one test, so runs and tests never see each other's keys; dropped afterwards."""
    schema = f"passthru_test_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        # application_name lets the teardown find this test's connections, in this process or a server's.
        yield (f"postgresql+psycopg://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"
               f"&application_name={schema}")  # fmt: skip
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", (schema,)
            )
            conn.execute("SET lock_timeout = '10s'")
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The key store's URL, once per backend: a SQLite file in the test's folder, a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'keys.db'}"
    else:
        yield from _fresh_schema(request.getfixturevalue("postgres"))


@pytest.fixture
def store(database_url: str) -> Iterator[Any]:
    """The key store itself (keys.SqlKeyStore), migrated, on each backend."""
    from passthru.keystore.sql import (
        open_store,  # here: the test process loads SQLAlchemy only for the tests that use it
    )

    opened = open_store(database_url)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def other_host(database_url: str, store: Any) -> Iterator[Any]:
    """A second store on the same database as `store`, as another host (or worker) would have."""
    from passthru.keystore.engine import open_engine
    from passthru.keystore.sql import SqlKeyStore

    other = SqlKeyStore(open_engine(database_url))
    try:
        yield other
    finally:
        other.close()


@pytest.fixture
def postgres_url(postgres: str) -> Iterator[str]:
    """A fresh PostgreSQL schema's URL, for the tests that are about PostgreSQL only."""
    yield from _fresh_schema(postgres)


@pytest.fixture(scope="session")
def upstream() -> Iterator[Upstream]:
    server = start_upstream()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _fresh_recordings(request: pytest.FixtureRequest) -> None:
    if "upstream" in request.fixturenames:
        request.getfixturevalue("upstream").requests.clear()


def write_config(directory: Path, entries: list[dict[str, Any]], **general: Any) -> Path:
    """A config.yaml with these pass-through entries (and general_settings keys) in `directory`."""
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump({"general_settings": {**general, "pass_through_endpoints": entries}}))
    return path


def own_store(directory: Path) -> str:
    """The default key store for a server process started from the repo root: in the test's folder, not the repo."""
    return f"sqlite:///{directory / 'passthru.db'}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, seconds: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Poll until something accepts on 127.0.0.1:port; fail after `seconds` or once `alive()` is false."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and alive():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listening on 127.0.0.1:{port} after {seconds}s")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """serve(entries, **general) → base URL of passthru built from that config, on werkzeug's threaded server.

    Ask for database_url or postgres_url before serve: fixtures end in reverse, and the server (with its spend log
    writer) must stop before its schema is dropped.
    """
    servers = []

    def start(entries: list[dict[str, Any]], **general: Any) -> str:
        app = create_app(write_config(tmp_path, entries, **general))
        server = make_server("127.0.0.1", 0, app, threaded=True)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append((server, app))
        return f"http://127.0.0.1:{server.server_port}"

    try:
        yield start
    finally:
        for server, app in servers:
            server.shutdown()
            server.server_close()
            if "passthru.key_store" in app.extensions:
                app.extensions["passthru.key_store"].close()
            if "passthru.export" in app.extensions:  # its thread, and its flush at exit
                app.extensions["passthru.export"].close(0.5)


@dataclass
class Server:
    """A real server process on a loopback port (gunicorn, nginx); its output goes to a file (a pipe can fill)."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


Gunicorn = Server  # a real gunicorn running a shipped deploy/gunicorn*.conf.py


def start_server(args: list[str], port: int, log: Path, what: str, env: dict[str, str] | None = None) -> Server:
    """Start a server with its output in `log` and wait (bounded) until it accepts on 127.0.0.1:port; if it does
    not, stop it and fail with what it said."""
    with log.open("wb") as handle:
        process = subprocess.Popen(args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=handle,
                                   stderr=subprocess.STDOUT)  # fmt: skip
    server = Server(process, f"http://127.0.0.1:{port}", log)
    try:
        wait_for_port(port, 15, alive=lambda: process.poll() is None)
    except AssertionError:
        server.stop()
        raise AssertionError(f"{what} did not start:\n{server.output()}") from None
    return server


def start_gunicorn(config: Path | None, log: Path, env: dict[str, str] | None = None, workers: int = 1,
                   conf: str = "deploy/gunicorn.conf.py") -> Gunicorn:  # fmt: skip
    """Start `gunicorn -c deploy/gunicorn.conf.py wsgi:app` on a free port and wait until it accepts.

    `config` becomes PASSTHRU_CONFIG; with None, `env` must say where the config is (PASSTHRU_CONFIG_YAML).
    """
    port = free_port()
    skip = {*PROXY_VARIABLES, "PASSTHRU_CONFIG", "PASSTHRU_CONFIG_YAML"}  # the developer's shell says nothing
    environment = {k: v for k, v in os.environ.items() if k not in skip}
    environment.update(PORT=str(port), HOST="127.0.0.1", WEB_CONCURRENCY=str(workers))
    environment.setdefault("DATABASE_URL", own_store(log.parent))
    if config is not None:
        environment["PASSTHRU_CONFIG"] = str(config)
    environment.update(env or {})
    return start_server([sys.executable, "-m", "gunicorn", "-c", conf, "wsgi:app"], port, log, "gunicorn", environment)


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[Callable[..., Gunicorn]]:
    """gunicorn(entries, env=, workers=, conf=, **general) → a running Gunicorn; stopped after the test."""
    started: list[Gunicorn] = []

    def start(entries: list[dict[str, Any]], env: dict[str, str] | None = None, workers: int = 1,
              conf: str = "deploy/gunicorn.conf.py", **general: Any) -> Gunicorn:  # fmt: skip
        config = write_config(tmp_path, entries, **general)
        server = start_gunicorn(config, tmp_path / "gunicorn.log", env, workers, conf)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


def _fill_accept_queue(listener: socket.socket) -> list[socket.socket]:
    """Connections that fill a listener's accept queue (its backlog is 0): from then on the kernel drops every new
    connection's SYN, so a client gets no answer at all, as from a host behind a dropped route."""
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(listener.getsockname())
        fillers.append(filler)
    time.sleep(0.1)
    return fillers


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port on 127.0.0.1 that never answers: a connect to it hangs until the client's own timeout."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    fillers = _fill_accept_queue(listener)
    try:
        yield int(listener.getsockname()[1])
    finally:
        for sock in [*fillers, listener]:
            sock.close()


class StoreRelay:
    """A TCP relay on 127.0.0.1 to PostgreSQL, until blackhole(): then it cuts every connection it carries and
    answers nothing more (see _fill_accept_queue): a store host that went dark."""

    def __init__(self, target: int = 5432) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=0)
        self.listener.settimeout(0.05)
        self.port = int(self.listener.getsockname()[1])
        self._dark = threading.Event()
        self._sockets: list[socket.socket] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def url(self, url: str) -> str:
        """The same database URL, through this relay."""
        return url.replace("@127.0.0.1:5432/", f"@127.0.0.1:{self.port}/")

    def _accept(self) -> None:
        while not self._dark.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            client.settimeout(None)
            server = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            server.settimeout(None)
            self._sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def blackhole(self) -> None:
        self._dark.set()
        self._accepting.join(5)
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._sockets = _fill_accept_queue(self.listener)

    def close(self) -> None:
        self._dark.set()
        self._accepting.join(5)
        for sock in [*self._sockets, self.listener]:
            sock.close()


@pytest.fixture
def store_relay() -> Iterator[StoreRelay]:
    relay = StoreRelay()
    try:
        yield relay
    finally:
        relay.close()
