"""The app factory: Settings → a Flask app with its routes, error handlers and access log, bound once."""

from __future__ import annotations

import os
from functools import partial

from flask import Flask

from passthru import __version__, exchange, health, limits, metrics, pricing, routes, tracing, ui
from passthru.auth import Authenticator
from passthru.config import Settings, load_settings
from passthru.errors import register_error_handlers
from passthru.forward import Forwarder
from passthru.key_api import build_key_api
from passthru.keystore.store import LazyStore, spend_recorder
from passthru.logs import access_line, configure_logging, log
from passthru.server import heap
from passthru.server_config import ServerSettings, load_from_environment, read_server_settings
from passthru.slots import host_slots


def create_app(
    config: str | os.PathLike[str] | Settings | None = None,
    *,
    detailed_debug: bool = False,
    server: ServerSettings | None = None,
) -> Flask:
    """Build the app from a config file, validated Settings, or by default the environment's config.

    The default is $PASSTHRU_CONFIG_YAML (the YAML itself), else the file $PASSTHRU_CONFIG, else config.yaml. The
    server's own settings (trusted fronts, log format, metrics folder) are read from the environment unless given.

    Call it in the process that serves (after gunicorn forks): it creates this process's upstream connection pool.
    The key store (when master_key is set, or a route has an rpm_limit) is opened by the first call that needs it
    (see keystore/store.py), and migrated then unless the gunicorn master did.
    """
    if isinstance(config, Settings):
        settings = config
    else:
        settings = load_settings(config) if config else load_from_environment(os.environ)
    server = read_server_settings() if server is None else server
    configure_logging(settings.secrets, detailed_debug, server.json_logs)
    heap.limit_arenas()
    app = Flask("passthru", static_folder=None)
    authenticator = store = None
    if settings.database_url is not None:  # virtual keys (master_key), or routes' rpm_limit counts
        store = LazyStore(settings.database_url)
        app.extensions["passthru.key_store"] = store
        log.debug("key store: %s, opened on first use", settings.database_shown)
    if settings.master_key is not None:
        # config.py sets database_url whenever master_key is: virtual keys come with the master key.
        assert store is not None
        authenticator = Authenticator(settings.master_key, store)
        app.register_blueprint(metrics.labelled(build_key_api(authenticator, settings.master_key)))
    # This worker's transport: its Session and connection pools, made here, after gunicorn forked.
    forwarder = Forwarder(settings.endpoints, server.trusted_proxy)
    if store is not None and settings.master_key is not None:  # the admin page, with the master key
        app.register_blueprint(metrics.labelled(ui.build_blueprint(settings, store, server, forwarder.cooling)))
    # Its slot files (calls in flight, shared by the server's workers), opened on first use, after the fork too.
    bind = partial(limits.bind, store=store, slots=host_slots(server.limits_dir))
    app.register_blueprint(routes.build_blueprint(settings, forwarder, authenticator, bind))
    app.register_blueprint(metrics.labelled(health.build_blueprint(settings, __version__, store, forwarder.cooling)))
    metrics_blueprint = metrics.build_blueprint(
        authenticator if settings.metrics_require_auth else None, server.metrics_dir
    )
    app.register_blueprint(metrics.labelled(metrics_blueprint))
    register_error_handlers(app)
    # What each owner records once an answer is done: the call's slots let go of first; the usage and spend, which
    # the others read; metrics, the spend log entry (every pass-through call, when there are virtual keys: nothing
    # reads a spend log without the master key), the heap trim, the spans, the access line.
    spend_log: tuple[exchange.Recorder, ...] = ()
    if store is not None and authenticator is not None:
        spend_log = (spend_recorder(store, authenticator.master.hex(), not settings.disable_spend_logs),)
    # Every request continues its caller's trace or starts one (tracing.py); its spans are exported when
    # general_settings.otel or OTEL_* say so, and only then is the OpenTelemetry SDK loaded, in this worker.
    begin: exchange.Begin = tracing.begin
    spans: tuple[exchange.Recorder, ...] = ()
    if settings.otel is not None:
        from passthru.otel import Export

        export = Export(settings.otel, settings.secrets, server.trusted_proxy)
        app.extensions["passthru.export"] = export
        begin, spans = export.begin, (export.record,)
    recorders = (limits.release, pricing.meter, metrics.record, *spend_log, heap.record, *spans, access_line)
    app.wsgi_app = exchange.Exchanges(app.wsgi_app, recorders, begin)  # type: ignore[method-assign]
    # Under gunicorn the master said these once, when it accepted the config; each worker would repeat them.
    for warning in () if server.config_accepted else settings.warnings:
        log.warning(warning)
    return app
