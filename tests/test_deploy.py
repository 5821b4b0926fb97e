"""The deploy recipes, run for real: the Procfile, and gunicorn with a config in $PASSTHRU_CONFIG_YAML."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import ROOT, free_port, start_gunicorn, wait_for_port
from upstream import Upstream

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
    assert "passthru: $PASSTHRU_CONFIG_YAML: general_settings.pass_through_endpoints: must be a list" in str(
        info.value
    )


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
            ["/bin/sh", "-c", command], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_for_port(port, 15, alive=lambda: process.poll() is None)
        assert requests.get(f"http://127.0.0.1:{port}/e", timeout=10).status_code == 200
        deadline = time.monotonic() + 10
        while log.read_text().count("Booting worker") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert log.read_text().count("Booting worker") == 2, log.read_text()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
