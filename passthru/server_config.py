"""What a server process reads from its environment, once, at start-up: the config it runs (found through
$PASSTHRU_CONFIG_YAML or $PASSTHRU_CONFIG, and handed by the gunicorn master to its workers as the text it last
accepted, so a reload never serves a broken edit), and the server's own settings (ServerSettings)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, replace
from functools import lru_cache
from ipaddress import ip_address, ip_network

from passthru.config import Settings, parse_settings, parse_yaml, read_file
from passthru.errors import ConfigError
from passthru.keystore.budget import DURATION, SECONDS
from passthru.slots import LIMITS_DIR_VARIABLE

# Where a server finds its config (load_from_environment): the YAML itself wins over a file path.
CONFIG_YAML_VARIABLE = "PASSTHRU_CONFIG_YAML"
CONFIG_FILE_VARIABLE = "PASSTHRU_CONFIG"
# Set by the gunicorn master for its workers (accept_from_environment): the config text it last accepted.
ACCEPTED_TEXT = "_PASSTHRU_ACCEPTED_CONFIG"
ACCEPTED_SOURCE = "_PASSTHRU_ACCEPTED_SOURCE"
# How long an admin page login lasts (ui/session.py): a duration such as "12h" or "30m", from 1 minute to 30 days.
UI_SESSION_VARIABLE = "PASSTHRU_UI_SESSION"
UI_SESSION_DEFAULT = 12 * 3600.0


@dataclass(frozen=True)
class ServerSettings:
    """The server's own settings, from the environment (gunicorn's and LiteLLM's variable names), next to the
    config's Settings: read here once, and handed to what needs them, never looked up per request."""

    # FORWARDED_ALLOW_IPS (gunicorn's variable, same meaning and default): peers whose X-Forwarded-* and other
    # client-address headers speak for the real client (nginx in front).
    trusted_proxy: Callable[[str], bool]
    json_logs: bool  # JSON_LOGS=true (`passthru --json_logs`, as in LiteLLM): every log line one JSON object
    # PROMETHEUS_MULTIPROC_DIR: where each gunicorn worker keeps its metrics (deploy/gunicorn.conf.py sets it);
    # None outside gunicorn (`flask run`, tests): the process's own registry.
    metrics_dir: str | None
    # Set for workers by a gunicorn master that accepted the config: it said the config's warnings once already.
    config_accepted: bool
    # PASSTHRU_LIMITS_DIR: the lock files that bound calls in flight across the server's workers (slots.py;
    # deploy/gunicorn.conf.py sets it); None outside gunicorn: the bound holds in the process.
    limits_dir: str | None = None
    # PASSTHRU_UI_SESSION: seconds an admin page login lasts, counted from the login (not from the last page).
    ui_session: float = UI_SESSION_DEFAULT


def read_server_settings(environ: Mapping[str, str] | None = None) -> ServerSettings:
    """The server's settings from the environment; ConfigError naming the variable when one is malformed."""
    environ = os.environ if environ is None else environ
    return ServerSettings(
        trusted_proxy=proxy_trust(environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")),
        json_logs=environ.get("JSON_LOGS", "").strip().lower() in ("1", "true", "yes"),
        metrics_dir=environ.get("PROMETHEUS_MULTIPROC_DIR") or None,
        config_accepted=ACCEPTED_TEXT in environ,
        limits_dir=environ.get(LIMITS_DIR_VARIABLE) or None,
        ui_session=ui_session(environ.get(UI_SESSION_VARIABLE, "")),
    )


def ui_session(value: str) -> float:
    """PASSTHRU_UI_SESSION in seconds ("12h", "30m", "1d"; unset: 12 hours), from a minute to 30 days."""
    if not value.strip():
        return UI_SESSION_DEFAULT
    match = DURATION.fullmatch(value.strip())
    seconds = int(match.group(1)) * SECONDS[match.group(2)] if match and match.group(2) in SECONDS else 0
    if not 60 <= seconds <= 30 * 86400:
        raise ConfigError(f"{UI_SESSION_VARIABLE}: {value!r} is not a duration from 1m to 30d, such as 12h")
    return float(seconds)


def proxy_trust(spec: str) -> Callable[[str], bool]:
    """Parse FORWARDED_ALLOW_IPS (gunicorn's setting, same meaning): addresses or networks, or * for any."""
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    if "*" in parts:
        return lambda address: True
    try:
        networks = tuple(ip_network(part, strict=False) for part in parts)
    except ValueError as exc:
        raise ConfigError(f"FORWARDED_ALLOW_IPS: {spec!r} is not a list of IP addresses or networks") from exc

    @lru_cache(maxsize=1024)
    def trusted(address: str) -> bool:
        try:
            peer = ip_address(address)
        except ValueError:
            return False
        return any(peer in network for network in networks)

    return trusted


def load_from_environment(environ: Mapping[str, str] | None = None) -> Settings:
    """The config a server process runs: the one its gunicorn master accepted, else read from the environment.

    Reading: $PASSTHRU_CONFIG_YAML's text if set (for platforms without a writable disk; errors then name
    `$PASSTHRU_CONFIG_YAML` where they would name the file), else the file $PASSTHRU_CONFIG, else config.yaml.
    """
    environ = os.environ if environ is None else environ
    if ACCEPTED_TEXT in environ:
        source = environ.get(ACCEPTED_SOURCE, "config")
        return parse_settings(parse_yaml(environ[ACCEPTED_TEXT], source), source, environ)
    return _parse_source(*_read_source(environ), environ)


def accept_from_environment(environ: MutableMapping[str, str]) -> Settings:
    """For the gunicorn master, at start and on each reload: read and check the config, then hand it to workers.

    Workers load what was accepted (through two private variables they inherit), so a config broken by an edit
    is refused at reload and the previous one keeps serving; a valid one is what every new worker runs.
    """
    source, text = _read_source(environ)
    settings = _parse_source(source, text, environ)
    environ[ACCEPTED_SOURCE] = source
    environ[ACCEPTED_TEXT] = text
    return settings


def _read_source(environ: Mapping[str, str]) -> tuple[str, str]:
    """(name for messages, YAML text) of the config the environment points at."""
    text = environ.get(CONFIG_YAML_VARIABLE, "")
    if text.strip():  # set to "" (or blanks) reads as unset: some platforms cannot delete a variable
        return f"${CONFIG_YAML_VARIABLE}", text
    path = environ.get(CONFIG_FILE_VARIABLE) or "config.yaml"
    return path, read_file(path)


def _parse_source(source: str, text: str, environ: Mapping[str, str]) -> Settings:
    """Validate the config text, saying when $PASSTHRU_CONFIG is ignored in favour of $PASSTHRU_CONFIG_YAML."""
    settings = parse_settings(parse_yaml(text, source), source, environ)
    if source.startswith("$") and environ.get(CONFIG_FILE_VARIABLE):
        ignored = f"{source} is set, so ${CONFIG_FILE_VARIABLE} ({environ[CONFIG_FILE_VARIABLE]}) is not read"
        settings = replace(settings, warnings=(ignored, *settings.warnings))
    return settings
