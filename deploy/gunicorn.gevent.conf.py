"""gunicorn settings for thousands of slow streams: `gunicorn -c deploy/gunicorn.gevent.conf.py wsgi:app`.

All of deploy/gunicorn.conf.py, with gevent workers: a call in flight costs a greenlet (a few KiB), not a
thread. Needs gevent: `pip install -r requirements-gevent.txt`.
"""

import json
import os
import runpy
import sys
from pathlib import Path

# The default settings, read as gunicorn reads them (the file name has dots, so it cannot be imported).
_default = runpy.run_path(str(Path(__file__).with_name("gunicorn.conf.py")))
globals().update({name: value for name, value in _default.items() if not name.startswith("_")})

# gunicorn's gevent worker monkey-patches the standard library (socket, ssl, threading, ...) when it starts,
# so the blocking code of requests and urllib3 yields to other greenlets. That works only for modules
# imported after the patch: preload_app stays False (the app is imported in the worker, after it), and the
# master never imports passthru's app (see on_starting; the worker class below imports none of it).
# gunicorn's gevent worker, with each request head's wait bounded by $PASSTHRU_HEADER_TIMEOUT as well as keepalive
# (passthru/server/gevent_worker.py: it imports nothing of the app).
worker_class = "passthru.server.gevent_worker.HeadDeadlineGeventWorker"
# worker_connections is the default config's 4096: calls one worker holds open at once, and heads still arriving.
# Beyond 256 calls at once to one upstream host, the extra upstream connections are opened per call instead of
# pooled (forward.POOL_SIZE).
threads = 1  # a gthread setting; gevent workers have no thread pool
# The prefix of the variables the default hooks set for workers (see _in_child).
_PRIVATE = "_PASSTHRU_"


def on_starting(server):
    """The default config check, run in a child process so that the master never imports passthru.

    Imported in the master, urllib3 would be in every worker before the patch, holding the unpatched
    ssl.SSLContext: every TLS call to an upstream would then block the whole worker.
    """
    _in_child(_default["on_starting"], server)


def on_reload(server):
    """The default reload check (a broken config is refused, the previous one keeps serving), in a child too."""
    _in_child(_default["on_reload"], server)


def _in_child(hook, server):
    """Run a hook of the default config in a forked child and bring back what it set for workers.

    The hook sets private variables naming the accepted config (passthru.server_config.accept_from_environment) and
    the migrated store (passthru.keystore.store.MIGRATED_VARIABLE), or drops the latter; they come back over a pipe
    as JSON, since the child's environment dies with it.
    """
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(reader)
        code = 1
        try:
            hook(server)
            accepted = {name: value for name, value in os.environ.items() if name.startswith(_PRIVATE)}
            with os.fdopen(writer, "wb") as pipe:
                pipe.write(json.dumps(accepted).encode())
            code = 0
        except SystemExit as exc:  # the default check's way of saying what is wrong
            print(exc.code, file=sys.stderr)
        except BaseException as exc:  # the child must never return into gunicorn's master loop
            print(f"passthru: config check failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        message = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(1)
    for name in [name for name in os.environ if name.startswith(_PRIVATE)]:
        del os.environ[name]  # the child's set is the whole truth: a failed migration drops its variable
    os.environ.update(json.loads(message))
