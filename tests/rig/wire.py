"""Raw-socket tools for tests/faults and tests/abuse: exact bytes to a server, upstreams that misbehave on purpose,
facts about gunicorn's processes, and the collection of everything a suite saw, to grep it for secrets.

Standard library only; every socket has a timeout and every loop a bound, so a misbehaving server fails a test
instead of hanging it.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from conftest import Gunicorn, start_gunicorn, write_config

MiB = 1 << 20
HEAD_LIMIT = 2 * MiB  # what a RawUpstream reads of a request head before it gives up on it


def port_of(server: Gunicorn) -> int:
    return int(server.url.rsplit(":", 1)[1])


@dataclass
class OneWorker:
    """A real gunicorn serving passthru with one worker, as the suites attack it: its port and its worker's pid."""

    server: Gunicorn
    port: int
    worker: int


@contextlib.contextmanager
def one_worker(
    directory: Path,
    entries: list[dict[str, Any]],
    env: dict[str, str],
    evidence: Evidence,
    conf: str = "deploy/gunicorn.conf.py",
) -> Iterator[OneWorker]:
    """gunicorn under `conf` with these routes, the master key from $MK, debug logging (so that the suites see
    every line a secret could leak into) and its log kept as evidence; stopped (bounded) on the way out."""
    env = {"GUNICORN_CMD_ARGS": "--log-level debug", **env}
    server = start_gunicorn(write_config(directory, entries, master_key="os.environ/MK"), directory / "gunicorn.log",
                            env, conf=conf)  # fmt: skip
    evidence.log(server.log)
    try:
        yield OneWorker(server, port_of(server), workers(server, 1)[0])
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------------------
# client side: exact bytes in, everything that comes back


@dataclass
class Reply:
    """What came back on one connection: the bytes, and how the connection ended."""

    data: bytes
    ended: str  # "closed" (FIN), "reset" (RST), "timeout" (still open when we stopped waiting), "limit"
    seconds: float

    @property
    def head(self) -> list[bytes]:
        return self.data.partition(b"\r\n\r\n")[0].split(b"\r\n")

    @property
    def status(self) -> int | None:
        parts = self.head[0].split(b" ", 2)
        return int(parts[1]) if len(parts) > 1 and parts[0].startswith(b"HTTP/") and parts[1].isdigit() else None

    @property
    def body(self) -> bytes:
        return self.data.partition(b"\r\n\r\n")[2]

    def header(self, name: str) -> list[str]:
        prefix = name.lower().encode() + b":"
        lines = [line for line in self.head[1:] if line.lower().startswith(prefix)]
        return [line[len(prefix) :].strip().decode("latin-1") for line in lines]


def exchange(port: int, request: bytes, *, timeout: float = 10, half_close: bool = False,
             limit: int = 4 * MiB) -> Reply:  # fmt: skip
    """Send exact bytes to 127.0.0.1:port and read until the server ends the connection, `limit` bytes arrived,
    or nothing came for `timeout` seconds. Requests should say `Connection: close` unless a test wants otherwise.
    """
    started = time.monotonic()
    data = b""
    ended = "limit"
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
            if half_close:
                sock.shutdown(socket.SHUT_WR)  # the caller is done: the body is what it is
            while len(data) < limit:
                piece = sock.recv(65536)
                if not piece:
                    ended = "closed"
                    break
                data += piece
        except ConnectionResetError:
            ended = "reset"
        except BrokenPipeError:  # the server answered and closed while we were still sending
            ended = "reset"
            with contextlib.suppress(OSError):
                data += sock.recv(65536)
        except TimeoutError:
            ended = "timeout"
    return Reply(data, ended, time.monotonic() - started)


# ------------------------------------------------------------------------------------------------------------
# upstream side: a server whose every answer is a script


class Conn:
    """One accepted upstream connection, as a script sees it: the request already read, a counting send."""

    def __init__(self, sock: socket.socket, reader: BinaryIO, head: list[bytes], stop: threading.Event) -> None:
        self.sock = sock
        self.reader = reader
        self.head = head  # request line and header lines, without line ends
        self.stop = stop  # set when the test is over: long scripts end early
        self.sent = 0

    def header(self, name: str) -> str | None:
        prefix = name.lower().encode() + b":"
        return next((line[len(prefix) :].strip().decode("latin-1") for line in self.head[1:]
                     if line.lower().startswith(prefix)), None)  # fmt: skip

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += len(data)


@dataclass
class Served:
    """What one connection of a RawUpstream did: its request head, bytes sent, and how it ended."""

    head: list[bytes]
    sent: int = 0
    error: str | None = None  # the exception that ended the script (the proxy hung up), else None
    finished: float = 0.0  # time.monotonic() when the connection was closed


Script = Callable[[Conn], None]


class RawUpstream:
    """An upstream on 127.0.0.1:port that reads each request head and hands the connection to `script`.

    Scripts write whatever bytes they like (hostile ones included) and must end on `conn.stop`; the connection
    is closed when the script returns. One request per connection: scripts that answer say Connection: close.
    """

    def __init__(self, script: Script, *, seconds: float = 30) -> None:
        self.script = script
        self.seconds = seconds  # no connection is served longer than this
        self.stop = threading.Event()
        self.served: list[Served] = []
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.threads: list[threading.Thread] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while not self.stop.is_set() and len(self.threads) < 10_000:
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(min(10, self.seconds))
        record = Served([])
        with self.lock:
            self.served.append(record)
        reader = sock.makefile("rb")
        try:
            size = 0
            while size < HEAD_LIMIT:
                line = reader.readline(70_000)
                if not line or line in (b"\r\n", b"\n"):
                    break
                size += len(line)
                record.head.append(line.rstrip(b"\r\n"))
            conn = Conn(sock, reader, record.head, self.stop)
            try:
                self.script(conn)
            finally:
                record.sent = conn.sent
        except Exception as exc:  # the proxy hung up, or a socket timeout: recorded, never raised in a thread
            record.error = type(exc).__name__
        finally:
            with contextlib.suppress(OSError):
                reader.close()
                sock.close()
            record.finished = time.monotonic()

    def ended(self) -> list[Served]:
        with self.lock:
            return [s for s in self.served if s.finished]

    def open_connections(self) -> int:
        with self.lock:
            return sum(1 for s in self.served if not s.finished)

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        self.acceptor.join(5)
        deadline = time.monotonic() + 10
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def read_body(conn: Conn, limit: int = 64 * MiB) -> tuple[int, str]:
    """Read the request body as framed (Content-Length or chunked): (length, sha256). Raises if it breaks off."""
    digest = hashlib.sha256()
    total = 0

    def take(n: int) -> None:
        nonlocal total
        while n:
            piece = conn.reader.read(min(n, 65536))
            if not piece:
                raise ConnectionAbortedError("body ended early")
            digest.update(piece)
            total += len(piece)
            n -= len(piece)
            if total > limit:
                raise ConnectionAbortedError("body too long for a test")

    if (conn.header("Transfer-Encoding") or "").lower() == "chunked":
        for _ in range(100_000):
            size = int(conn.reader.readline(1024).split(b";")[0], 16)
            if size == 0:
                break
            take(size)
            if conn.reader.read(2) != b"\r\n":
                raise ConnectionAbortedError("chunk not followed by CRLF")
        while conn.reader.readline(1024) not in (b"\r\n", b""):
            pass
    else:
        take(int(conn.header("Content-Length") or 0))
    return total, digest.hexdigest()


@dataclass
class Recorded:
    target: str
    head: list[bytes]
    body_len: int


@dataclass
class Recorder:
    """A RawUpstream script that reads each request whole, records it, and answers 200 {"ok": true}.

    Unlike upstream.py's /echo it never sends back what it received: the abuse suites inject secrets
    upstream and grep every answer for them. Requests whose body broke off are not recorded.
    """

    requests: list[Recorded] = field(default_factory=list)

    def __call__(self, conn: Conn) -> None:
        length, _ = read_body(conn)
        target = conn.head[0].split(b" ")[1].decode("latin-1") if conn.head else ""
        self.requests.append(Recorded(target, conn.head, length))
        body = b'{"ok": true}'
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                  b"Connection: close\r\n\r\n%s" % (len(body), body))  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# gunicorn's processes


def children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(p) for p in (task / "children").read_text().split()]
    return found


def workers(server: Gunicorn, count: int, seconds: float = 15) -> list[int]:
    """The pids of the gunicorn master's workers once there are `count` of them (bounded wait)."""
    deadline = time.monotonic() + seconds
    while len(found := children(server.process.pid)) != count:
        assert time.monotonic() < deadline, f"{len(found)} workers, not {count}:\n{server.output()[-3000:]}"
        time.sleep(0.05)
    return sorted(found)


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


# ------------------------------------------------------------------------------------------------------------
# secrets: everything a suite received and every log its servers wrote


@dataclass
class Evidence:
    """Collects every answer a suite's clients received and the logs of every server it ran."""

    answers: list[tuple[str, bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def answer(self, label: str, reply: Reply) -> Reply:
        self.answers.append((label, reply.data))
        return reply

    def log(self, path: Path) -> None:
        self.logs.append(path)

    def leaks(self, secrets: list[str]) -> list[str]:
        """Where any secret appears: answers byte for byte, logs as text (the whole file, every line)."""
        found = []
        for secret in secrets:
            for label, data in self.answers:
                if secret.encode() in data:
                    found.append(f"{secret[:12]}… in the answer to {label}")
            for path in self.logs:
                if path.exists() and secret in path.read_text(errors="replace"):
                    found.append(f"{secret[:12]}… in {path}")
        return found
