"""Many connections trickling request heads a byte at a time, all driven from one thread (tests/abuse, bench/load.py).

Standard library only. A connection the server closes is opened again (up to a bound), so the count holds for the
whole run, as an attacker's would; how long each one stayed open is recorded. Loopback only, and every wait bounded.
"""

from __future__ import annotations

import contextlib
import heapq
import resource
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

FILLER = b"X-Trickle: 1\r\n"  # what is sent once `data` has all gone: a head that never ends


def raise_fd_limit(need: int) -> None:
    """Lift this process's soft open-file limit to `need` (at most the hard limit): a socket is a file."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need if hard == resource.RLIM_INFINITY else min(need, hard), hard))


@dataclass
class _Conn:
    sock: socket.socket
    opened: float
    serial: int  # tells a connection apart from an earlier one that had the same descriptor
    sent: int = 0
    answered: bool = False


@dataclass
class Trickle:
    """`count` connections to 127.0.0.1:port, each sending `data[:burst]` at once, then one more byte every
    `interval` seconds (FILLER after `data`), for at most `seconds`. Use as a context manager."""

    port: int
    count: int
    data: bytes
    interval: float = 1.0
    burst: int = 1
    seconds: float = 30.0
    reopen: int = 10_000  # connections opened in all, at most
    opened: int = 0
    connect_failures: int = 0
    answered: int = 0  # connections that got bytes back (an answer to `data[:burst]`, or an error)
    closed_by_server: list[float] = field(default_factory=list)  # seconds each had been open when the server closed it
    still_open: list[float] = field(default_factory=list)  # at the end: seconds each left open had been open
    _conns: dict[int, _Conn] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    error: BaseException | None = None

    @property
    def open_now(self) -> int:
        return len(self._conns)

    def __enter__(self) -> Trickle:
        raise_fd_limit(2 * self.count + 256)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(10)

    def wait_open(self, seconds: float) -> None:
        """Wait (bounded) until all `count` connections are open and have sent their first bytes."""
        deadline = time.monotonic() + seconds
        while self.open_now < self.count and time.monotonic() < deadline and self.error is None:
            time.sleep(0.05)
        assert self.error is None, self.error
        assert self.open_now >= self.count, f"{self.open_now} of {self.count} open, {self.connect_failures} failed"

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        due: list[tuple[float, int, int]] = []  # (when, serial, fd): the next byte of each connection
        try:
            end = time.monotonic() + self.seconds
            for _ in range(self.count):
                if self._stop.is_set():
                    return
                self._open(selector, due)
            while not self._stop.is_set() and (now := time.monotonic()) < end:
                wait = min(0.05, max(0.0, due[0][0] - now)) if due else 0.05
                for key, _ in selector.select(wait):
                    self._readable(selector, due, key.fd)
                now = time.monotonic()
                while due and due[0][0] <= now:
                    when, serial, fd = heapq.heappop(due)
                    conn = self._conns.get(fd)
                    if conn is None or conn.serial != serial:
                        continue  # closed meanwhile (a new connection may have its number: it has its own entry)
                    if conn.sent < len(self.data):
                        piece = self.data[conn.sent : conn.sent + 1]
                    else:
                        piece = FILLER[(conn.sent - len(self.data)) % len(FILLER) :][:1]
                    try:
                        conn.sock.send(piece)
                    except BlockingIOError:
                        pass  # the server reads no more: try again next time
                    except OSError:
                        self._closed(selector, due, fd)
                        continue
                    else:
                        conn.sent += 1
                    heapq.heappush(due, (when + self.interval, serial, fd))
        except BaseException as exc:  # seen by wait_open and the test: never lost in a thread
            self.error = exc
        finally:
            now = time.monotonic()
            self.still_open = [now - conn.opened for conn in self._conns.values()]
            for conn in self._conns.values():
                conn.sock.close()
            self._conns.clear()
            selector.close()

    def _open(self, selector: selectors.BaseSelector, due: list[tuple[float, int, int]]) -> None:
        if self.opened >= self.reopen:
            return
        self.opened += 1
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
        except OSError:
            self.connect_failures += 1
            return
        sock.setblocking(False)
        conn = _Conn(sock, time.monotonic(), self.opened)
        try:
            sock.sendall(self.data[: self.burst])  # a fresh socket's buffer takes a request at once
        except OSError:
            self.connect_failures += 1
            sock.close()
            return
        conn.sent = self.burst
        self._conns[sock.fileno()] = conn
        selector.register(sock, selectors.EVENT_READ)
        # Identical connections (keep-alive prelude included) keep the same pace, from when each opened.
        heapq.heappush(due, (conn.opened + self.interval, conn.serial, sock.fileno()))

    def _readable(self, selector: selectors.BaseSelector, due: list[tuple[float, int, int]], fd: int) -> None:
        conn = self._conns[fd]
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            if not conn.answered:
                conn.answered = True
                self.answered += 1
            return
        self._closed(selector, due, fd)

    def _closed(self, selector: selectors.BaseSelector, due: list[tuple[float, int, int]], fd: int) -> None:
        conn = self._conns.pop(fd)
        self.closed_by_server.append(time.monotonic() - conn.opened)
        selector.unregister(conn.sock)
        with contextlib.suppress(OSError):
            conn.sock.close()
        self._open(selector, due)
