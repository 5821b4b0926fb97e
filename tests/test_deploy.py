"""The deploy recipes, run for real: nginx in front of gunicorn, the gevent config, the Procfile, a config
in $PASSTHRU_CONFIG_YAML; and the systemd unit, checked by systemd-analyze.

A tool the recipe needs (nginx, gevent, systemd-analyze) that is missing skips its test on a laptop; with
CI=true it fails instead, since .ci/run installs each (conftest's `require`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import conftest
import pytest
import requests
from conftest import ROOT, Gunicorn, Server, free_port, importable, require, start_gunicorn, start_server, wait_for_port
from upstream import Upstream, pattern_sha256, wait_until

MIB = 1 << 20


@pytest.mark.parametrize("on_ci", [False, True], ids=["laptop", "ci"])
def test_a_missing_tool_skips_on_a_laptop_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch, on_ci: bool) -> None:
    """conftest's one rule for nginx, PostgreSQL, gevent and systemd-analyze: .ci/run installs them all."""
    monkeypatch.setattr(conftest, "ON_CI", on_ci)
    require(True, "a tool that is here", "nothing to do")  # found: neither skips nor fails
    with pytest.raises((pytest.fail.Exception, pytest.skip.Exception), match="nginx is missing") as raised:
        require(False, "nginx", "apt-get install -y nginx-light")
    assert raised.type is (pytest.fail.Exception if on_ci else pytest.skip.Exception)


def event_arrivals(url: str, headers: dict[str, str] | None = None) -> list[tuple[float, bytes]]:
    """Read a Server-Sent Events answer as it arrives: (arrival time, event) for each complete event."""
    arrivals: list[tuple[float, bytes]] = []
    pending = b""
    with requests.get(url, headers=headers, stream=True, timeout=(5, 10)) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        for piece in response.iter_content(chunk_size=None):  # each piece as it comes off the socket
            pending += piece
            while b"\n\n" in pending:
                event, pending = pending.split(b"\n\n", 1)
                arrivals.append((time.monotonic(), event))
    assert pending == b""
    return arrivals


def assert_events_one_by_one(arrivals: list[tuple[float, bytes]]) -> None:
    """Five events sent 0.3 s apart arrive apart: nothing on the way collected them into one piece."""
    assert [event for _, event in arrivals] == [f"data: {i}".encode() for i in range(5)]
    gaps = [later - earlier for (earlier, _), (later, _) in zip(arrivals, arrivals[1:], strict=False)]
    assert min(gaps) >= 0.15, f"events arrived bunched together: gaps {[round(g, 3) for g in gaps]}"


# --- nginx in front of gunicorn (deploy/nginx.conf) ---------------------------------------------------------


Nginx = Server  # SIGTERM is nginx's fast shutdown; its errors go to the same output (-e stderr)


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


def replace_once(text: str, old: str, new: str) -> str:
    """Substitute a line the test relies on; fail loudly if the shipped file no longer has it exactly once."""
    assert text.count(old) == 1, f"deploy/nginx.conf should contain {old!r} exactly once"
    return text.replace(old, new)


def render_nginx_conf(directory: Path, listen_port: int, passthru_port: int) -> Path:
    """deploy/nginx.conf as shipped, in a complete nginx.conf whose every path is inside `directory`."""
    site = (ROOT / "deploy" / "nginx.conf").read_text()
    site = replace_once(site, "server 127.0.0.1:4000;", f"server 127.0.0.1:{passthru_port};")
    site = replace_once(site, "listen 80;", f"listen 127.0.0.1:{listen_port};")
    temp = "\n".join(
        f"    {kind}_temp_path {directory / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # As root, nginx would run its workers as `nobody`, who cannot enter pytest's private temporary directory.
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = directory / "nginx.conf"
    conf.write_text(
        f"{user}worker_processes 1;\n"
        "error_log stderr notice;\n"  # into the output start_server keeps, which tests read (buffering notices)
        f"pid {directory / 'nginx.pid'};\n"
        "events { worker_connections 1024; }\n"  # room for more slow clients than passthru has threads
        "http {\n"
        f"    access_log {directory / 'access.log'};\n"
        "    default_type application/octet-stream;\n"
        f"{temp}\n"
        f"{site}\n"
        "}\n"
    )
    return conf


def start_nginx(directory: Path, passthru_port: int) -> Nginx:
    binary = nginx_binary()
    require(binary is not None, "nginx", "apt-get install -y nginx-light")
    assert binary is not None
    directory.mkdir()
    port = free_port()
    conf = render_nginx_conf(directory, port, passthru_port)
    # -e stderr: nginx's own errors land in the output start_server shows when it does not start.
    args = [binary, "-p", str(directory), "-c", str(conf), "-e", "stderr", "-g", "daemon off;"]
    return start_server(args, port, directory / "stderr.log", "nginx")


@pytest.fixture
def behind_nginx(gunicorn: Callable[..., Gunicorn], tmp_path: Path) -> Iterator[Callable[..., tuple[Nginx, Gunicorn]]]:
    """behind_nginx(entries) → (nginx, gunicorn): the shipped nginx.conf in front of the shipped gunicorn."""
    started: list[Nginx] = []

    def start(entries: list[dict[str, Any]], **general: Any) -> tuple[Nginx, Gunicorn]:
        require(nginx_binary() is not None, "nginx", "apt-get install -y nginx-light")
        app = gunicorn(entries, **general)
        server = start_nginx(tmp_path / "nginx", int(app.url.rsplit(":", 1)[1]))
        started.append(server)
        return server, app

    try:
        yield start
    finally:
        for server in started:
            server.stop()


def test_nginx_relays_events_one_by_one(
    behind_nginx: Callable[..., tuple[Nginx, Gunicorn]], upstream: Upstream
) -> None:
    nginx, app = behind_nginx([{"path": "/sse", "target": f"{upstream.url}/sse"}])
    try:
        assert_events_one_by_one(event_arrivals(f"{nginx.url}/sse?n=5&gap=0.3"))
    except AssertionError:
        print(nginx.output(), app.output(), sep="\n")
        raise


def test_nginx_sets_the_forwarded_host_and_keeps_errors_json(
    behind_nginx: Callable[..., tuple[Nginx, Gunicorn]], upstream: Upstream
) -> None:
    nginx, _ = behind_nginx([{"path": "/e", "target": f"{upstream.url}/echo"}])
    response = requests.get(f"{nginx.url}/e", headers={"Host": "api.example.test"}, timeout=10)
    assert response.status_code == 200
    (seen,) = upstream.requests
    assert seen.header("X-Forwarded-Host") == "api.example.test"
    assert seen.header("X-Forwarded-Proto") == "http"
    # passthru's own answers come through nginx unchanged (no nginx error page in their place).
    missing = requests.get(f"{nginx.url}/nowhere", timeout=10)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "404"


def test_nginx_paces_a_download_to_the_client(
    behind_nginx: Callable[..., tuple[Nginx, Gunicorn]], upstream: Upstream
) -> None:
    """A slow client holds the answer back all the way up: nginx keeps no copy of it (proxy_buffering off).

    With buffering on, nginx would read the whole answer at the upstream's pace into a temporary file.
    """
    nginx, _ = behind_nginx([{"path": "/bytes", "target": f"{upstream.url}/bytes"}])
    size = 32 * MIB
    received = hashlib.sha256()
    with requests.get(f"{nginx.url}/bytes?size={size}", stream=True, timeout=(5, 30)) as response:
        assert response.status_code == 200
        pieces = response.iter_content(chunk_size=64 * 1024)
        received.update(next(pieces))
        time.sleep(1)  # a slow client: a buffering nginx would fetch the rest meanwhile
        for piece in pieces:
            received.update(piece)
    assert received.hexdigest() == pattern_sha256(size)
    assert "buffered to a temporary file" not in nginx.output()


def processes() -> Iterator[tuple[int, str, int, int]]:
    """(pid, state, parent pid, process group) of every process, from /proc."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except OSError:
            continue  # gone meanwhile
        yield int(stat.parent.name), state, int(ppid), int(pgrp)


def worker_pid(app: Gunicorn) -> int:
    """The one worker of a gunicorn started with workers=1: the master's only child. Its listening socket accepts
    before the master has forked the worker, so this waits for it (bounded)."""
    children: list[int] = []

    def forked() -> bool:
        children[:] = [pid for pid, _, ppid, _ in processes() if ppid == app.process.pid]
        return len(children) == 1

    assert wait_until(forked, 10), f"expected one gunicorn worker, found {children}"
    return children[0]


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no {field}")


@pytest.mark.slow
def test_nginx_streams_a_200_mib_upload(
    behind_nginx: Callable[..., tuple[Nginx, Gunicorn]], upstream: Upstream
) -> None:
    nginx, app = behind_nginx([{"path": "/upload", "target": f"{upstream.url}/echo"}])
    assert requests.post(f"{nginx.url}/upload", data=b"warm-up", timeout=10).status_code == 200
    upstream.requests.clear()
    pid = worker_pid(app)
    try:  # reset the worker's peak RSS (VmHWM), so the peak read afterwards is this upload's
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass  # older kernels: the peak then also covers start-up, which only makes the check stricter
    before = memory_kib(pid, "VmRSS")
    sent = hashlib.sha256()

    def body() -> Iterator[bytes]:  # no length: requests sends it chunked, and nothing holds it whole
        block = bytes(range(256)) * (MIB // 256)
        for i in range(200):
            piece = i.to_bytes(4, "big") + block[4:]  # every MiB different, so a lost or repeated one shows
            sent.update(piece)
            yield piece

    response = requests.post(f"{nginx.url}/upload", data=body(), timeout=(5, 120))
    peak = memory_kib(pid, "VmHWM")
    assert response.status_code == 200, f"{response.text}\n{nginx.output()}\n{app.output()}"
    assert (response.json()["body_len"], response.json()["body_sha256"]) == (200 * MIB, sent.hexdigest())
    growth_mib = (peak - before) / 1024
    assert growth_mib < 30, f"the worker grew {growth_mib:.1f} MiB during a 200 MiB upload"
    # nginx did not spool the upload to a temporary file first (proxy_request_buffering off).
    assert "buffered to a temporary file" not in nginx.output()


# --- $PASSTHRU_CONFIG_YAML and the Procfile -----------------------------------------------------------------

YAML_ONLY = """
general_settings:
  pass_through_endpoints:
    - path: /e
      target: {url}/echo
      headers:
        X-Injected: os.environ/INJECTED_VALUE
"""


def test_gunicorn_runs_on_passthru_config_yaml_alone(tmp_path: Path, upstream: Upstream) -> None:
    env = {
        "PASSTHRU_CONFIG_YAML": YAML_ONLY.format(url=upstream.url),
        "INJECTED_VALUE": "from-the-environment",
    }
    assert not (ROOT / "config.yaml").exists()  # the default file is not what is being read
    app = start_gunicorn(None, tmp_path / "gunicorn.log", env)
    try:
        response = requests.post(f"{app.url}/e", data=b"hello", timeout=10)
        assert response.status_code == 200, app.output()
        (seen,) = upstream.requests
        assert (seen.body_len, seen.header("X-Injected")) == (5, "from-the-environment")
    finally:
        app.stop()


def test_a_bad_passthru_config_yaml_stops_gunicorn_naming_the_variable(tmp_path: Path) -> None:
    env = {"PASSTHRU_CONFIG_YAML": "general_settings:\n  pass_through_endpoints: 3\n"}
    with pytest.raises(AssertionError, match="did not start") as info:
        start_gunicorn(None, tmp_path / "gunicorn.log", env)
    assert "passthru: $PASSTHRU_CONFIG_YAML: general_settings.pass_through_endpoints: must be a list" in str(info.value)


def test_procfile_command_honours_port_and_web_concurrency(tmp_path: Path, upstream: Upstream) -> None:
    (line,) = (ROOT / "Procfile").read_text().splitlines()
    kind, command = line.split(":", 1)
    assert (kind, command.strip()) == ("web", "gunicorn -c deploy/gunicorn.conf.py wsgi:app")
    # A platform runs the line in a shell with its own `gunicorn` on PATH; here that is this interpreter's.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gunicorn").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m gunicorn "$@"\n')
    (bin_dir / "gunicorn").chmod(0o755)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PASSTHRU_") and "proxy" not in k.lower()}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.update(PORT=str(port), WEB_CONCURRENCY="2", HOST="127.0.0.1", INJECTED_VALUE="v")
    env["PASSTHRU_CONFIG_YAML"] = YAML_ONLY.format(url=upstream.url)
    log = tmp_path / "procfile.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["/bin/sh", "-c", command],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for_port(port, 15, alive=lambda: process.poll() is None)
        assert requests.get(f"http://127.0.0.1:{port}/e", timeout=10).status_code == 200
        deadline = time.monotonic() + 10
        while log.read_text().count("Booting worker") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert log.read_text().count("Booting worker") == 2, log.read_text()
    finally:
        stop_group(process)
    assert not group_alive(process.pid), "gunicorn did not stop on SIGTERM"


def group_alive(group: int) -> bool:
    """Whether any process of the group still runs (a zombie waiting for its parent to reap it does not)."""
    return any(pgrp == group and state != "Z" for _, state, _, pgrp in processes())


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group, as a platform stops a dyno: the shell may not have exec'd gunicorn."""
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(10)
    deadline = time.monotonic() + 15
    while group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if group_alive(process.pid):
        os.killpg(process.pid, signal.SIGKILL)


# --- gevent workers (deploy/gunicorn.gevent.conf.py) --------------------------------------------------------

GEVENT_CONF = "deploy/gunicorn.gevent.conf.py"


def require_gevent() -> None:
    require(importable("gevent"), "gevent", "pip install -r requirements-gevent.txt")


def test_gevent_config_forwards_and_streams(gunicorn: Callable[..., Gunicorn], upstream: Upstream) -> None:
    require_gevent()
    app = gunicorn(
        [{"path": "/e", "target": f"{upstream.url}/echo"}, {"path": "/sse", "target": f"{upstream.url}/sse"}],
        conf=GEVENT_CONF,
    )
    response = requests.post(f"{app.url}/e", data=b"x" * 100_000, timeout=10)
    assert response.status_code == 200, app.output()
    assert response.json()["body_sha256"] == hashlib.sha256(b"x" * 100_000).hexdigest()
    assert_events_one_by_one(event_arrivals(f"{app.url}/sse?n=5&gap=0.3"))
    assert "Using worker: passthru.server.gevent_worker.HeadDeadlineGeventWorker" in app.output()
    # Patched too late, urllib3 would keep the blocking ssl module, and gevent says so.
    assert "MonkeyPatchWarning" not in app.output()


def test_gevent_worker_imports_the_app_after_patching(tmp_path: Path, upstream: Upstream) -> None:
    """urllib3 in the worker holds gevent's SSLContext and socket: TLS to an upstream yields to others."""
    require_gevent()
    probe = tmp_path / "probe.conf.py"
    probe.write_text(
        "import runpy\n"
        f"settings = runpy.run_path({str(ROOT / GEVENT_CONF)!r})\n"
        "globals().update({k: v for k, v in settings.items() if not k.startswith('__')})\n"
        "def post_worker_init(worker):\n"
        "    import urllib3.util.connection, urllib3.util.ssl_\n"
        "    print('probe:', urllib3.util.ssl_.SSLContext.__module__,\n"
        "          urllib3.util.connection.socket.socket.__module__, flush=True)\n"
    )
    config = tmp_path / "config.yaml"
    config.write_text(YAML_ONLY.format(url=upstream.url))
    app = start_gunicorn(config, tmp_path / "gunicorn.log", {"INJECTED_VALUE": "v"}, conf=str(probe))
    try:
        deadline = time.monotonic() + 10
        while "probe:" not in app.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        (line,) = [line for line in app.output().splitlines() if line.startswith("probe:")]
        assert line.split()[1:] == ["gevent.ssl", "gevent._socket3"], app.output()
    finally:
        app.stop()


def test_gevent_config_stops_on_a_bad_config_with_one_line(tmp_path: Path) -> None:
    require_gevent()
    with pytest.raises(AssertionError, match="did not start") as info:
        start_gunicorn(tmp_path / "missing.yaml", tmp_path / "gunicorn.log", conf=GEVENT_CONF)
    assert f"passthru: {tmp_path / 'missing.yaml'}: cannot read the config file" in str(info.value)
    assert "Traceback" not in str(info.value)


# --- systemd (deploy/passthru.service) ----------------------------------------------------------------------


def rendered_unit(tmp_path: Path) -> Path:
    """The unit with this checkout and interpreter for /opt/passthru: verify checks that ExecStart exists."""
    text = (ROOT / "deploy" / "passthru.service").read_text()
    text = replace_once(text, "ExecStart=/opt/passthru/.venv/bin/python ", f"ExecStart={sys.executable} ")
    unit = tmp_path / "passthru.service"
    unit.write_text(text.replace("/opt/passthru", str(ROOT)))
    return unit


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    require(tool is not None, "systemd-analyze", "apt-get install -y systemd")
    assert tool is not None
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    result = systemd_analyze("verify", str(rendered_unit(tmp_path)))
    # verify exits 0 on unknown or misspelt keys, but names them: any output is a finding.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_systemd_unit_is_hardened(tmp_path: Path) -> None:
    offline = "--offline" in systemd_analyze("--help").stdout
    require(offline, "a systemd-analyze that judges a unit file offline", "systemd 250 or later: Debian 12's systemd")
    result = systemd_analyze("security", "--offline=yes", "--threshold=20", str(rendered_unit(tmp_path)))
    # Exposure 0.0 (locked down) to 10.0 (unprotected), times ten: at most 2.0, systemd's "OK".
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
