"""Every process the bench starts, each in its own process group and stopped on the way out, and what /proc says.

Children (CHILDREN, the run's one registry) spawn and stop them; the rest reads their workers, memory and CPU, finds
free ports, sends one request or waits for the first 200, and sets the environment and open-file limit they inherit.
"""

from __future__ import annotations

import http.client
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
                   "no_proxy")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Processes: every child in its own process group, all of them stopped on exit


@dataclass
class Child:
    """One started process (and its group): how to stop it and where its output went."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path | None
    stop_signal: int

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 30) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class Children:
    """The processes this run started; stop_all() is safe to call more than once and from atexit."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def spawn(self, name: str, cmd: Sequence[str], *, log: Path | None, env: dict[str, str] | None = None,
              stop_signal: int = signal.SIGTERM, stdin: int | None = subprocess.DEVNULL,
              stdout_pipe: bool = False) -> Child:  # fmt: skip
        """Start cmd in a new session (its own process group), output to `log` (a full pipe would block it).

        With stdout_pipe the child's stdout is a pipe the caller reads (and stderr alone goes to `log`).
        """
        with open(log if log else os.devnull, "wb") as sink:
            proc = subprocess.Popen(
                list(cmd), cwd=ROOT, env=env, stdin=stdin, stdout=subprocess.PIPE if stdout_pipe else sink,
                stderr=sink, start_new_session=True,
            )  # fmt: skip
        child = Child(name, proc, log, stop_signal)
        self.children.append(child)
        return child

    def stop(self, child: Child, grace: float = 5.0) -> None:
        """Signal the group, wait `grace` seconds, then SIGKILL the group; bounded."""
        if child in self.children:
            self.children.remove(child)
        pgid = child.proc.pid  # start_new_session: the child leads its own group
        for sig, wait in ((child.stop_signal, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                child.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            # The leader is gone; anything left in its group (a worker mid-shutdown) goes too.
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            break
        for stream in (child.proc.stdin, child.proc.stdout):
            if stream is not None:
                stream.close()

    def stop_all(self) -> None:
        for child in list(reversed(self.children)):
            self.stop(child, grace=3.0)


CHILDREN = Children()


# ---------------------------------------------------------------------------------------------------------------
# Small helpers: ports, waits, /proc, the environment


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
            timeout: float = 5.0) -> tuple[int, bytes]:  # fmt: skip
    """One request on a fresh connection: (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_answer(port: int, method: str, path: str, seconds: float, alive: Callable[[], bool],
                body: bytes | None = None) -> float:  # fmt: skip
    """Poll until the port answers 200 to the request; the monotonic time it did. Fails after `seconds`."""
    deadline = time.monotonic() + seconds
    last = "nothing listening"
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the server on port {port} exited before answering")
        try:
            status, _ = request(port, method, path, body, {"Content-Type": "application/json"}, timeout=2.0)
            if status == 200:
                return time.monotonic()
            last = f"status {status}"
        except OSError as exc:
            last = type(exc).__name__
        time.sleep(0.005)
    raise RuntimeError(f"no 200 from 127.0.0.1:{port}{path} within {seconds}s ({last})")


def proc_stat(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: state, ppid, ... utime [11], stime, cutime, cstime; [] if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def children_of(pid: int) -> list[int]:
    """Pids whose parent is pid (gunicorn's workers), read from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        fields = proc_stat(int(entry)) if entry.isdigit() else []
        if fields and int(fields[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in kB, from /proc/<pid>/status; (0, 0) if it is gone."""
    values = {"VmRSS:": 0, "VmHWM:": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            parts = line.split()
            if parts and parts[0] in values:
                values[parts[0]] = int(parts[1])
    except OSError:
        pass
    return values["VmRSS:"], values["VmHWM:"]


def cpu_seconds(pids: Iterable[int], reaped: bool = False) -> dict[int, float]:
    """utime + stime of each live process in seconds, from /proc/<pid>/stat; with `reaped`, the CPU of the children
    it has waited for instead (cutime + cstime): where an exited child's CPU goes."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for pid in pids:
        if fields := proc_stat(pid):
            found[pid] = (int(fields[13]) + int(fields[14]) if reaped else int(fields[11]) + int(fields[12])) / ticks
    return found


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two readings, process by process.

    A process first seen in `after` started in between and counts whole; one gone by `after` counts 0 rather than
    minus its past (PostgreSQL backends of a pool's overflow come and go during a run: see pg_cpu).
    """
    return sum(max(0.0, spent - before.get(pid, 0.0)) for pid, spent in after.items())


def raise_fd_limit(streams: Sequence[int]) -> str:
    """Lift this process's soft open-file limit for slow streams opened `streams` at a time, one count after the
    other; children inherit it. Says what it did; the hard limit is the ceiling.

    The bench client holds a socket per stream, and a passthru worker (which may take most of them) holds two, one
    to the caller and one upstream. The Python upstream keeps every count's sockets until their handlers wake from
    the long gap, after the last count: it needs them all at once.
    """
    need = max(2 * max(streams), sum(streams)) + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return f"open-file limit {soft} (≥ {need} needed)"
    new = need if hard == resource.RLIM_INFINITY else min(need, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    short = "" if new >= need else f", short of the {need} needed: raise the hard limit (ulimit -Hn)"
    return f"open-file limit raised from {soft} to {new}{short}"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}
    env.update(extra)
    return env
