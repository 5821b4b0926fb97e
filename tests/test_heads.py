"""server/heads.py: $PASSTHRU_HEADER_TIMEOUT read, checked, and refused at start-up with one line when wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import start_gunicorn, write_config

from passthru.server.heads import DEFAULT_HEADER_TIMEOUT, HEADER_TIMEOUT_VARIABLE, header_timeout


@pytest.mark.parametrize(
    "text, seconds",
    [
        pytest.param(None, DEFAULT_HEADER_TIMEOUT, id="unset"),
        pytest.param("  ", DEFAULT_HEADER_TIMEOUT, id="blank"),
        pytest.param("10", 10.0, id="whole"),
        pytest.param(" 2.5 ", 2.5, id="fraction"),
        pytest.param("3600", 3600.0, id="an-hour"),
    ],
)
def test_header_timeout_is_read_in_seconds(text: str | None, seconds: float) -> None:
    environ = {} if text is None else {HEADER_TIMEOUT_VARIABLE: text}
    assert header_timeout(environ) == seconds


@pytest.mark.parametrize("text", ["0", "-1", "3601", "nan", "inf", "5s", "five"])
def test_a_header_timeout_that_is_not_seconds_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=rf"^\${HEADER_TIMEOUT_VARIABLE} must be a number of seconds"):
        header_timeout({HEADER_TIMEOUT_VARIABLE: text})


@pytest.mark.parametrize("conf", ["deploy/gunicorn.conf.py", "deploy/gunicorn.gevent.conf.py"])
def test_gunicorn_stops_on_a_bad_header_timeout_with_one_line(tmp_path: Path, conf: str) -> None:
    if "gevent" in conf:
        from test_deploy import require_gevent

        require_gevent()
    config = write_config(tmp_path, [])
    with pytest.raises(AssertionError, match="did not start") as info:
        start_gunicorn(config, tmp_path / "gunicorn.log", {HEADER_TIMEOUT_VARIABLE: "5s"}, conf=conf)
    assert f"passthru: ${HEADER_TIMEOUT_VARIABLE} must be a number of seconds above 0, up to 3600, not '5s'" in str(
        info.value
    )
    assert "Traceback" not in str(info.value)
