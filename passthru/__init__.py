"""passthru: LiteLLM-compatible pass-through endpoints as a plain WSGI app."""

from __future__ import annotations

import os

from urllib.parse import urlsplit

from flask import Flask

from passthru.auth import KeyCheck, virtual_key_check
from passthru.config import Settings, load_settings
from passthru.errors import register_error_handlers
from passthru.forward import new_session
from passthru.key_api import build_key_api
from passthru.keys import open_store
from passthru.logs import AccessLog, configure_logging, log
from passthru.routes import build_blueprint
from passthru.spend import SpendWriter

__version__ = "0.1.0"


def create_app(config: str | os.PathLike[str] | Settings | None = None, *, detailed_debug: bool = False) -> Flask:
    """Build the app from a config file (default: $PASSTHRU_CONFIG, else config.yaml) or validated Settings.

    Call it in the process that serves (after gunicorn forks): it creates this process's connection pools, the
    upstream one and, when master_key is set, the key store's (migrating it first unless the gunicorn master did).
    """
    if isinstance(config, Settings):
        settings = config
    else:
        settings = load_settings(config or os.environ.get("PASSTHRU_CONFIG", "config.yaml"))
    configure_logging(settings.secrets, detailed_debug)
    app = Flask("passthru", static_folder=None)
    hosts = {urlsplit(ep.target).netloc for ep in settings.endpoints}
    key_check: KeyCheck | None = None
    if settings.master_key is not None and settings.database_url is not None:
        store = open_store(settings.database_url)
        spend = SpendWriter(store)
        app.extensions["passthru.key_store"] = store
        app.extensions["passthru.spend_writer"] = spend
        key_check = virtual_key_check(settings.master_key, store, spend)
        app.register_blueprint(build_key_api(store, settings.master_key))
        log.debug("key store: %s", settings.database_shown)
    app.register_blueprint(build_blueprint(settings, new_session(len(hosts)), key_check))
    register_error_handlers(app)
    app.wsgi_app = AccessLog(app.wsgi_app)  # type: ignore[method-assign]
    for warning in settings.warnings:
        log.warning(warning)
    return app
