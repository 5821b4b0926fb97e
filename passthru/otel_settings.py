"""Whether passthru exports its spans, and where: `general_settings.otel` and OpenTelemetry's standard environment
variables, read once at start-up into OtelSettings (None: export off). Nothing here imports OpenTelemetry.

Each field of the config wins over its variable, as an argument given in code wins over the environment in the
SDK (and `database_url` over `DATABASE_URL` here); among the variables, a traces-only one wins over the general one.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from passthru.config_fields import FieldReader, kind
from passthru.config_targets import HEADER_NAME
from passthru.errors import ConfigError
from passthru.tracing import Sampler

WHERE = "general_settings.otel"
OTEL_FIELDS = ("endpoint", "headers", "service_name", "sampler", "sampler_arg")
TRACES_PATH = "v1/traces"  # appended to a base endpoint (OTEL_EXPORTER_OTLP_ENDPOINT's rule)
PROTOCOL = "http/protobuf"  # the one OTLP protocol passthru speaks (opentelemetry-exporter-otlp-proto-http)
EXPORTER = "opentelemetry-exporter-otlp-proto-http"  # requirements-otel.txt: looked up, not imported, at start-up
# OTEL_TRACES_SAMPLER's values: (ratio, parent-based); None takes the ratio from the argument (default 1.0).
SAMPLERS: dict[str, tuple[float | None, bool]] = {
    "always_on": (1.0, False),
    "always_off": (0.0, False),
    "traceidratio": (None, False),
    "parentbased_always_on": (1.0, True),
    "parentbased_always_off": (0.0, True),
    "parentbased_traceidratio": (None, True),
}
DEFAULT_SAMPLER = "parentbased_always_on"
# The span queue and its batches: OTEL_BSP_* (milliseconds, as the spec has them) and their defaults.
BATCH_VARIABLES = {"OTEL_BSP_SCHEDULE_DELAY": 5000, "OTEL_BSP_MAX_QUEUE_SIZE": 2048,
                   "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": 512}  # fmt: skip
DEFAULT_TIMEOUT_MS = 10_000  # OTEL_EXPORTER_OTLP_TIMEOUT's default: an export's whole time, retries included


@dataclass(frozen=True)
class OtelSettings:
    """Export on: where spans go, with what, which traces, and how they are batched."""

    endpoint: str  # the OTLP/HTTP traces URL spans are posted to
    endpoint_shown: str  # the same with environment-derived parts masked, for logs
    headers: tuple[tuple[str, str], ...]  # sent with every export (an API key, as a rule: masked in logs)
    service_name: str | None  # None: OTEL_RESOURCE_ATTRIBUTES' service.name, else "passthru"
    sampler: Sampler
    timeout: float  # seconds an export may take, retries included
    delay: float  # seconds between exports while spans trickle in
    queue_size: int  # spans kept waiting in a worker; past it new ones are dropped, and counted
    batch_size: int  # spans per export at most


def read_otel(reader: FieldReader, value: Any, environ: Mapping[str, str]) -> OtelSettings | None:
    """general_settings.otel over the OTEL_* variables; None when neither names an endpoint, or export is disabled."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise reader.error(WHERE, f"must be a mapping with endpoint and more, not {kind(value)}")
    reader.known(value, OTEL_FIELDS, WHERE)
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp"
    if exporter == "none":
        return None
    if exporter != "otlp":
        raise ConfigError(f"OTEL_TRACES_EXPORTER: passthru exports with otlp (or none), not {exporter!r}")
    endpoint = _endpoint(reader, value, environ)
    if endpoint is None:
        return None
    url, shown, field = endpoint
    try:  # found now, by the master: not at each worker's start, where it would fail over and over
        importlib.metadata.version(EXPORTER)
    except importlib.metadata.PackageNotFoundError:
        raise _error(reader, field, "exporting spans needs the OpenTelemetry packages: pip install -r "
                     "requirements-otel.txt") from None  # fmt: skip
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = environ.get(name, "").strip()
        if protocol:
            if protocol != PROTOCOL:
                raise ConfigError(f"{name}: passthru exports over {PROTOCOL}, not {protocol!r}")
            break
    if value.get("service_name") is not None:
        service_name: str | None = reader.string(value["service_name"], f"{WHERE}.service_name")
    else:
        service_name = environ.get("OTEL_SERVICE_NAME", "").strip() or None
    timeout = _whole(environ, ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"), DEFAULT_TIMEOUT_MS)
    delay, queue_size, batch_size = (_whole(environ, (name,), default) for name, default in BATCH_VARIABLES.items())
    if batch_size > queue_size:
        raise ConfigError(f"OTEL_BSP_MAX_EXPORT_BATCH_SIZE: must not be above OTEL_BSP_MAX_QUEUE_SIZE ({queue_size})")
    return OtelSettings(
        url, shown, _headers(reader, value, environ), service_name, _sampler(reader, value, environ),
        timeout / 1000, delay / 1000, queue_size, batch_size,
    )  # fmt: skip


def _endpoint(reader: FieldReader, value: dict[str, Any], environ: Mapping[str, str]) -> tuple[str, str, str] | None:
    """(URL, URL shown, where it was said) to post spans to: the config's base URL, else the traces URL variable,
    else the base URL variable."""
    if value.get("endpoint") is not None:
        field = f"{WHERE}.endpoint"
        url, shown = reader.resolve(value["endpoint"], field)
        url, shown = _traces_url(url), _traces_url(shown)
    elif environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
        field = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        url = shown = environ[field].strip()
    elif environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip():
        field = "OTEL_EXPORTER_OTLP_ENDPOINT"
        url = shown = _traces_url(environ[field].strip())
    elif value:
        raise reader.error(f"{WHERE}.endpoint", "is required (or set OTEL_EXPORTER_OTLP_ENDPOINT)")
    else:
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises ValueError on a bad port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise _error(reader, field, "must be an http:// or https:// URL with a host")
    return url, shown, field


def _traces_url(base: str) -> str:
    return f"{base.removesuffix('/')}/{TRACES_PATH}"


def _headers(reader: FieldReader, value: dict[str, Any], environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The config's headers (os.environ/ allowed), else OTEL_EXPORTER_OTLP_[TRACES_]HEADERS' `k=v,…` (values
    percent-encoded); every value is masked in logs."""
    if value.get("headers") is not None:
        pairs = reader.mapping(value, "headers", WHERE, secret=True)
        for name, _ in pairs:
            if not HEADER_NAME.fullmatch(name):
                raise reader.error(f"{WHERE}.headers.{name}", "is not a valid HTTP header name")
        return tuple(pairs)
    for variable in ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"):
        text = environ.get(variable, "").strip()
        if not text:
            continue
        pairs = []
        for item in text.split(","):
            name, equals, encoded = item.partition("=")
            value_text = unquote(encoded.strip())
            if not equals or not HEADER_NAME.fullmatch(name.strip()) or any(c in value_text for c in "\r\n\0"):
                raise ConfigError(f"{variable}: must be name=value pairs separated by commas (values percent-encoded)")
            pairs.append((name.strip(), value_text))
            if value_text:
                reader.secrets.add(value_text)
        return tuple(pairs)
    return ()


def _sampler(reader: FieldReader, value: dict[str, Any], environ: Mapping[str, str]) -> Sampler:
    """The config's sampler and sampler_arg, else OTEL_TRACES_SAMPLER and _ARG; parentbased_always_on by default."""
    if value.get("sampler") is not None:
        field, name = f"{WHERE}.sampler", value["sampler"]
        if not isinstance(name, str) or name not in SAMPLERS:
            raise reader.error(field, f"must be one of {', '.join(SAMPLERS)}, not {kind(name)}")
    else:
        field, name = "OTEL_TRACES_SAMPLER", environ.get("OTEL_TRACES_SAMPLER", "").strip() or DEFAULT_SAMPLER
        if name not in SAMPLERS:
            raise ConfigError(f"{field}: must be one of {', '.join(SAMPLERS)}, not {name!r}")
    ratio, parent_based = SAMPLERS[name]
    if value.get("sampler_arg") is not None:
        arg_field, arg = f"{WHERE}.sampler_arg", value["sampler_arg"]
        if ratio is not None:
            raise reader.error(arg_field, f"is a ratio for the traceidratio samplers; {name} takes none")
    else:  # the variable is ignored by samplers that take no argument, as the spec has it
        arg_field, arg = "OTEL_TRACES_SAMPLER_ARG", environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip() or None
    if ratio is not None:
        return Sampler(ratio, parent_based)
    if arg is None:
        return Sampler(1.0, parent_based)
    try:
        number = reader.number(arg, arg_field)
    except ConfigError:
        number = -1.0
    if not 0 <= number <= 1:
        raise _error(reader, arg_field, f"must be a ratio from 0 to 1 for {name}")
    return Sampler(number, parent_based)


def _error(reader: FieldReader, field: str, problem: str) -> ConfigError:
    """The error naming a config field (with the file) or an environment variable."""
    return reader.error(field, problem) if field.startswith(WHERE) else ConfigError(f"{field}: {problem}")


def _whole(environ: Mapping[str, str], names: tuple[str, ...], default: int) -> int:
    """The first of these variables that is set, a whole number above 0; else the default."""
    for name in names:
        text = environ.get(name, "").strip()
        if text:
            if not text.isdigit() or int(text) == 0:
                raise ConfigError(f"{name}: must be a whole number above 0, not {text!r}")
            return int(text)
    return default
