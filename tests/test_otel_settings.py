"""otel_settings.py: general_settings.otel and the OTEL_* variables, their precedence, and one-line start-up errors
naming the field or the variable, never quoting a secret."""

from __future__ import annotations

import importlib.metadata
from typing import Any

import pytest

from passthru.config import parse_settings
from passthru.errors import ConfigError
from passthru.otel_settings import OtelSettings
from passthru.tracing import Sampler


def otel(section: dict[str, Any] | None = None, **environ: str) -> OtelSettings | None:
    general: dict[str, Any] = {"pass_through_endpoints": []}
    if section is not None:
        general["otel"] = section
    return parse_settings({"general_settings": general}, "config.yaml", environ).otel


def refused(section: dict[str, Any] | None = None, **environ: str) -> str:
    with pytest.raises(ConfigError) as info:
        otel(section, **environ)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_export_is_off_unless_an_endpoint_is_named() -> None:
    assert otel() is None
    assert otel(OTEL_SERVICE_NAME="x", OTEL_TRACES_SAMPLER="always_on") is None


@pytest.mark.parametrize(
    ("section", "environ", "endpoint"),
    [
        pytest.param(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "http://c:4318/v1/traces", id="base"),
        pytest.param(
            None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/p/"}, "http://c:4318/p/v1/traces", id="base-with-path"
        ),
        pytest.param(
            None,
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://c/x", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://d"},
            "https://c/x",
            id="traces-variable-as-is-and-first",
        ),
        pytest.param(
            {"endpoint": "http://cfg:4318"},
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://env/v1/traces"},
            "http://cfg:4318/v1/traces",
            id="config-first",
        ),
        pytest.param(
            {"service_name": "gw"},
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"},
            "http://c/v1/traces",
            id="config-without-endpoint-takes-the-variable",
        ),
    ],
)
def test_endpoint_precedence(section: dict[str, Any] | None, environ: dict[str, str], endpoint: str) -> None:
    settings = otel(section, **environ)
    assert settings is not None and settings.endpoint == endpoint


def test_defaults() -> None:
    settings = otel({"endpoint": "http://c:4318"})
    assert settings == OtelSettings(
        "http://c:4318/v1/traces", "http://c:4318/v1/traces", (), None, Sampler(1.0, True), 10.0, 5.0, 2048, 512
    )


@pytest.mark.parametrize(
    "environ",
    [
        pytest.param({"OTEL_SDK_DISABLED": "true"}, id="sdk-disabled"),
        pytest.param({"OTEL_SDK_DISABLED": " TRUE "}, id="sdk-disabled-any-case"),
        pytest.param({"OTEL_TRACES_EXPORTER": "none"}, id="exporter-none"),
    ],
)
def test_export_can_be_turned_off_by_the_environment(environ: dict[str, str]) -> None:
    assert otel({"endpoint": "http://c"}, OTEL_EXPORTER_OTLP_ENDPOINT="http://c", **environ) is None


def test_endpoint_with_an_environment_secret_is_masked_when_shown() -> None:
    settings = parse_settings(
        {"general_settings": {"otel": {"endpoint": "https://c.example/os.environ/TENANT"}}},
        "config.yaml",
        {"TENANT": "tenant-secret-1"},
    )
    assert settings.otel is not None
    assert settings.otel.endpoint == "https://c.example/tenant-secret-1/v1/traces"
    assert settings.otel.endpoint_shown == "https://c.example/***/v1/traces"
    assert "tenant-secret-1" in settings.secrets


def test_headers_from_the_config_first_else_the_variables_all_masked() -> None:
    settings = parse_settings(
        {"general_settings": {"otel": {"endpoint": "http://c", "headers": {"x-api-key": "os.environ/KEY"}}}},
        "config.yaml",
        {"KEY": "otlp-key-1", "OTEL_EXPORTER_OTLP_HEADERS": "other=1"},
    )
    assert settings.otel is not None and settings.otel.headers == (("x-api-key", "otlp-key-1"),)
    assert "otlp-key-1" in settings.secrets
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c",
        "OTEL_EXPORTER_OTLP_HEADERS": "a=general",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "Authorization=Basic%20dXNlcjpwYXNz, x-team = t1",
    }
    settings = parse_settings({"general_settings": {}}, "config.yaml", environ)
    assert settings.otel is not None
    assert settings.otel.headers == (("Authorization", "Basic dXNlcjpwYXNz"), ("x-team", "t1"))
    assert {"Basic dXNlcjpwYXNz", "t1"} <= settings.secrets


def test_service_name_from_the_config_first() -> None:
    first = otel({"endpoint": "http://c", "service_name": "gw"}, OTEL_SERVICE_NAME="env")
    second = otel({"endpoint": "http://c"}, OTEL_SERVICE_NAME="env")
    assert first is not None and second is not None and (first.service_name, second.service_name) == ("gw", "env")


@pytest.mark.parametrize(
    ("section", "environ", "sampler"),
    [
        pytest.param({}, {"OTEL_TRACES_SAMPLER": "always_off"}, Sampler(0.0, False), id="always_off"),
        pytest.param(
            {},
            {"OTEL_TRACES_SAMPLER": "always_on", "OTEL_TRACES_SAMPLER_ARG": "0.1"},
            Sampler(1.0, False),
            id="variable-argument-ignored-where-none-is-taken",
        ),
        pytest.param({}, {"OTEL_TRACES_SAMPLER": "traceidratio"}, Sampler(1.0, False), id="ratio-default-1"),
        pytest.param(
            {},
            {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"},
            Sampler(0.25, True),
            id="parentbased_traceidratio",
        ),
        pytest.param({}, {"OTEL_TRACES_SAMPLER": "parentbased_always_off"}, Sampler(0.0, True), id="pb-always_off"),
        pytest.param(
            {"sampler": "traceidratio", "sampler_arg": 0.5},
            {"OTEL_TRACES_SAMPLER": "always_off", "OTEL_TRACES_SAMPLER_ARG": "0.9"},
            Sampler(0.5, False),
            id="config-first",
        ),
        pytest.param(
            {"sampler_arg": "1e-3"},
            {"OTEL_TRACES_SAMPLER": "traceidratio"},
            Sampler(0.001, False),
            id="config-argument-with-the-variables-sampler",
        ),
    ],
)
def test_sampler(section: dict[str, Any], environ: dict[str, str], sampler: Sampler) -> None:
    settings = otel({"endpoint": "http://c", **section}, **environ)
    assert settings is not None and settings.sampler == sampler


def test_batching_and_timeout_variables_in_milliseconds() -> None:
    settings = otel(
        {"endpoint": "http://c"},
        OTEL_EXPORTER_OTLP_TIMEOUT="2500",
        OTEL_BSP_SCHEDULE_DELAY="100",
        OTEL_BSP_MAX_QUEUE_SIZE="10",
        OTEL_BSP_MAX_EXPORT_BATCH_SIZE="5",
    )
    assert settings is not None
    assert (settings.timeout, settings.delay, settings.queue_size, settings.batch_size) == (2.5, 0.1, 10, 5)
    traces_first = otel({"endpoint": "http://c"}, OTEL_EXPORTER_OTLP_TIMEOUT="1", OTEL_EXPORTER_OTLP_TRACES_TIMEOUT="3")
    assert traces_first is not None and traces_first.timeout == 0.003


@pytest.mark.parametrize(
    ("section", "environ", "message"),
    [
        pytest.param(
            [],
            {},
            "config.yaml: general_settings.otel: must be a mapping with endpoint and more, not a list",
            id="not-a-mapping",
        ),
        pytest.param(
            {"endpiont": "http://c"},
            {},
            "general_settings.otel.endpiont: unknown field (did you mean endpoint?)",
            id="misspelt",
        ),
        pytest.param(
            {"service_name": "gw"},
            {},
            "general_settings.otel.endpoint: is required (or set OTEL_EXPORTER_OTLP_ENDPOINT)",
            id="no-endpoint",
        ),
        pytest.param(
            {"endpoint": "c:4318"},
            {},
            "general_settings.otel.endpoint: must be an http:// or https:// URL with a host",
            id="not-a-url",
        ),
        pytest.param(
            {"endpoint": "http://c:99999"},
            {},
            "general_settings.otel.endpoint: must be an http:// or https:// URL with a host",
            id="bad-port",
        ),
        pytest.param(
            None,
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "grpc://c:4317"},
            "OTEL_EXPORTER_OTLP_ENDPOINT: must be an http:// or https:// URL with a host",
            id="variable-not-a-url",
        ),
        pytest.param(
            {"endpoint": "http://c"},
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTEL_EXPORTER_OTLP_PROTOCOL: passthru exports over http/protobuf, not 'grpc'",
            id="grpc",
        ),
        pytest.param(
            {"endpoint": "http://c"},
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: passthru exports over http/protobuf, not 'http/json'",
            id="json-traces-protocol-first",
        ),
        pytest.param(
            {"endpoint": "http://c"},
            {"OTEL_TRACES_EXPORTER": "console"},
            "OTEL_TRACES_EXPORTER: passthru exports with otlp (or none), not 'console'",
            id="console-exporter",
        ),
        pytest.param(
            {"endpoint": "http://c", "sampler": "sometimes"},
            {},
            "general_settings.otel.sampler: must be "
            "one of always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off, "
            "parentbased_traceidratio, not the string 'sometimes'",
            id="sampler",
        ),
        pytest.param(
            {"endpoint": "http://c"},
            {"OTEL_TRACES_SAMPLER": "jaeger_remote"},
            "OTEL_TRACES_SAMPLER: must be one of always_on",
            id="sampler-variable",
        ),
        pytest.param(
            {"endpoint": "http://c", "sampler": "traceidratio", "sampler_arg": 2},
            {},
            "general_settings.otel.sampler_arg: must be a ratio from 0 to 1 for traceidratio",
            id="ratio-above-1",
        ),
        pytest.param(
            {"endpoint": "http://c", "sampler": "always_on", "sampler_arg": 0.5},
            {},
            "general_settings.otel.sampler_arg: is a ratio for the traceidratio samplers; always_on takes none",
            id="argument-for-a-sampler-without-one",
        ),
        pytest.param(
            {"endpoint": "http://c"},
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "x"},
            "OTEL_TRACES_SAMPLER_ARG: must be a ratio from 0 to 1 for traceidratio",
            id="ratio-variable-not-a-number",
        ),
        pytest.param(
            {"endpoint": "http://c", "headers": {"bad name": "v"}},
            {},
            "general_settings.otel.headers.bad name: is not a valid HTTP header name",
            id="header-name",
        ),
        pytest.param(
            {"endpoint": "http://c"},
            {"OTEL_EXPORTER_OTLP_HEADERS": "novalue"},
            "OTEL_EXPORTER_OTLP_HEADERS: must be name=value pairs separated by commas (values percent-encoded)",
            id="header-variable",
        ),
        pytest.param(
            {"endpoint": "http://c"},
            {"OTEL_BSP_MAX_QUEUE_SIZE": "0"},
            "OTEL_BSP_MAX_QUEUE_SIZE: must be a whole number above 0, not '0'",
            id="queue-size",
        ),
        pytest.param(
            {"endpoint": "http://c"},
            {"OTEL_EXPORTER_OTLP_TIMEOUT": "1.5"},
            "OTEL_EXPORTER_OTLP_TIMEOUT: must be a whole number above 0, not '1.5'",
            id="timeout",
        ),
        pytest.param(
            {"endpoint": "http://c"},
            {"OTEL_BSP_MAX_QUEUE_SIZE": "10", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "11"},
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE: must not be above OTEL_BSP_MAX_QUEUE_SIZE (10)",
            id="batch-above-queue",
        ),
    ],
)
def test_errors_name_the_field_or_variable_in_one_line(section: Any, environ: dict[str, str], message: str) -> None:
    assert message in refused(section, **environ)


def test_errors_never_quote_a_secret() -> None:
    message = refused({"endpoint": "http://c"}, OTEL_EXPORTER_OTLP_HEADERS="api-key=otlp-secret-9,broken")
    assert "otlp-secret-9" not in message
    message = refused({"endpoint": "not a url os.environ/KEY"}, KEY="otlp-secret-8")
    assert "otlp-secret-8" not in message


@pytest.mark.parametrize(
    ("section", "environ", "field"),
    [
        pytest.param({"endpoint": "http://c"}, {}, "config.yaml: general_settings.otel.endpoint", id="config"),
        pytest.param(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, "OTEL_EXPORTER_OTLP_ENDPOINT", id="variable"),
    ],
)
def test_export_without_the_packages_stops_start_up(
    section: dict[str, Any] | None, environ: dict[str, str], field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the master, which never imports them: each worker would otherwise fail at its start, again and again."""

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    message = refused(section, **environ)
    assert message == f"{field}: exporting spans needs the OpenTelemetry packages: pip install -r requirements-otel.txt"
    assert otel(section, OTEL_SDK_DISABLED="true", **environ) is None  # off: nothing is needed
