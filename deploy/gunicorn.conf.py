"""gunicorn settings for passthru: `gunicorn -c deploy/gunicorn.conf.py wsgi:app` (the `passthru` command uses them too).

Each setting says why. Environment variables override the defaults the way PaaS hosts expect.
"""

import os
import sys

# PaaS hosts give the port in PORT; HOST lets a laptop bind 127.0.0.1 only.
bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '4000')}"

# Threaded workers: a slow upstream (an LLM streaming for minutes) holds one thread, not a whole process.
worker_class = "gthread"
# Processes give CPU parallelism (2 per core: requests spend most of their time waiting on the upstream);
# WEB_CONCURRENCY is the PaaS convention for overriding it.
workers = int(os.environ.get("WEB_CONCURRENCY", 2 * (os.cpu_count() or 1)))
# Threads per worker = streams one worker holds open at once; passthru's pool keeps as many upstream connections.
threads = 64

# Each worker builds its own upstream connection pool after the fork: sockets must never be shared by processes.
preload_app = False

# Worker heartbeat, not a request limit: gthread's main loop keeps beating while threads stream for minutes.
# Routes bound their own upstream waits with their `timeout` field.
timeout = 30
graceful_timeout = 30
# Idle keep-alive from the client (or nginx in front): long enough for reuse, short enough to free threads.
keepalive = 5

# passthru writes its own access line (with upstream time); gunicorn's would repeat it without that.
accesslog = None
errorlog = "-"
# gunicorn's admin socket is off: passthru does not use it, and two instances on one host would share its path.
control_socket_disable = True


def on_starting(server):
    """Check the config and migrate the key store in the master, once, before any worker starts.

    A bad file or an unreachable store stops here with one line. Workers forked from this process know the store is
    migrated and skip the check.
    """
    from passthru.config import load_settings
    from passthru.db import migrate
    from passthru.errors import ConfigError, KeyStoreError

    try:
        settings = load_settings(os.environ.get("PASSTHRU_CONFIG", "config.yaml"))
        if settings.database_url is not None:
            migrate(settings.database_url)
    except (ConfigError, KeyStoreError) as exc:
        sys.exit(f"passthru: {exc}")
