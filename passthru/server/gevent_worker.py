"""gunicorn's gevent worker, with each request head's wait bounded by $PASSTHRU_HEADER_TIMEOUT too.

Selected in deploy/gunicorn.gevent.conf.py. The gunicorn master imports it, as it would gunicorn's own "gevent":
it imports gunicorn's worker (which imports gevent, patching nothing) and nothing of passthru's app.
"""

from __future__ import annotations

import os
from typing import Any

import gevent  # type: ignore[import-untyped]  # no stubs pinned; only gevent.Timeout is used
from gunicorn.workers.ggevent import GeventWorker

from passthru.server.heads import header_timeout


class HeadDeadlineGeventWorker(GeventWorker):  # type: ignore[misc]  # gunicorn ships no type information
    """gevent, with the wait for each request bounded by the shorter of gunicorn's keepalive and the header timeout.

    A connection costs a greenlet here, not a thread, so slow heads cannot pin the worker; what they can do is hold
    its `worker_connections` (deploy/gunicorn.conf.py raises it). gunicorn reads each request of a connection, the
    first included, inside timeout_ctx(): a silent gevent.Timeout of `keepalive` seconds for the idle wait and the
    head together, after which the connection is closed. This makes it no longer than $PASSTHRU_HEADER_TIMEOUT.
    (With `keepalive = 0` gunicorn reads the one request without it; passthru's config keeps 5 s.)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout(os.environ)

    def timeout_ctx(self) -> gevent.Timeout:
        """The bound on reading one request: its idle wait and its head."""
        return gevent.Timeout(min(self.cfg.keepalive, self.header_timeout), False)
