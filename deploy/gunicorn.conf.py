"""gunicorn settings for passthru: `gunicorn -c deploy/gunicorn.conf.py wsgi:app` (`passthru` uses them too).

Each setting says why. PORT, HOST and WEB_CONCURRENCY override the defaults the way PaaS hosts expect.
deploy/gunicorn.gevent.conf.py reuses all of this with gevent workers, for thousands of slow streams.
"""

import os
import resource
import shutil
import sys
import tempfile

# /metrics sums every worker's counters through prometheus_client's multiprocess mode: each worker writes its own
# files here. It must be set before anything imports prometheus_client, so it is the first thing done.
if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="passthru-metrics-")
# max_parallel_requests (a route's, a key's) holds across this server's workers: each call in flight locks a byte of
# a file here, which the kernel unlocks if its worker dies (passthru/slots.py). One folder per server, made before
# any worker starts; workers of a reload share it with the old ones still finishing their calls.
if "PASSTHRU_LIMITS_DIR" not in os.environ:
    os.environ["PASSTHRU_LIMITS_DIR"] = tempfile.mkdtemp(prefix="passthru-limits-")

# PaaS hosts give the port in PORT; HOST=127.0.0.1 keeps passthru off the network (a laptop, behind nginx).
bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '4000')}"

# Threaded workers: passthru is blocking code (requests), and each call in flight (an LLM streaming for
# minutes, a large upload) holds one thread for as long as it lasts. The sync worker would hold a whole
# process per call and kill it after `timeout`. Hundreds of streams per host are fine; for thousands a thread
# each costs too much memory: use deploy/gunicorn.gevent.conf.py (a greenlet each).
# The worker is gunicorn's gthread, except that request heads are read in its poller (a thread is given only to a
# whole head, so slow clients cannot take the threads; see worker_connections), and that the thread which answered a
# kept-alive connection serves its next request itself when it comes within 1 ms and no other request is being
# served, instead of a round trip through gthread's main thread: 0.15-0.28 ms less per request at one connection
# here (passthru/server/worker.py).
worker_class = "passthru.server.worker.KeepAliveThreadWorker"
# Processes give CPU parallelism (2 per core: requests spend most of their time waiting on the upstream);
# WEB_CONCURRENCY is the PaaS convention for overriding it.
workers = int(os.environ.get("WEB_CONCURRENCY", 2 * (os.cpu_count() or 1)))
# Threads per worker = calls one worker holds open at once. Threads start only when needed, so an idle worker pays
# nothing for them. A worker whose threads are all busy stops accepting, and the kernel gives new connections to the
# others (passthru/server/worker.py); gunicorn alone does not spread them evenly (bench/ saw one worker take 299 of
# 300 streams at once). 128, not 64: headroom for a 2-core host to hold 200+ slow streams in 4 workers. passthru's
# pool keeps up to 256 connections per upstream host (forward.POOL_SIZE): more than these threads can use.
threads = 128
# Connections one worker holds at once, calls in flight and request heads still arriving included: it stops accepting
# at this many. passthru's worker reads heads in its poller (a few KiB each, no thread) and drops one not whole
# within $PASSTHRU_HEADER_TIMEOUT seconds (5 by default), so clients trickling heads cost connections, not threads;
# gunicorn's default of 1000 would let 1,000 of them stop a worker from accepting anyone for that long. Kept-alive
# idle connections count too (and beyond worker_connections - threads of them, answers say Connection: close).
worker_connections = 4096
# Each connection is an open file, and so is the upstream connection a call holds: Linux's usual soft limit of 1024
# would make accept() fail (EMFILE, which ends the worker) long before worker_connections. Raised to what they
# need, up to the hard limit (the system's real bound); the workers inherit it from the master.
_need = 2 * worker_connections + 256
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _soft != resource.RLIM_INFINITY and _soft < _need:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_need if _hard == resource.RLIM_INFINITY else min(_need, _hard), _hard))

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
# JSON_LOGS=true (or `passthru --json_logs`): gunicorn's own lines become JSON objects too, like passthru's.
if os.environ.get("JSON_LOGS", "").strip().lower() in ("1", "true", "yes"):
    logconfig_dict = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "passthru.logs.JsonFormatter"}},
        # The handler names are gunicorn's own defaults, which its root and access loggers refer to.
        "handlers": {
            name: {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
            for name in ("console", "error_console")
        },
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["error_console"], "propagate": False},
            # A logging config switches gunicorn's access log on; passthru's access line already says it all.
            "gunicorn.access": {"handlers": [], "propagate": False},
        },
    }
# gunicorn's admin socket is off: passthru does not use it, and two instances on one host would share its path.
control_socket_disable = True


def on_starting(server):
    """Check the config and migrate the key store, once, before any worker starts.

    A bad config or an unreachable store stops here with one line. The migration runs in a child process, so this
    master (and every worker forked from it) never imports SQLAlchemy or Alembic; workers know the store is
    migrated and skip that step.
    """
    from passthru.errors import ConfigError, KeyStoreError
    from passthru.keystore.store import migrate_in_child
    from passthru.server.heads import header_timeout
    from passthru.server_config import accept_from_environment

    try:
        header_timeout(os.environ)  # read again by each worker; a bad value stops here, not at every worker's start
        settings = accept_from_environment(os.environ)
        if settings.database_url is not None:
            migrate_in_child(settings.database_url)
    except (ConfigError, KeyStoreError, ValueError) as exc:
        sys.exit(f"passthru: {exc}")
    for warning in settings.warnings:
        server.log.warning("passthru: %s", warning)
    # Counters left by an earlier run would be summed into this one's.
    metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    for name in os.listdir(metrics_dir):
        if name.endswith(".db"):
            os.remove(os.path.join(metrics_dir, name))


def on_reload(server):
    """kill -HUP: check the edited config before the new workers start; a broken one is refused, not served.

    The new workers run whatever the master last accepted, so on a refusal they keep the previous config.
    """
    from passthru.errors import ConfigError, KeyStoreError
    from passthru.keystore.store import migrate_in_child
    from passthru.server_config import accept_from_environment

    try:
        settings = accept_from_environment(os.environ)
    except ConfigError as exc:
        server.log.error("passthru: %s; reload refused, the previous config keeps serving", exc)
        return
    server.log.info("passthru: config reloaded")
    for warning in settings.warnings:
        server.log.warning("passthru: %s", warning)
    if settings.database_url is not None:
        try:
            # A new passthru version's schema, after an upgrade in place: the child imports the code now on disk.
            migrate_in_child(settings.database_url)
        except KeyStoreError as exc:
            server.log.error("passthru: %s; the new workers will migrate it on first use", exc)


def post_worker_init(worker):
    """gunicorn's own answers to requests it cannot parse (bad framing, oversized headers) become LiteLLM's JSON.

    Done once the app is loaded, so with gevent it happens after the monkey-patching, like every other import.
    """
    import gunicorn.util

    from passthru.errors import HTTP_ERROR_TYPES, error_body

    def write_error(sock, status, reason, message):
        body = error_body(status, message, HTTP_ERROR_TYPES.get(status, "bad_request_error"))
        head = f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        gunicorn.util.write_nonblock(sock, f"{head}Content-Length: {len(body)}\r\n\r\n".encode("latin-1") + body)

    gunicorn.util.write_error = write_error


def child_exit(server, worker):
    """A worker that exits stops counting as in flight (its live gauges are dropped)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Remove the metrics and limits directories this config created (ones given in the environment are left)."""
    for variable, prefix in (
        ("PROMETHEUS_MULTIPROC_DIR", "passthru-metrics-"),
        ("PASSTHRU_LIMITS_DIR", "passthru-limits-"),
    ):
        directory = os.environ[variable]
        if os.path.basename(directory).startswith(prefix):
            shutil.rmtree(directory, ignore_errors=True)
