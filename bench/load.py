"""The load the bench puts on the servers, and what it reads back: wrk, SSE streams, downloads and uploads (with the
workers' memory around them), slow streams opened at once, slow request heads trickled beside normal requests.
"""

from __future__ import annotations

import http.client
import json
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from plan import MIB
from procs import BENCH, ROOT, clean_env, cpu_seconds, cpu_used, memory_kb, request
from servers import Gunicorn


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int
    cpu_us: float = float("nan")  # server CPU (user + system) per request, when its processes are known
    store_cpu_us: float = 0.0  # CPU per request of the key store's own server processes (PostgreSQL)


def wrk(binary: str, port: int, path: str, conns: int, threads: int, seconds: int, key: str | None = None,
        server_pids: Callable[[], list[int]] | None = None,
        store_cpu: Callable[[], dict[int, float]] | None = None) -> WrkResult:  # fmt: skip
    """wrk with bench/post.lua (the ~300-byte JSON POST); parses the script's one BENCH line.

    With server_pids, the CPU those processes used during the run is divided by the requests served: a cost per
    request that other work on a shared machine disturbs far less than requests per second. store_cpu reads the
    key store's own server (PostgreSQL), counted apart: SQLite's work is in the workers' own CPU.
    """
    readers: dict[str, Callable[[], dict[int, float]]] = {"server": dict, "store": store_cpu or dict}
    if server_pids:
        readers["server"] = lambda: cpu_seconds(server_pids())
    before = {kind: read() for kind, read in readers.items()}
    cmd = [binary, f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--timeout", "5s", "-s", str(BENCH / "post.lua"),
           f"http://127.0.0.1:{port}{path}"]  # fmt: skip
    env = clean_env(BENCH_KEY=key or "")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 30)
    cpu = {kind: cpu_used(before[kind], read()) for kind, read in readers.items()}
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-500:]} {done.stderr[-500:]}")
    data = json.loads(line[6:])
    errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
    count = data["requests"]
    return WrkResult(count / (data["duration_us"] / 1e6), data["p50_us"] / 1000, data["p99_us"] / 1000, errors, count,
                     cpu["server"] / count * 1e6 if server_pids and count else float("nan"),
                     cpu["store"] / count * 1e6 if count else 0.0)  # fmt: skip


def sse_stream(port: int, target: str, events: int, timeout: float = 15.0) -> tuple[float, list[float]]:
    """Open one SSE stream on a new connection: (seconds to the first event, gaps between events in seconds)."""
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    arrivals: list[float] = []
    buf = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n"
                     "Connection: close\r\n\r\n".encode())  # fmt: skip
        while len(arrivals) < events and time.monotonic() < deadline:
            data = sock.recv(65536)
            now = time.perf_counter()
            if not data:
                break
            buf += data
            seen = buf.count(b"data: ")
            arrivals.extend([now] * (seen - len(arrivals)))
    if not buf.startswith(b"HTTP/1.1 200") or len(arrivals) < events:
        raise RuntimeError(f"SSE on port {port}: {len(arrivals)}/{events} events, {bytes(buf[:80])!r}")
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return arrivals[0] - started, gaps


def download(port: int, path: str, size: int) -> float:
    """GET a body of `size` bytes into a reused 1 MiB buffer; seconds from request to last byte."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    buf = memoryview(bytearray(MIB))
    try:
        started = time.perf_counter()
        conn.request("GET", path)
        resp = conn.getresponse()
        got = 0
        while n := resp.readinto(buf):
            got += n
        elapsed = time.perf_counter() - started
    finally:
        conn.close()
    if resp.status != 200 or got != size:
        raise RuntimeError(f"download from port {port}{path}: status {resp.status}, {got} of {size} bytes")
    return elapsed


def warm(path: Path) -> None:
    """Read a file once, so the next transfer of it is served from the page cache.

    The machine drops the cache between rounds: without this, whichever download came first in a round ran at
    about 0.45 GB/s, direct or through passthru, and the others at 2-4 GB/s (bench/RESULTS.md's history in git).
    """
    buf = memoryview(bytearray(MIB))
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def upload(port: int, path: str, size: int) -> float:
    """POST `size` bytes with Content-Length from a reused 1 MiB buffer; seconds until the answer is read."""
    piece = memoryview(bytes(MIB))

    def pieces() -> Iterator[memoryview]:
        left = size
        while left:
            yield piece[: min(left, MIB)]
            left -= min(left, MIB)

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        started = time.perf_counter()
        conn.request("POST", path, body=pieces(),
                     headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"})  # fmt: skip
        resp = conn.getresponse()
        answer = resp.read()
        elapsed = time.perf_counter() - started
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"upload to port {port}{path}: status {resp.status} {answer[:200]!r}")
    return elapsed


@dataclass
class Transfer:
    seconds: float
    rss_growth_kb: int  # largest (RSS after - RSS before) among the workers
    peak_growth_kb: int  # largest (VmHWM after - RSS before): the transient peak


def measured(server: Gunicorn, run: Callable[[], float]) -> Transfer:
    """Run a transfer through a gunicorn server, reading every worker's memory before and after."""
    for pid in server.workers():
        try:  # "5" resets VmHWM to the current RSS (Linux ≥ 4.0), so the peak below is this transfer's own
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            pass
    before = {pid: memory_kb(pid) for pid in server.workers()}
    seconds = run()
    time.sleep(0.2)  # the access line and the upstream release happen after the last byte
    growth, peak = 0, 0
    for pid, (rss, _) in before.items():
        rss_after, hwm_after = memory_kb(pid)
        if rss_after:
            growth = max(growth, rss_after - rss)
            peak = max(peak, hwm_after - rss)
    return Transfer(seconds, growth, peak)


def still_open(sock: socket.socket) -> bool:
    """Whether the peer has not closed this non-blocking socket: a peek finds data or nothing yet, not the end."""
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def slow_streams(port: int, target: str, count: int, window: float, settle: float = 3.0) -> tuple[int, int, float]:
    """Open `count` SSE streams at once; (how many are held at once, how many failed, seconds to the last held one).

    The upstream's second event is far later than the window, so a stream that got a 200 and its first event
    holds a server thread (or greenlet) until the end. Held means that, and still open when counting stops: every
    stream counted is being served at the same moment. A stream closed before or after its first event failed.
    """
    request_bytes = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n\r\n".encode()
    sel = selectors.DefaultSelector()
    state: dict[socket.socket, bytearray] = {}
    served: set[socket.socket] = set()
    closed = 0
    started = time.monotonic()
    last_new = started
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            sel.register(sock, selectors.EVENT_WRITE)
            state[sock] = bytearray()
        while len(served) + closed < count:
            now = time.monotonic()
            if now - started > window or (served and now - last_new > settle):
                break
            for key, mask in sel.select(timeout=0.2):
                fileobj = key.fileobj
                assert isinstance(fileobj, socket.socket)
                sock = fileobj
                try:
                    if mask & selectors.EVENT_WRITE:
                        sock.send(request_bytes)  # a fresh socket's buffer takes these few bytes whole
                        sel.modify(sock, selectors.EVENT_READ)
                        continue
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    closed += 1
                    served.discard(sock)
                    sel.unregister(sock)
                    continue
                buf = state[sock]
                buf += data
                if sock not in served and b"data: " in buf and buf.startswith(b"HTTP/1.1 200 "):
                    served.add(sock)
                    last_new = time.monotonic()
        held = sum(1 for sock in served if still_open(sock))
        return held, closed + len(served) - held, last_new - started
    finally:
        for sock in state:
            sock.close()
        sel.close()


@dataclass
class SlowHeads:
    """One slow-heads row: how long each normal request took beside the trickled heads, and what became of those."""

    seconds: list[float]  # each normal request, in order
    failed: int  # normal requests not answered 200 within 3 s
    held: int  # trickled connections open when timing began
    dropped: list[float]  # seconds each trickled connection the server closed had been open


def slow_heads(port: int, count: int, seconds: float) -> SlowHeads:
    """`count` connections trickling one never-ending request head each, a byte a second (tests/rig/trickle.py: one
    thread, each connection opened again when the server drops it), while a small POST on a fresh connection goes
    every 0.5 s for `seconds`: what a client without nginx in front can do to one worker.
    """
    sys.path.insert(0, str(ROOT / "tests" / "rig"))
    from trickle import Trickle  # standard library only, shared with tests/abuse

    head = f"POST /small HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n".encode()
    times: list[float] = []
    failed = 0
    with Trickle(port, count, head, seconds=seconds + 25) as trickle:
        try:
            trickle.wait_open(20)
        except AssertionError as exc:
            raise RuntimeError(f"slow heads: {exc}") from None
        held = trickle.open_now
        end = time.monotonic() + seconds
        for _ in range(int(seconds / 0.5) + 1):
            if time.monotonic() >= end:
                break
            started = time.monotonic()
            try:
                status, _ = request(port, "POST", "/small", b"{}", {"Content-Type": "application/json"}, timeout=3.0)
            except OSError:
                status = 0
            times.append(time.monotonic() - started)
            failed += status != 200
            time.sleep(max(0.0, 0.5 - times[-1]))
    return SlowHeads(times, failed, held, sorted(trickle.closed_by_server))
