"""A route's rpm_limit and max_parallel_requests in config.yaml: read, checked at start-up with one line, and a key
store for the rpm counts even without a master key."""

from __future__ import annotations

import pytest

from passthru.config import parse_settings
from passthru.config_limits import RouteLimits
from passthru.errors import ConfigError

ENTRY = "general_settings.pass_through_endpoints[0] (/v1/chat)"


def settings_of(entry: dict[str, object], environ: dict[str, str] | None = None, **general: object):  # type: ignore[no-untyped-def]
    raw = {"general_settings": {**general, "pass_through_endpoints": [{"path": "/v1/chat", "target": "http://a",
                                                                       **entry}]}}  # fmt: skip
    return parse_settings(raw, "cfg.yaml", {} if environ is None else environ)


@pytest.mark.parametrize(
    ("entry", "limits"),
    [
        pytest.param({}, RouteLimits(None, None), id="none"),
        pytest.param({"rpm_limit": 600, "max_parallel_requests": 50}, RouteLimits(600, 50), id="both"),
        pytest.param({"rpm_limit": "600"}, RouteLimits(600, None), id="quoted"),
        pytest.param({"max_parallel_requests": 10_000, "rpm_limit": 2**31 - 1}, RouteLimits(2**31 - 1, 10_000),
                     id="largest"),
        pytest.param({"rpm_limit": None}, RouteLimits(None, None), id="empty"),
    ],
)  # fmt: skip
def test_route_limits_are_read(entry: dict[str, object], limits: RouteLimits) -> None:
    (endpoint,) = settings_of(entry).endpoints
    assert endpoint.limits == limits


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        pytest.param({"rpm_limit": 0}, "rpm_limit: must be from 1 to 2147483647", id="rpm-zero"),
        pytest.param({"rpm_limit": -5}, "rpm_limit: must be from 1 to 2147483647", id="rpm-negative"),
        pytest.param({"rpm_limit": 2**31}, "rpm_limit: must be from 1 to 2147483647", id="rpm-too-big"),
        pytest.param({"rpm_limit": 1.5}, "rpm_limit: must be a whole number, not a number", id="rpm-float"),
        pytest.param({"rpm_limit": True}, "rpm_limit: must be a whole number, not a boolean", id="rpm-bool"),
        pytest.param({"rpm_limit": "600/min"}, "rpm_limit: must be a whole number, not the string '600/min'",
                     id="rpm-words"),
        pytest.param({"max_parallel_requests": 0}, "max_parallel_requests: must be from 1 to 10000", id="parallel-0"),
        pytest.param({"max_parallel_requests": 10_001}, "max_parallel_requests: must be from 1 to 10000",
                     id="parallel-too-many"),
        pytest.param({"max_parallel_requests": [2]}, "max_parallel_requests: must be a whole number, not a list",
                     id="parallel-list"),
        pytest.param({"rpm_limits": 5}, "rpm_limits: unknown field (did you mean rpm_limit?)", id="typo"),
    ],
)  # fmt: skip
def test_bad_route_limits_stop_start_up_with_one_line(entry: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_of(entry)
    assert str(info.value) == f"cfg.yaml: {ENTRY}.{expected}"


def test_a_route_rpm_limit_needs_a_store_even_without_a_master_key() -> None:
    """The counts live in the key store: the default SQLite file, database_url or DATABASE_URL, as for keys."""
    assert settings_of({"rpm_limit": 60}).database_url == "sqlite:///passthru.db"
    given = settings_of({"rpm_limit": 60}, database_url="postgresql://u:pw-9@db/x")
    assert given.database_url == "postgresql+psycopg://u:pw-9@db/x" and given.warnings == ()
    assert given.database_shown == "postgresql+psycopg://u:***@db/x" and "pw-9" in given.secrets
    from_env = settings_of({"rpm_limit": 60}, {"DATABASE_URL": "postgresql://u@db2/y"})
    assert from_env.database_url == "postgresql+psycopg://u@db2/y"


def test_max_parallel_requests_alone_needs_no_store() -> None:
    """Calls in flight are counted on the host (slots.py): a worker of such a server never loads the store."""
    assert settings_of({"max_parallel_requests": 5}).database_url is None
    unused = settings_of({"max_parallel_requests": 5}, database_url="sqlite:///x.db")
    assert unused.database_url is None
    (warning,) = unused.warnings
    assert "general_settings.database_url is set but unused" in warning
