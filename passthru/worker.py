"""gunicorn's gthread worker, serving a keep-alive connection's next request in the thread that served the last one.

Selected in deploy/gunicorn.conf.py (`worker_class`); everything else is gthread's, unchanged.
"""

from __future__ import annotations

import select
import ssl
import threading
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

# How long the thread that answered waits for the next request before handing the connection back. A client on
# loopback or nginx's keep-alive pool sends it within tens of microseconds of reading the answer (0 ms caught 94 %
# of them on an idle host, 0.2 ms all but one in 7,000); 1 ms leaves room and costs an idle thread (no CPU, no GIL)
# for that long when none comes.
NEXT_REQUEST_WAIT = 0.001
# Requests one thread serves on one connection before handing it back to gthread anyway: a connection whose
# request gthread's main thread has yet to give a thread is not counted as being served (see handle), so this bounds
# how long such a request can wait behind one that sends back to back.
MAX_REQUESTS_PER_HANDOFF = 16


class KeepAliveThreadWorker(ThreadWorker):  # type: ignore[misc]  # gunicorn ships no type information
    """gthread, minus the main thread's round trip between two requests that follow each other closely.

    After each answer on a kept-alive connection, gthread's worker thread hands it to the main thread through a
    pipe (finish_request), which puts it back in its selector, wakes when the next request arrives and submits it
    to the thread pool again: three thread switches, each taking the GIL. Here the thread that answered waits
    NEXT_REQUEST_WAIT for the next request and, if it comes while no other request is being served in this worker,
    serves it itself through gthread's own handle(); otherwise it returns "kept alive" and gthread carries on exactly
    as it always does (keep-alive timeout, the stop linger, nr_conns). On a 2-core host at one connection this took
    0.15 to 0.28 ms off the median request through passthru (0.15 off the bare Flask app).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._serving = 0  # threads inside gthread's handle() now
        self._serving_lock = threading.Lock()

    def handle(self, conn: Any) -> Any:
        """gthread's handle(), repeated while the connection stays open and its next request is already arriving."""
        result = self._serve(conn)
        for _ in range(MAX_REQUESTS_PER_HANDOFF - 1):
            # Only True ("kept alive") loops: False (closed) and gthread's _DEFER (a new connection that sent
            # nothing) go to finish_request as they are. A stopping worker (SIGTERM, the old generation on SIGHUP,
            # max_requests reached) hands the connection back too: gthread keeps it a moment and answers a request
            # already on its way with Connection: close.
            if result is not True or not self.alive or not _next_request_arriving(conn):
                break
            # So does a worker serving other requests: a thread serving its own connection again and again keeps
            # taking the GIL back from theirs (a CPU-bound Flask app's p99 at 32 connections went from 32 to 79 ms),
            # where gthread's selector serves the connections in turn.
            if self._serving:
                break
            result = self._serve(conn)
        return result

    def _serve(self, conn: Any) -> Any:
        """gthread's handle(), counted in _serving while it runs."""
        with self._serving_lock:
            self._serving += 1
        try:
            return super().handle(conn)
        finally:
            with self._serving_lock:
                self._serving -= 1


def _next_request_arriving(conn: Any) -> bool:
    """Whether conn has bytes of another request: read ahead already, or readable within NEXT_REQUEST_WAIT."""
    # A body drain can read into the next request (gthread's finish_request checks the same buffer), and TLS can
    # hold decrypted bytes the socket no longer shows as readable.
    if conn.parser.unreader.buf.getvalue() or (isinstance(conn.sock, ssl.SSLSocket) and conn.sock.pending()):
        return True
    # poll, not select: a busy worker's descriptors go past select's 1024. Readable includes a closed or reset
    # connection; handle() then ends it, as it would have after gthread's selector woke.
    poller = select.poll()
    poller.register(conn.sock, select.POLLIN)
    return bool(poller.poll(NEXT_REQUEST_WAIT * 1000))
