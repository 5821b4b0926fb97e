"""The transport seam (the urllib3 pool's urlopen) replaced with monkeypatch: failures become LiteLLM-shaped answers.

Everything that depends on real sockets is in test_proxy.py and test_gunicorn.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import urllib3
from conftest import write_config

from passthru import create_app

# --- the transport seam, mocked: errors map to LiteLLM-shaped answers --------------------------------------------


@pytest.fixture
def client(tmp_path: Path):
    config = write_config(tmp_path, [{"path": "/r", "target": "http://up.test/base", "timeout": 1}])
    return create_app(config).test_client()


def failing(error: BaseException) -> Any:
    def urlopen(self: Any, *args: Any, **kwargs: Any) -> None:
        raise error

    return urlopen


@pytest.mark.parametrize(
    ("error", "status", "error_type"),
    [
        pytest.param(urllib3.exceptions.NewConnectionError(None, "http://up.test/base refused"), 502,
                     "upstream_error", id="refused"),
        pytest.param(urllib3.exceptions.ConnectTimeoutError("http://up.test/base"), 504, "timeout_error",
                     id="connect-timeout"),
        pytest.param(urllib3.exceptions.ReadTimeoutError(None, "http://up.test/base", "read timed out"), 504,
                     "timeout_error", id="read-timeout"),
        pytest.param(urllib3.exceptions.ProtocolError("http://up.test/base reset"), 502, "upstream_error",
                     id="reset"),
        pytest.param(ConnectionResetError(104, "reset"), 502, "upstream_error", id="socket-reset"),
    ],
)  # fmt: skip
def test_transport_errors_become_json(
    client: Any, monkeypatch: pytest.MonkeyPatch, error: Exception, status: int, error_type: str
) -> None:
    monkeypatch.setattr(urllib3.HTTPConnectionPool, "urlopen", failing(error))
    answer = client.get("/r")
    assert answer.status_code == status
    body = answer.get_json()
    assert body["error"]["type"] == error_type and body["error"]["code"] == str(status)
    assert "up.test" not in answer.get_data(as_text=True)


def test_unexpected_errors_are_json_without_a_trace(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(urllib3.HTTPConnectionPool, "urlopen", failing(RuntimeError("internal detail")))
    answer = client.get("/r")
    assert answer.status_code == 500
    assert answer.get_json()["error"]["type"] == "internal_server_error"
    assert "internal detail" not in answer.get_data(as_text=True)
