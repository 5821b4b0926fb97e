"""kill -HUP: an edited config is picked up with no failed request; a broken one is refused and the old one serves."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from conftest import Gunicorn, start_gunicorn, write_config
from upstream import Upstream, wait_until


def booted_workers(server: Gunicorn) -> int:
    return server.output().count("Booting worker")


class Load:
    """Four keep-alive clients posting to `url` until `calls` are done; every status but 200 and every error kept."""

    def __init__(self, url: str, calls: int) -> None:
        self.url, self.calls = url, calls
        self.failures: list[str] = []
        self.done = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(4)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        with requests.Session() as session:  # keep-alive, as real clients do
            while not self.stop.is_set():
                try:
                    status = session.post(self.url, data=b"x" * 512, timeout=10).status_code
                    if status != 200:
                        self.failures.append(str(status))
                except requests.RequestException as exc:
                    self.failures.append(type(exc).__name__)
                with self.lock:
                    self.done += 1
                    if self.done >= self.calls:
                        self.stop.set()

    def finish(self) -> list[str]:
        """Wait for the calls to be done (bounded); the failures seen."""
        for thread in self.threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in self.threads)
        assert self.done >= self.calls
        return self.failures


def test_reload_under_load_fails_no_request(upstream: Upstream, tmp_path: Path) -> None:
    config = write_config(tmp_path, [{"path": "/a", "target": f"{upstream.url}/echo"}])
    server = start_gunicorn(config, tmp_path / "gunicorn.log", workers=2)
    load = Load(f"{server.url}/a", 1000)
    try:
        assert wait_until(lambda: load.done >= 200, 30)
        write_config(tmp_path, [{"path": "/a", "target": f"{upstream.url}/echo"},
                                {"path": "/b", "target": f"{upstream.url}/echo"}])  # fmt: skip
        server.process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "config reloaded" in server.output(), 10)
        assert load.finish() == []
        assert wait_until(lambda: requests.get(f"{server.url}/b").status_code == 200, 10)
    finally:
        load.stop.set()
        server.stop()


def test_reload_with_a_changed_target_list_fails_no_request(upstream: Upstream, tmp_path: Path) -> None:
    """The new workers pick among the new targets; the old ones finish their calls on the old list."""
    before = [{"url": f"{upstream.url}/echo/a", "name": "a"}, {"url": f"{upstream.url}/echo/b", "name": "b"}]
    after = [
        {"url": f"{upstream.url}/echo/b", "name": "b", "weight": 2},
        {"url": f"{upstream.url}/echo/c", "name": "c"},
    ]
    config = write_config(tmp_path, [{"path": "/t", "targets": before}])
    server = start_gunicorn(config, tmp_path / "gunicorn.log", workers=2)
    load = Load(f"{server.url}/t", 600)
    try:
        assert wait_until(lambda: load.done >= 150, 30)
        write_config(tmp_path, [{"path": "/t", "targets": after}])
        server.process.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "config reloaded" in server.output(), 10)
        assert load.finish() == []
        # The first calls went to a and b; the last ones (long after the old workers left) to b and c, 2:1.
        targets = [seen.target for seen in upstream.requests]
        assert set(targets[:100]) == {"/echo/a", "/echo/b"}
        last = Counter(targets[-150:])
        assert set(last) == {"/echo/b", "/echo/c"} and 90 <= last["/echo/b"] <= 110, last
    finally:
        load.stop.set()
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
