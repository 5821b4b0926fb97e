"""The config a server process runs: found through the environment ($PASSTHRU_CONFIG_YAML, $PASSTHRU_CONFIG), and
handed by the gunicorn master to its workers as the text it last accepted, so a reload never serves a broken edit."""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from dataclasses import replace

from passthru.config import Settings, parse_settings, parse_yaml, read_file

# Where a server finds its config (load_from_environment): the YAML itself wins over a file path.
CONFIG_YAML_VARIABLE = "PASSTHRU_CONFIG_YAML"
CONFIG_FILE_VARIABLE = "PASSTHRU_CONFIG"
# Set by the gunicorn master for its workers (accept_from_environment): the config text it last accepted.
ACCEPTED_TEXT = "_PASSTHRU_ACCEPTED_CONFIG"
ACCEPTED_SOURCE = "_PASSTHRU_ACCEPTED_SOURCE"


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
