"""gunicorn settings for passthru: `gunicorn -c deploy/gunicorn.conf.py wsgi:app` (the `passthru` command uses them too).

Each setting says why. PORT, HOST and WEB_CONCURRENCY override the defaults the way PaaS hosts expect.
deploy/gunicorn.gevent.conf.py reuses all of this with gevent workers, for thousands of slow streams.
"""

import os
import sys

# PaaS hosts give the port in PORT; HOST=127.0.0.1 keeps passthru off the network (a laptop, behind nginx).
bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '4000')}"

# Threaded workers: passthru is blocking code (requests), and each call in flight (an LLM streaming for
# minutes, a large upload) holds one thread for as long as it lasts. The sync worker would hold a whole
# process per call and kill it after `timeout`. Hundreds of streams per host are fine; for thousands a thread
# each costs too much memory: use deploy/gunicorn.gevent.conf.py (a greenlet each).
worker_class = "gthread"
# Processes give CPU parallelism (2 per core: requests spend most of their time waiting on the upstream);
# WEB_CONCURRENCY is the PaaS convention for overriding it.
workers = int(os.environ.get("WEB_CONCURRENCY", 2 * (os.cpu_count() or 1)))
# Threads per worker = calls one worker holds open at once (the next one waits for a free thread). passthru's
# pool keeps up to 256 connections per upstream host (forward.POOL_SIZE): more than these threads can use.
threads = 64

# Each worker builds its own upstream connection pool after the fork: sockets must never be shared by
# processes. With gevent, it also means the app is imported after the worker has monkey-patched the stdlib.
preload_app = False

# Worker heartbeat, not a request limit: gthread's main loop keeps beating while threads stream for minutes.
# So it has nothing to do with a route's `timeout` (600 s by default), which passthru applies to each upstream
# call itself: seconds to connect, and seconds between two pieces of the answer.
timeout = 30
# On SIGHUP (reload) and SIGTERM (stop), calls in flight get this long to finish before their worker is
# killed. A route's `timeout` bounds the gaps in a stream, not its length, so no value covers every stream:
# 30 s lets ordinary calls finish. Raise it (and TimeoutStopSec in deploy/passthru.service) to let long
# generations survive restarts.
graceful_timeout = 30
# Idle keep-alive from the client (or nginx in front): long enough for reuse, short enough to free the slot.
# deploy/nginx.conf drops its idle connections to passthru after 4 s, before gunicorn closes them.
keepalive = 5

# passthru writes its own access line (with upstream time); gunicorn's would repeat it without that.
accesslog = None
errorlog = "-"
# gunicorn's admin socket is off: passthru does not use it, and two instances on one host would share its path.
control_socket_disable = True


def on_starting(server):
    """Check the config in the master, once, before any worker starts: a bad one stops here with one line."""
    from passthru.config import load_from_environment
    from passthru.errors import ConfigError

    try:
        load_from_environment(os.environ)
    except ConfigError as exc:
        sys.exit(f"passthru: {exc}")
