"""The command line as an operator runs it: `passthru check`, `python -m passthru` and the installed `passthru`,
gunicorn and flask run.

Every command runs as a real subprocess from the repo root; its output goes to files (a full pipe blocks a
server) and every process is stopped, bounded, in `finally`.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import PROXY_VARIABLES, ROOT, free_port, own_store, wait_for_port
from upstream import Upstream

SECRETS = {
    "MK": "sk-master-7f3a9c0d2e",
    "UPSTREAM_KEY": "up-secret-51b8e4a6",
    "TARGET_KEY": "tk-secret-0c9d7e21",
    "LF_PUBLIC": "pk-lf-cli-4d2a",
    "LF_SECRET": "sk-lf-cli-93be",
    "QUERY_KEY": "qk-secret-a81f3c",
}
LITERAL_SECRET = "literal-secret-6e0b2f"


def _environment(**extra: str) -> dict[str, str]:
    """The test's environment without proxies or Flask/gunicorn settings that would change what runs."""
    drop = set(PROXY_VARIABLES) | {"PASSTHRU_CONFIG", "PORT", "HOST", "WEB_CONCURRENCY", "GUNICORN_CMD_ARGS",
                                   "JSON_LOGS", "FLASK_APP", "FLASK_DEBUG", "FLASK_RUN_PORT",
                                   "FLASK_RUN_HOST"}  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["DATABASE_URL"] = own_store(Path.cwd())  # the test's folder (conftest's _work_in_tmp)
    env.update(extra)
    return env


def _config(path: Path, document: dict[str, Any] | str) -> Path:
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document))
    return path


def _run(args: list[str], tmp_path: Path, env: dict[str, str], timeout: float = 30) -> tuple[int, str, str]:
    """Run to completion (bounded) with stdout and stderr captured to files: (exit status, stdout, stderr)."""
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        done = subprocess.run(args, cwd=ROOT, env=env, stdout=stdout, stderr=stderr, timeout=timeout)
    return done.returncode, out.read_text(), err.read_text()


@contextmanager
def _server(args: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """A long-running command with its output in `log`; SIGTERM (then SIGKILL), bounded, at the end."""
    with log.open("wb") as handle:
        process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def _get(port: int, target: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    with closing(http.client.HTTPConnection("127.0.0.1", port, timeout=10)) as conn:
        conn.request("GET", target, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()


def _wait_for_text(path: Path, text: str, seconds: float) -> bool:
    """Poll a log file until it contains text (lines lag the answers they describe); False after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return True
        time.sleep(0.05)
    return False


def _assert_no_secret(*texts: str) -> None:
    for text in texts:
        for value in (*SECRETS.values(), LITERAL_SECRET):
            assert value not in text, f"{value} leaked in:\n{text}"


# ------------------------------------------------------------------------------------------------------------
# passthru check


def test_check_lists_routes_and_masks_secrets(tmp_path: Path) -> None:
    config = _config(tmp_path / "config.yaml", {
        "model_list": [{"model_name": "ignored"}],
        "general_settings": {
            "master_key": "os.environ/MK",
            "pass_through_endpoints": [
                {"path": "/v1/rerank", "target": "http://127.0.0.1:9/v1/rerank?key=os.environ/TARGET_KEY",
                 "auth": True, "headers": {"Authorization": "bearer os.environ/UPSTREAM_KEY",
                                           "X-Literal": LITERAL_SECRET, "accept": "application/json"}},
                {"path": "/api/public/ingestion", "target": "http://127.0.0.1:9/api/public/ingestion",
                 "auth": True, "methods": ["POST"],
                 "headers": {"LANGFUSE_PUBLIC_KEY": "os.environ/LF_PUBLIC",
                             "LANGFUSE_SECRET_KEY": "os.environ/LF_SECRET"}},
                {"path": "/files", "target": "http://127.0.0.1:9/storage", "include_subpath": True,
                 "forward_headers": True, "timeout": 30, "default_query_params": {"api-version": "2024-01"}},
            ],
        },
    })  # fmt: skip
    status, out, err = _run([sys.executable, "-m", "passthru", "check", "--config", str(config)], tmp_path,
                            _environment(**SECRETS))  # fmt: skip
    assert status == 0, err
    assert f"{config}: ok, 3 route(s)" in out
    assert "/v1/rerank -> http://127.0.0.1:9/v1/rerank?key=***" in out
    assert "/api/public/ingestion -> http://127.0.0.1:9/api/public/ingestion  [POST]" in out
    assert "/files/** -> http://127.0.0.1:9/storage" in out and "timeout=30s" in out
    assert "Authorization: ***" in out and "X-Literal: ***" in out and "accept: ***" in out
    assert "?api-version=2024-01" in out
    assert err == ""  # both routes that inject secrets have auth: true, so no warning
    _assert_no_secret(out, err)


def test_check_warns_about_unauthenticated_secret_routes(tmp_path: Path) -> None:
    config = _config(tmp_path / "config.yaml", {"general_settings": {"pass_through_endpoints": [
        {"path": "/v1/rerank", "target": "http://127.0.0.1:9/v1/rerank",
         "headers": {"Authorization": "bearer os.environ/UPSTREAM_KEY"}},
    ]}})  # fmt: skip
    status, out, err = _run([sys.executable, "-m", "passthru", "check", "--config", str(config)], tmp_path,
                            _environment(**SECRETS))  # fmt: skip
    assert status == 0
    assert "Authorization: ***" in out
    assert err.count("\n") == 1 and "/v1/rerank" in err and "auth: false" in err
    _assert_no_secret(out, err)


def test_check_says_where_spans_are_exported(tmp_path: Path) -> None:
    config = _config(tmp_path / "config.yaml", {"general_settings": {"pass_through_endpoints": [], "otel": {
        "endpoint": "https://collector.example/os.environ/QUERY_KEY", "headers": {"x-key": "os.environ/UPSTREAM_KEY"},
    }}})  # fmt: skip
    status, out, err = _run([sys.executable, "-m", "passthru", "check", "--config", str(config)], tmp_path,
                            _environment(**SECRETS))  # fmt: skip
    assert status == 0, err
    assert "  traces: exported to https://collector.example/***/v1/traces" in out
    _assert_no_secret(out, err)
    status, out, err = _run([sys.executable, "-m", "passthru", "check", "--config", str(config)], tmp_path,
                            _environment(**SECRETS, OTEL_SDK_DISABLED="true"))  # fmt: skip
    assert status == 0 and "traces:" not in out, err


def test_check_masks_environment_values_in_default_query_params(tmp_path: Path) -> None:
    """A default query parameter often is the API key (`key=` for Google): check must not print its value."""
    config = _config(tmp_path / "config.yaml", {"general_settings": {"pass_through_endpoints": [
        {"path": "/v1/gemini", "target": "http://127.0.0.1:9/v1",
         "default_query_params": {"key": "os.environ/QUERY_KEY"}},
    ]}})  # fmt: skip
    status, out, err = _run([sys.executable, "-m", "passthru", "check", "--config", str(config)], tmp_path,
                            _environment(**SECRETS))  # fmt: skip
    assert status == 0, err
    assert "/v1/gemini -> http://127.0.0.1:9/v1" in out
    _assert_no_secret(out, err)


def test_check_lists_route_limits_and_the_store_that_counts_them(tmp_path: Path) -> None:
    config = _config(tmp_path / "config.yaml", {"general_settings": {"pass_through_endpoints": [
        {"path": "/v1/chat", "target": "http://127.0.0.1:9/chat", "rpm_limit": 600, "max_parallel_requests": 50},
    ]}})  # fmt: skip
    status, out, err = _run([sys.executable, "-m", "passthru", "check", "--config", str(config)], tmp_path,
                            _environment())  # fmt: skip
    assert status == 0, err
    assert "/v1/chat -> http://127.0.0.1:9/chat  [" in out
    assert "timeout=600s rpm_limit=600 max_parallel_requests=50" in out
    assert "  key store: sqlite:///" in out  # no master key: the store is there for the rpm counts


ENTRY = "general_settings.pass_through_endpoints[0] (/v1/x)"
UNSET_MESSAGE = "environment variable NOT_SET_X is not set"


def _unset_variable_config(tmp_path: Path) -> Path:
    return _config(tmp_path / "config.yaml", {"general_settings": {"pass_through_endpoints": [
        {"path": "/v1/x", "target": "http://127.0.0.1:9/x",
         "headers": {"Authorization": "os.environ/NOT_SET_X"}},
    ]}})  # fmt: skip


@pytest.mark.parametrize(
    "entry, needles",
    [
        pytest.param({"auth": "true"}, [f"{ENTRY}.auth: ", "true or false"], id="quoted-boolean"),
        pytest.param({"target": None}, [f"{ENTRY}.target: is required"], id="missing-target"),
        pytest.param({"headers": {"Authorization": "bearer os.environ/PASSTHRU_TEST_UNSET"}},
                     [f"{ENTRY}.headers.Authorization: ", "PASSTHRU_TEST_UNSET is not set"], id="unset-env"),
        pytest.param({"include_subpaths": True}, [f"{ENTRY}.include_subpaths: unknown field",
                                                   "did you mean include_subpath"], id="misspelt-field"),
        pytest.param({"timeout": -1}, [f"{ENTRY}.timeout: "], id="negative-timeout"),
        pytest.param({"target": "ftp://127.0.0.1/x"}, [f"{ENTRY}.target: "], id="bad-scheme"),
        pytest.param({"rpm_limit": 0}, [f"{ENTRY}.rpm_limit: must be from 1"], id="rpm-limit-zero"),
    ],
)  # fmt: skip
def test_check_bad_config_says_one_line(tmp_path: Path, entry: dict[str, Any], needles: list[str]) -> None:
    fields = {"path": "/v1/x", "target": "http://127.0.0.1:9/x",
              "headers": {"X-Key": "os.environ/UPSTREAM_KEY"}}  # fmt: skip
    fields.update(entry)
    fields = {k: v for k, v in fields.items() if v is not None}
    config = _config(tmp_path / "config.yaml", {"general_settings": {"pass_through_endpoints": [fields]}})
    status, out, err = _run([sys.executable, "-m", "passthru", "check", "--config", str(config)], tmp_path,
                            _environment(**SECRETS))  # fmt: skip
    assert status == 1
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(f"passthru: {config}: ")
    for needle in needles:
        assert needle in err
    assert "Traceback" not in err
    _assert_no_secret(err)


@pytest.mark.parametrize(
    "text, needle",
    [
        pytest.param("general_settings:\n  pass_through_endpoints: [\n", "not valid YAML at line", id="bad-yaml"),
        pytest.param(None, "cannot read the config file", id="missing-file"),
    ],
)
def test_check_unreadable_config_says_one_line(tmp_path: Path, text: str | None, needle: str) -> None:
    config = tmp_path / "config.yaml"
    if text is not None:
        config.write_text(text)
    status, out, err = _run([sys.executable, "-m", "passthru", "check", "--config", str(config)], tmp_path,
                            _environment())  # fmt: skip
    assert (status, out) == (1, "")
    assert err.count("\n") == 1 and err.startswith(f"passthru: {config}: ") and needle in err, err


# ------------------------------------------------------------------------------------------------------------
# serving: python -m passthru, gunicorn, flask run


def _serving_config(tmp_path: Path, upstream: Upstream) -> Path:
    return _config(tmp_path / "config.yaml", {"general_settings": {
        "master_key": "os.environ/MK",
        "pass_through_endpoints": [
            {"path": "/echo", "target": f"{upstream.url}/echo?t=os.environ/TARGET_KEY", "auth": True,
             "headers": {"Authorization": "bearer os.environ/UPSTREAM_KEY", "X-Literal": LITERAL_SECRET}},
        ],
    }})  # fmt: skip


@pytest.mark.parametrize(
    "flags, from_environment, debug",
    [
        pytest.param(["--num_workers", "1"], False, False, id="flags"),
        pytest.param(["--num_workers", "1", "--detailed_debug"], False, True, id="detailed-debug"),
        pytest.param([], True, False, id="port-and-host-from-environment"),
    ],
)
def test_cli_serves_and_stops_on_sigterm(
    tmp_path: Path, upstream: Upstream, flags: list[str], from_environment: bool, debug: bool
) -> None:
    config = _serving_config(tmp_path, upstream)
    port = free_port()
    args = [sys.executable, "-m", "passthru", "--config", str(config), *flags]
    env = _environment(**SECRETS)
    if from_environment:
        env.update(PORT=str(port), HOST="127.0.0.1", WEB_CONCURRENCY="1")
    else:
        args += ["--port", str(port), "--host", "127.0.0.1"]
    log = tmp_path / "passthru.log"
    with _server(args, log, env) as process:
        wait_for_port(port, 10, alive=lambda: process.poll() is None)
        status, body = _get(port, "/echo?q=1", {"Authorization": f"Bearer {SECRETS['MK']}"})
        assert status == 200, log.read_text()
        received = upstream.requests[-1]
        assert received.target == f"/echo?t={SECRETS['TARGET_KEY']}&q=1"
        assert received.header("Authorization") == f"bearer {SECRETS['UPSTREAM_KEY']}"
        assert _get(port, "/echo", {"Authorization": "Bearer wrong"})[0] == 401
        # The access line is written once the answer is closed: wait for it before reading the log.
        assert _wait_for_text(log, "GET /echo 401", 5), log.read_text()
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    output = log.read_text()
    assert "GET /echo 200" in output
    forward_lines = [line for line in output.splitlines() if "passthru: forward " in line]
    if debug:
        assert len(forward_lines) == 1, output
        line = forward_lines[0]
        assert f"forward GET /echo -> {upstream.url}/echo?t=***" in line
        assert "Authorization" in line and "X-Literal" in line and "X-Forwarded-For" in line
    else:
        assert forward_lines == []
    assert "Traceback" not in output
    _assert_no_secret(output)
    assert SECRETS["MK"].encode() not in body  # the echo repeats what the upstream got: never the key


def test_the_installed_passthru_command_serves(tmp_path: Path, upstream: Upstream) -> None:
    """The console script pip installs ([project.scripts]), found next to this interpreter: the README's `passthru`
    itself, not only `python -m passthru`."""
    command = Path(sys.executable).parent / "passthru"
    assert os.access(command, os.X_OK), f"{command} is not installed: pip install -r requirements-dev.txt"
    port = free_port()
    args = [str(command), "--config", str(_serving_config(tmp_path, upstream)), "--port", str(port),
            "--host", "127.0.0.1", "--num_workers", "1"]  # fmt: skip
    log = tmp_path / "passthru.log"
    with _server(args, log, _environment(**SECRETS)) as process:
        wait_for_port(port, 15, alive=lambda: process.poll() is None)
        assert _get(port, "/echo", {"Authorization": f"Bearer {SECRETS['MK']}"})[0] == 200, log.read_text()
        assert upstream.requests[-1].header("Authorization") == f"bearer {SECRETS['UPSTREAM_KEY']}"
        assert _wait_for_text(log, "GET /echo 200", 5), log.read_text()
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    assert "Traceback" not in log.read_text()
    _assert_no_secret(log.read_text())


def test_json_logs_flag_makes_every_line_json(tmp_path: Path, upstream: Upstream) -> None:
    """`--json_logs` alone (no JSON_LOGS in the environment): passthru's lines and gunicorn's are JSON objects."""
    port = free_port()
    args = [sys.executable, "-m", "passthru", "--config", str(_serving_config(tmp_path, upstream)),
            "--port", str(port), "--host", "127.0.0.1", "--num_workers", "1", "--json_logs"]  # fmt: skip
    env = _environment(**SECRETS)
    assert "JSON_LOGS" not in env
    log = tmp_path / "passthru.log"
    with _server(args, log, env) as process:
        wait_for_port(port, 15, alive=lambda: process.poll() is None)
        headers = {"Authorization": f"Bearer {SECRETS['MK']}", "x-request-id": "json-flag-1"}
        assert _get(port, "/echo", headers)[0] == 200, log.read_text()
        assert _get(port, "/nowhere")[0] == 404
        assert _wait_for_text(log, '"path": "/nowhere"', 5), log.read_text()
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]  # every line
    [access] = [e for e in entries if e.get("request_id") == "json-flag-1" and "status" in e]
    assert (access["method"], access["path"], access["status"]) == ("GET", "/echo", 200)
    assert 0 < access["upstream_ms"] <= access["duration_ms"], access
    assert any(e["logger"] == "gunicorn.error" for e in entries)  # gunicorn's own lines too
    _assert_no_secret(log.read_text())


def test_cli_bad_config_exits_with_one_line(tmp_path: Path) -> None:
    config = _unset_variable_config(tmp_path)
    port = free_port()
    args = [sys.executable, "-m", "passthru", "--config", str(config), "--port", str(port),
            "--host", "127.0.0.1", "--num_workers", "1"]  # fmt: skip
    status, out, err = _run(args, tmp_path, _environment(**SECRETS))
    assert status == 1
    assert out == ""
    assert err == f"passthru: {config}: {ENTRY}.headers.Authorization: {UNSET_MESSAGE}\n"


def test_gunicorn_bad_config_exits_with_the_one_line(tmp_path: Path) -> None:
    config = _unset_variable_config(tmp_path)
    env = _environment(**SECRETS, PASSTHRU_CONFIG=str(config), PORT=str(free_port()), HOST="127.0.0.1",
                       WEB_CONCURRENCY="1")  # fmt: skip
    status, out, err = _run([sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py", "wsgi:app"],
                            tmp_path, env, timeout=20)  # fmt: skip
    output = out + err
    message = f"passthru: {config}: {ENTRY}.headers.Authorization: {UNSET_MESSAGE}"
    assert status != 0
    assert message in output.splitlines(), output
    assert "Traceback" not in output
    assert "Booting worker" not in output  # stopped in the master, before any worker


def test_flask_run_serves_a_forwarded_request(tmp_path: Path, upstream: Upstream) -> None:
    config = _serving_config(tmp_path, upstream)
    port = free_port()
    log = tmp_path / "flask.log"
    args = [sys.executable, "-m", "flask", "--app", "wsgi", "run", "--port", str(port), "--host", "127.0.0.1"]
    with _server(args, log, _environment(**SECRETS, PASSTHRU_CONFIG=str(config))) as process:
        wait_for_port(port, 15, alive=lambda: process.poll() is None)
        status, body = _get(port, "/echo", {"x-litellm-api-key": SECRETS["MK"]})
        assert status == 200, log.read_text()
        echo = json.loads(body)
        assert echo["target"] == f"/echo?t={SECRETS['TARGET_KEY']}"
        sent = {k.lower(): v for k, v in echo["headers"]}
        assert "x-litellm-api-key" not in sent
        assert sent["authorization"] == f"bearer {SECRETS['UPSTREAM_KEY']}"
    output = log.read_text()
    assert "Traceback" not in output
    assert SECRETS["MK"] not in output and SECRETS["UPSTREAM_KEY"] not in output


def test_flask_run_log_masks_the_master_key_in_a_query(tmp_path: Path, upstream: Upstream) -> None:
    """werkzeug's own request line carries the query: a master key sent there is masked like anywhere else."""
    config = _serving_config(tmp_path, upstream)
    port = free_port()
    log = tmp_path / "flask.log"
    args = [sys.executable, "-m", "flask", "--app", "wsgi", "run", "--port", str(port), "--host", "127.0.0.1"]
    with _server(args, log, _environment(**SECRETS, PASSTHRU_CONFIG=str(config))) as process:
        wait_for_port(port, 15, alive=lambda: process.poll() is None)
        status, _ = _get(port, f"/echo?api_key={SECRETS['MK']}", {"x-api-key": SECRETS["MK"]})
        assert status == 200
        assert _wait_for_text(log, "GET /echo 200", 5), log.read_text()
    _assert_no_secret(log.read_text())
