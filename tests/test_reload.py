"""kill -HUP: an edited config is picked up with no failed request; a broken one is refused and the old one serves."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from conftest import Gunicorn, start_gunicorn, write_config
from upstream import Upstream, wait_until


def booted_workers(server: Gunicorn) -> int:
    return server.output().count("Booting worker")


def test_reload_under_load_fails_no_request(upstream: Upstream, tmp_path: Path) -> None:
    config = write_config(tmp_path, [{"path": "/a", "target": f"{upstream.url}/echo"}])
    server = start_gunicorn(config, tmp_path / "gunicorn.log", workers=2)
    failures: list[str] = []
    done = 0
    lock = threading.Lock()
    stop = threading.Event()

    def load() -> None:
        nonlocal done
        with requests.Session() as session:  # keep-alive, as real clients do
            while not stop.is_set():
                try:
                    status = session.post(f"{server.url}/a", data=b"x" * 512, timeout=10).status_code
                    if status != 200:
                        failures.append(str(status))
                except requests.RequestException as exc:
                    failures.append(type(exc).__name__)
                with lock:
                    done += 1
                    if done >= 1000:
                        stop.set()

    try:
        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        assert wait_until(lambda: done >= 200, 30)
        write_config(tmp_path, [{"path": "/a", "target": f"{upstream.url}/echo"},
                                {"path": "/b", "target": f"{upstream.url}/echo"}])  # fmt: skip
        server.process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "config reloaded" in server.output(), 10)
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads)
        assert done >= 1000
        assert failures == []
        assert wait_until(lambda: requests.get(f"{server.url}/b").status_code == 200, 10)
    finally:
        stop.set()
        server.stop()


@pytest.mark.parametrize("conf", ["deploy/gunicorn.conf.py", "deploy/gunicorn.gevent.conf.py"])
def test_broken_config_on_reload_is_refused(
    upstream: Upstream, gunicorn: Callable[..., Gunicorn], tmp_path: Path, conf: str
) -> None:
    server = gunicorn([{"path": "/a", "target": f"{upstream.url}/echo"}], conf=conf)
    assert requests.get(f"{server.url}/a").status_code == 200
    before = booted_workers(server)
    (tmp_path / "config.yaml").write_text(
        "general_settings:\n  pass_through_endpoints:\n    - path: /a\n      target: http://x\n      auth: 'true'\n"
    )
    server.process.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "reload refused" in server.output(), 10), server.output()
    assert wait_until(lambda: booted_workers(server) > before, 10)  # the new workers are up...
    time.sleep(0.5)
    assert server.process.poll() is None
    for _ in range(5):  # ...and serve the previous config
        assert requests.get(f"{server.url}/a").status_code == 200
    line = next(line for line in server.output().splitlines() if "reload refused" in line)
    assert "(/a).auth: must be true or false" in line
    assert "Traceback" not in server.output()
