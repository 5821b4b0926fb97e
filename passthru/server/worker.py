"""gunicorn's gthread worker, with request heads read in its poller and a keep-alive connection's next request served
by the thread that served the last one.

Selected in deploy/gunicorn.conf.py (`worker_class`); everything else is gthread's, unchanged.
"""

from __future__ import annotations

import os
import select
import selectors
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from gunicorn import http
from gunicorn.http.errors import LimitRequestHeaders, LimitRequestLine
from gunicorn.http.message import DEFAULT_MAX_HEADERFIELD_SIZE, MAX_HEADERS, MAX_REQUEST_LINE
from gunicorn.http2 import negotiation
from gunicorn.workers.gthread import ThreadWorker

from passthru.server.heads import header_timeout

# How long the thread that answered waits for the next request before handing the connection back. A client on
# loopback or nginx's keep-alive pool sends it within tens of microseconds of reading the answer (0 ms caught 94 %
# of them on an idle host, 0.2 ms all but one in 7,000); 1 ms leaves room and costs an idle thread (no CPU, no GIL)
# for that long when none comes.
NEXT_REQUEST_WAIT = 0.001
# Requests one thread serves on one connection before handing it back to gthread anyway: a connection whose
# request gthread's main thread has yet to give a thread is not counted as being served (see handle), so this bounds
# how long such a request can wait behind one that sends back to back.
MAX_REQUESTS_PER_HANDOFF = 16
HEAD_END = b"\r\n\r\n"
# One read of a head in the poller; what comes after the head (a body) is handed to gunicorn's parser with it.
HEAD_READ = 65536


def head_limits(cfg: Any) -> tuple[int, int]:
    """(request line, whole head) in bytes: what gunicorn's parser reads at most before it refuses a head."""
    line = cfg.limit_request_line
    line = MAX_REQUEST_LINE if line < 0 or line > MAX_REQUEST_LINE else line or 1024 * 1024  # 0: "unlimited"
    fields = cfg.limit_request_fields if 0 < cfg.limit_request_fields <= MAX_HEADERS else MAX_HEADERS
    field_size = cfg.limit_request_field_size if cfg.limit_request_field_size > 0 else DEFAULT_MAX_HEADERFIELD_SIZE
    return line, line + 2 + fields * (field_size + 2) + 4  # Message.max_buffer_headers, after the request line


@dataclass
class _Head:
    """A request head still arriving, read in the poller: the bytes so far and when the connection is dropped."""

    data: bytearray
    deadline: float


class KeepAliveThreadWorker(ThreadWorker):  # type: ignore[misc]  # gunicorn ships no type information
    """gthread, with two changes: no thread waits for a request head, and no round trip through the main thread
    between two requests that follow each other closely.

    Heads: gthread hands a connection to a pool thread as soon as it is accepted or its next request's first byte
    arrives, and the thread reads the rest of the head from a blocking socket with no deadline, so `threads` clients
    trickling heads stop the worker from answering anyone. Here the main thread reads heads in its poller (a
    non-blocking read each time bytes arrive, kept per connection), drops a connection whose head is not whole
    within $PASSTHRU_HEADER_TIMEOUT seconds, refuses one larger than gunicorn's limits as gunicorn would, and gives
    a connection to a thread only with a whole head, which gunicorn's parser then reads from its buffer. TLS, the
    PROXY protocol, uWSGI and HTTP/2 prior knowledge are left to gthread as they are.

    Keep-alive: after each answer, gthread's worker thread hands the connection to the main thread through a pipe
    (finish_request), which puts it back in its selector, wakes when the next request arrives and submits it to the
    thread pool again: three thread switches, each taking the GIL. Here the thread that answered waits
    NEXT_REQUEST_WAIT for the next request and, if its whole head comes while no other request is being served in
    this worker, serves it itself through gthread's own handle(); otherwise it returns "kept alive" and gthread
    carries on as it always does (keep-alive timeout, the stop linger, nr_conns), the head read as above. On a
    2-core host at one connection this took 0.15 to 0.28 ms off the median request through passthru.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._serving = 0  # threads inside gthread's handle() now
        self._serving_lock = threading.Lock()
        self.header_timeout = header_timeout(os.environ)
        self._line_limit, self._head_limit = head_limits(self.cfg)
        # Only plain HTTP/1 is read here: the others need gthread's own first read (a handshake, a preface, a line).
        self._reads_heads = not self.cfg.is_ssl and self.cfg.proxy_protocol == "off" and self.cfg.protocol == "http"
        # Connections whose head is arriving, in order of their deadlines (each is its start + header_timeout).
        self._heads: dict[Any, _Head] = {}
        # Connections handed to the thread pool and not finished yet (served, or queued for a thread): main thread only.
        self._in_threads = 0

    # ---- accepting only while a thread is free, in the main thread

    def set_accept_enabled(self, enabled: bool) -> None:
        """gthread's switch for accepting, held off while every thread has a connection: the kernel then gives new
        connections to a worker with a free thread, instead of this one queueing them behind long streams (one worker
        took 299 of 300 slow streams at once in bench/, and held 128 of them)."""
        super().set_accept_enabled(enabled and self._in_threads < self.cfg.threads)

    def _to_thread(self, conn: Any) -> None:
        """gthread's enqueue_req, counted: the connection now holds, or waits for, a thread."""
        self._in_threads += 1
        super().enqueue_req(conn)
        if self._in_threads >= self.cfg.threads:
            self.set_accept_enabled(False)  # gthread's loop turns it back on once a thread is free (above)

    def finish_request(self, conn: Any, fs: Any) -> None:
        """gthread's finish_request, with the connection's thread counted free again."""
        self._in_threads -= 1
        super().finish_request(conn, fs)

    # ---- request heads, in the main thread

    def enqueue_req(self, conn: Any) -> None:
        """A connection with a request to read (new, readable again, or with bytes of one read ahead): give it a
        thread once its head is whole."""
        if not self._reads_heads or negotiation.prior_knowledge_allowed(self.cfg, conn.client):
            self._to_thread(conn)
            return
        if conn.parser is None:
            # Made here rather than in the thread (TConn.init), which then only makes the socket blocking.
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
        head = _Head(bytearray(conn.parser.unreader.take_buffered()), time.monotonic() + self.header_timeout)
        if self._head_ready(conn, head, 0):
            return
        if conn.sock.gettimeout() != 0.0:  # a thread's socket, with bytes it read ahead: no syscall otherwise
            conn.sock.setblocking(False)
        # A new connection has seldom sent anything yet; any other came here readable: read it now rather than
        # after a round through the poller.
        if conn.initialized and self._read_head(conn, head):
            return
        self._heads[conn] = head
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_head_readable, conn))

    def _on_head_readable(self, conn: Any, _sock: Any) -> None:
        self._read_head(conn, self._heads[conn])

    def _read_head(self, conn: Any, head: _Head) -> bool:
        """One non-blocking read of a head: whether the connection is done with here (given a thread, or closed)."""
        try:
            data = conn.sock.recv(HEAD_READ)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:  # the client went (or reset): nothing to answer
            self._close(conn)
            return True
        searched = len(head.data)
        head.data += data
        return self._head_ready(conn, head, searched)

    def _head_ready(self, conn: Any, head: _Head, searched: int) -> bool:
        """Give the connection a thread if its head is whole, refuse it if too large: whether either happened."""
        data = head.data
        if data.find(HEAD_END, max(0, searched - 3)) >= 0:
            self._forget(conn)
            conn.parser.unreader.unread(bytes(data))
            conn.data_ready = True  # the bytes are read: gthread's handle() must not wait for the socket
            self._to_thread(conn)
            return True
        if len(data) <= self._line_limit + 4 or (data.find(b"\r\n", 2) >= 0 and len(data) <= self._head_limit):
            return False
        # The answer gunicorn's parser gives when it has read this much (414 or 431, LiteLLM's JSON: see
        # post_worker_init in deploy/gunicorn.conf.py); the socket is non-blocking and the answer small.
        if data.find(b"\r\n", 2) < 0:
            error: Exception = LimitRequestLine(len(data), self._line_limit)
        else:
            error = LimitRequestHeaders("max buffer headers")
        self.handle_error(None, conn.sock, conn.client, error)
        self._close(conn)
        return True

    def _forget(self, conn: Any) -> None:
        """Take conn out of the poller's heads, if it is there."""
        if self._heads.pop(conn, None) is not None:
            self.poller.unregister(conn.sock)

    def _close(self, conn: Any) -> None:
        self._forget(conn)
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self) -> None:
        """gthread's expiry of connections waiting for a first byte, and of heads past their deadline."""
        super().murder_pending()
        now = time.monotonic()
        while self._heads:
            conn, head = next(iter(self._heads.items()))
            if head.deadline > now:
                break
            self.log.debug("Closing connection: request head not whole after %gs", self.header_timeout)
            self._close(conn)

    # ---- the next request on a kept-alive connection, in the thread that answered

    def handle(self, conn: Any) -> Any:
        """gthread's handle(), repeated while the connection stays open and its next request is already arriving."""
        result = self._serve(conn)
        for _ in range(MAX_REQUESTS_PER_HANDOFF - 1):
            # Only True ("kept alive") loops: False (closed) and gthread's _DEFER (a new connection that sent
            # nothing) go to finish_request as they are. A stopping worker (SIGTERM, the old generation on SIGHUP,
            # max_requests reached) hands the connection back too: gthread keeps it a moment and answers a request
            # already on its way with Connection: close.
            if result is not True or not self.alive or not self._next_request_arriving(conn):
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

    def _next_request_arriving(self, conn: Any) -> bool:
        """Whether conn has another request to serve now: its whole head read ahead, or arriving within
        NEXT_REQUEST_WAIT (a part of one goes back to the main thread, whose poller reads the rest)."""
        unreader = conn.parser.unreader
        if isinstance(conn.sock, ssl.SSLSocket) or not self._reads_heads:
            # Read by gunicorn's parser in this thread, as gthread does. TLS can hold decrypted bytes the socket no
            # longer shows as readable.
            tls = isinstance(conn.sock, ssl.SSLSocket) and conn.sock.pending()
            return bool(unreader.buf.getvalue() or tls or _readable(conn.sock))
        # A body drain can read into the next request (gthread's finish_request checks the same buffer).
        if HEAD_END in unreader.buf.getvalue():
            return True
        if not _readable(conn.sock):
            return False
        try:
            data = conn.sock.recv(HEAD_READ, socket.MSG_DONTWAIT)
        except OSError:  # BlockingIOError included: the main thread's poller sees to it
            return False
        if not data:  # closed: handle() ends it, as it would have after gthread's selector woke
            return True
        buffered: bytes = unreader.take_buffered() + data
        unreader.unread(buffered)
        return HEAD_END in buffered


def _readable(sock: Any) -> bool:
    """Whether sock is readable within NEXT_REQUEST_WAIT (a closed or reset connection is readable too)."""
    # poll, not select: a busy worker's descriptors go past select's 1024.
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(NEXT_REQUEST_WAIT * 1000))
