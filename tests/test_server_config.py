"""The server's own settings, read from the environment once."""

from __future__ import annotations

import pytest

from passthru.errors import ConfigError
from passthru.server_config import proxy_trust, read_server_settings


def test_proxy_trust_spec() -> None:
    assert proxy_trust("*")("198.51.100.1")
    trusted = proxy_trust("127.0.0.1, ::1,10.0.0.0/8")
    assert trusted("127.0.0.1") and trusted("::1") and trusted("10.2.3.4")
    assert not trusted("11.0.0.1") and not trusted("not-an-ip") and not trusted("")
    with pytest.raises(ConfigError, match="FORWARDED_ALLOW_IPS"):
        proxy_trust("localhost")


def test_server_settings_are_read_from_the_environment_once() -> None:
    server = read_server_settings(
        {"FORWARDED_ALLOW_IPS": "10.0.0.0/8", "JSON_LOGS": "True", "PROMETHEUS_MULTIPROC_DIR": "/tmp/m"}
    )
    assert server.trusted_proxy("10.1.2.3") and not server.trusted_proxy("127.0.0.1")
    assert server.json_logs and server.metrics_dir == "/tmp/m" and not server.config_accepted
    default = read_server_settings({})
    assert default.trusted_proxy("127.0.0.1") and default.trusted_proxy("::1") and not default.trusted_proxy("10.1.2.3")
    assert not default.json_logs and default.metrics_dir is None
    with pytest.raises(ConfigError, match="FORWARDED_ALLOW_IPS"):
        read_server_settings({"FORWARDED_ALLOW_IPS": "localhost"})


@pytest.mark.parametrize(("value", "seconds"), [("", 12 * 3600), ("30m", 1800), ("1d", 86400), (" 2h ", 7200)])
def test_the_admin_page_session_lasts_what_PASSTHRU_UI_SESSION_says(value: str, seconds: float) -> None:
    assert read_server_settings({"PASSTHRU_UI_SESSION": value}).ui_session == seconds


@pytest.mark.parametrize("value", ["12", "30s", "31d", "1mo", "forever", "0h"])
def test_a_session_length_that_is_no_duration_or_out_of_range_stops_start_up(value: str) -> None:
    with pytest.raises(ConfigError, match="PASSTHRU_UI_SESSION"):
        read_server_settings({"PASSTHRU_UI_SESSION": value})
