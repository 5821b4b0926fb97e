"""What must never leave passthru: the store's password in any output, the master key upstream in any spelling, a
caller's claim to be another client address, and the key store's file to other users of the host."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from conftest import PROXY_VARIABLES, ROOT, Gunicorn, free_port, start_gunicorn, write_config
from upstream import Upstream, start_upstream

from passthru import create_app

MASTER = "sk-master-secrets-5d1e"
USER_PASSWORD = "hunter2-userinfo-9a"
QUERY_PASSWORD = "hunter2-query-3c"


# --- the store's password, in the user part or the query of its URL --------------------------------------------


@pytest.fixture(params=["userinfo", "query", "query-escaped-name"])
def store_url(request: pytest.FixtureRequest) -> str:
    """A PostgreSQL URL with a password, on a loopback port where nothing listens: every use of it fails."""
    port = free_port()
    return {
        "userinfo": f"postgresql://postgres:{USER_PASSWORD}@127.0.0.1:{port}/test",
        "query": f"postgresql://postgres@127.0.0.1:{port}/test?sslmode=disable&PassWord={QUERY_PASSWORD}",
        "query-escaped-name": f"postgresql://postgres@127.0.0.1:{port}/test?pass%77ord={QUERY_PASSWORD}",
    }[request.param]


def _config(directory: Path, database_url: str) -> Path:
    path = directory / "config.yaml"
    # The target's host is not the store's: readiness names targets by host, and must never name the store's host.
    routes = [{"path": "/v1", "target": "http://upstream.test:9/v1", "auth": True}]
    general = {"master_key": MASTER, "database_url": database_url, "pass_through_endpoints": routes}
    path.write_text(yaml.safe_dump({"general_settings": general}))
    return path


def _run(args: list[str], directory: Path) -> str:
    """A passthru command, bounded, from the repo root: everything it printed."""
    env = {k: v for k, v in os.environ.items() if k not in {*PROXY_VARIABLES, "DATABASE_URL", "PASSTHRU_CONFIG"}}
    out = directory / "out.txt"
    with out.open("wb") as handle:
        subprocess.run([sys.executable, "-m", "passthru", *args], cwd=ROOT, env=env, stdout=handle,
                       stderr=subprocess.STDOUT, timeout=60)  # fmt: skip
    return out.read_text()


def _assert_masked(text: str) -> None:
    assert USER_PASSWORD not in text and QUERY_PASSWORD not in text, text
    assert "***" in text, text  # the URL was shown, masked: the test saw the output it is about


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["check"], id="check"),
        pytest.param(["db", "upgrade"], id="db-upgrade"),
        pytest.param(["keys", "list"], id="keys-list"),
        pytest.param(["--detailed_debug"], id="start-up"),  # the server: its master cannot migrate, and stops
    ],
)
def test_the_store_password_is_masked_in_every_command(store_url: str, tmp_path: Path, args: list[str]) -> None:
    config = _config(tmp_path, store_url)
    serve = ["--port", str(free_port())] if args[0].startswith("--") else []
    _assert_masked(_run([*args, "--config", str(config), *serve], tmp_path))


def test_the_store_password_is_masked_in_debug_lines_and_readiness(
    store_url: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    app = create_app(_config(tmp_path, store_url), detailed_debug=True)
    try:
        response = app.test_client().get("/health/readiness")
        assert response.status_code == 503
        body = response.get_data(as_text=True)
    finally:
        app.extensions["passthru.key_store"].close()
    output = capfd.readouterr().err
    assert "key store: postgresql+psycopg://" in output  # the debug line that names the store
    _assert_masked(output)
    assert USER_PASSWORD not in body and QUERY_PASSWORD not in body and "127.0.0.1" not in body


# --- the master key upstream, in every spelling a server would accept ---------------------------------------------


@pytest.fixture(scope="module")
def open_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gunicorn, Upstream]]:
    """Real gunicorn (it joins repeated header lines as the WSGI spec says), an auth: false forward_headers route."""
    directory = tmp_path_factory.mktemp("secrets")
    upstream = start_upstream()
    entries = [{"path": "/open", "target": f"{upstream.url}/echo", "forward_headers": True}]
    server = start_gunicorn(write_config(directory, entries, master_key=MASTER), directory / "gunicorn.log",
                            {"DATABASE_URL": f"sqlite:///{directory}/k.db"})  # fmt: skip
    try:
        yield server, upstream
    finally:
        server.stop()
        upstream.stop()


def _send_raw(server: Gunicorn, headers: bytes) -> int:
    port = int(server.url.rsplit(":", 1)[1])
    request = b"GET /open HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Kept: yes\r\n" + headers + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


KEY = MASTER.encode()


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(b"Authorization: Bearer " + KEY + b"\r\n", id="bearer"),
        pytest.param(b"Authorization: " + KEY + b"\r\n", id="no-scheme"),
        pytest.param(b"Authorization: bEaReR " + KEY + b"\r\n", id="bearer-any-case"),
        pytest.param(b"Authorization: Bearer\t \t" + KEY + b"\r\n", id="bearer-tabs-and-spaces"),
        pytest.param(
            b"Authorization: Bearer sk-other-key\r\nAuthorization: Bearer " + KEY + b"\r\n", id="second-of-two-lines"
        ),
        pytest.param(
            b"Authorization: Bearer " + KEY + b"\r\nAuthorization: Bearer sk-other-key\r\n", id="first-of-two-lines"
        ),
        pytest.param(b"Authorization: Bearer sk-other-key, Bearer " + KEY + b"\r\n", id="comma-joined"),
        pytest.param(b"x-litellm-api-key: " + KEY + b"\r\n", id="x-litellm-api-key"),
        pytest.param(b"x-litellm-api-key: Bearer  " + KEY + b"\r\n", id="x-litellm-api-key-bearer"),
        pytest.param(b"api-key: " + KEY + b"\r\n", id="api-key"),
        pytest.param(b"X-Api-Key: " + KEY + b"\r\n", id="x-api-key"),
        pytest.param(b"x-api-key: sk-other-key\r\nx-api-key: " + KEY + b"\r\n", id="x-api-key-two-lines"),
        pytest.param(b"X-Goog-Api-Key: " + KEY + b"\r\n", id="x-goog-api-key"),
    ],
)
def test_the_master_key_never_goes_upstream(open_rig: tuple[Gunicorn, Upstream], headers: bytes) -> None:
    server, upstream = open_rig
    before = len(upstream.requests)
    assert _send_raw(server, headers) == 200
    [seen] = upstream.requests[before:]
    assert seen.header("X-Kept") == "yes"  # the caller's other headers are relayed: forward_headers is on
    assert not [(name, value) for name, value in seen.headers if MASTER in value]


def test_other_credentials_are_relayed(open_rig: tuple[Gunicorn, Upstream]) -> None:
    """Only the master key is held back on an open route: the upstream's own credentials are the caller's business."""
    server, upstream = open_rig
    before = len(upstream.requests)
    assert _send_raw(server, b"Authorization: Bearer up-own-key\r\nX-Api-Key: up-other\r\n") == 200
    [seen] = upstream.requests[before:]
    assert seen.header("Authorization") == "Bearer up-own-key" and seen.header("X-Api-Key") == "up-other"


# --- client-address headers ------------------------------------------------------------------------------------

CLIENT_ADDRESS = {
    "Forwarded": "for=203.0.113.9",
    "X-Real-IP": "203.0.113.9",
    "True-Client-IP": "203.0.113.9",
    "X-Client-IP": "203.0.113.9",
    "CF-Connecting-IP": "203.0.113.9",
    "Fastly-Client-IP": "203.0.113.9",
}


@pytest.mark.parametrize(("allow", "relayed"), [("192.0.2.1", False), ("127.0.0.1", True)], ids=["other", "front"])
def test_client_address_headers_only_from_a_trusted_front(
    serve: Callable[..., str], upstream: Upstream, monkeypatch: pytest.MonkeyPatch, allow: str, relayed: bool
) -> None:
    import requests

    monkeypatch.setenv("FORWARDED_ALLOW_IPS", allow)  # the test client is 127.0.0.1: trusted, or not
    base = serve([{"path": "/open", "target": f"{upstream.url}/echo", "forward_headers": True}])
    assert requests.get(f"{base}/open", headers={**CLIENT_ADDRESS, "X-Kept": "yes"}, timeout=10).status_code == 200
    [seen] = upstream.requests
    assert seen.header("X-Kept") == "yes"
    got = {name: seen.header(name) for name in CLIENT_ADDRESS}
    assert got == (CLIENT_ADDRESS if relayed else dict.fromkeys(CLIENT_ADDRESS))


# --- the SQLite key store's files ------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o000], ids=["umask-022", "umask-000"])
def test_the_sqlite_store_is_readable_by_its_owner_only(tmp_path: Path, umask: int) -> None:
    from passthru.keystore.records import NewKey
    from passthru.keystore.sql import open_store

    path = tmp_path / "keys.db"
    previous = os.umask(umask)
    try:
        store = open_store(f"sqlite:///{path}")
        try:
            store.create(NewKey(token="ab" * 32, key_name="sk-...abab"))  # a write: the -wal and -shm exist now
            files = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
            modes = {file.name: stat.S_IMODE(file.stat().st_mode) for file in files}
        finally:
            store.close()
    finally:
        os.umask(previous)
    assert modes == dict.fromkeys(modes, 0o600)
