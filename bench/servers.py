"""What the bench measures against, started on free ports: nginx, the Python upstream, gunicorn apps (the ceiling and
passthru), and the PostgreSQL database of passthru-pg's key store; the tools the run needs, found or installed.
"""

from __future__ import annotations

import atexit
import json
import os
import selectors
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from procs import (
    BENCH,
    CHILDREN,
    ROOT,
    Child,
    children_of,
    clean_env,
    cpu_seconds,
    free_port,
    memory_kb,
    proc_stat,
    request,
    wait_answer,
)

# The second passthru's key store: a database of its own on the local server (trust auth), made from `test`.
PG_SERVER = "postgresql://postgres@127.0.0.1:5432"
PG_ADMIN_DATABASE = "test"
MASTER_KEY = "sk-bench-master-key-0123456789"
TOOLS = (("nginx", "nginx-light"), ("wrk", "wrk"))  # command, Debian package that has it
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# ---------------------------------------------------------------------------------------------------------------
# Tools and servers


def command_path(name: str) -> str | None:
    """`command -v name`, with the sbin directories on PATH (nginx lives in /usr/sbin)."""
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":" + SBIN_PATH}
    found = subprocess.run(["sh", "-c", f"command -v {shlex.quote(name)}"], env=env, capture_output=True, text=True)
    return found.stdout.strip() or None


def ensure_tools(install: bool) -> dict[str, str]:
    """Find nginx and wrk; apt-get install the missing ones (nginx-light, wrk) when allowed."""
    missing = [package for command, package in TOOLS if command_path(command) is None]
    if missing:
        if not install or os.geteuid() != 0 or command_path("apt-get") is None:
            sys.exit(f"bench: missing {', '.join(missing)}; install with: apt-get install -y {' '.join(missing)}")
        print(f"bench: installing {' '.join(missing)} with apt-get", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
            done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, timeout=600)
            if done.returncode != 0:
                sys.exit(f"bench: {' '.join(cmd)} failed ({done.returncode})")
    paths = {command: command_path(command) for command, _ in TOOLS}
    if None in paths.values():
        sys.exit("bench: nginx or wrk still missing after apt-get install")
    return {k: v for k, v in paths.items() if v}


@dataclass
class Nginx:
    child: Child
    upstream_port: int  # the fixed upstream: ~300-byte JSON, /big.bin, /sink
    proxy_port: int  # nginx proxy_pass to the fixed upstream
    big_file: Path  # what /big.bin serves


def start_nginx(nginx: str, tmp: Path, body: bytes, big_size: int) -> Nginx:
    """Write the config from bench/nginx.conf.template into tmp and run nginx in the foreground from there."""
    www = tmp / "www"
    www.mkdir()
    with open(www / "big.bin", "wb") as f:
        f.truncate(big_size)  # sparse: no disk written; nginx sends it with sendfile
    up, proxy = free_port(), free_port()
    text = (BENCH / "nginx.conf.template").read_text()
    fields = {"USER": "user root;" if os.geteuid() == 0 else "", "TMP": str(tmp), "UPSTREAM_PORT": str(up),
              "PROXY_PORT": str(proxy), "BODY": body.decode(), "OPENAI": openai_answer().decode()}  # fmt: skip
    if any("'" in fields[name] or "$" in fields[name] for name in ("BODY", "OPENAI")):
        raise ValueError("the fixed bodies must not contain ' or $ (nginx string syntax)")
    for name, value in fields.items():
        text = text.replace(f"@@{name}@@", value)
    (tmp / "nginx.conf").write_text(text)
    cmd = [nginx, "-p", f"{tmp}/", "-e", str(tmp / "error.log"), "-c", str(tmp / "nginx.conf"), "-g", "daemon off;"]
    child = CHILDREN.spawn("nginx", cmd, log=tmp / "nginx.out", stop_signal=signal.SIGTERM)
    for port in (up, proxy):
        wait_answer(port, "GET", "/small", 10, child.alive)
    return Nginx(child, up, proxy, www / "big.bin")


@dataclass
class PyUpstream:
    child: Child
    port: int


def start_py_upstream(tmp: Path) -> PyUpstream:
    """bench/py_upstream.py (tests/rig/upstream.py in its own process); it prints its port."""
    child = CHILDREN.spawn("py-upstream", [sys.executable, str(BENCH / "py_upstream.py")], log=tmp / "py-upstream.log",
                           stdin=subprocess.PIPE, stdout_pipe=True)  # fmt: skip
    assert child.proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(child.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=15):
            raise RuntimeError("the Python upstream did not report its port within 15 s")
    line = child.proc.stdout.readline().decode().strip()
    if not line.isdigit():
        raise RuntimeError(f"the Python upstream said {line!r} instead of a port:\n{child.tail()}")
    return PyUpstream(child, int(line))


@dataclass
class Gunicorn:
    name: str
    child: Child
    port: int
    spawned: float  # monotonic time of Popen
    first_answer: float = 0.0  # seconds from spawn to the first 200

    def workers(self) -> list[int]:
        return children_of(self.child.proc.pid)


def start_gunicorn(name: str, app: str, conf: str, config: Path, tmp: Path, probe: str,
                   database_url: str | None = None, **extra_env: str) -> Gunicorn:  # fmt: skip
    """`gunicorn -c <conf> <app>` from the repo root on a free port; returns once `probe` answered 200.

    The key store (made for the master key) is `database_url`, by default SQLite in the run's temp dir rather than
    the repo's working directory. `extra_env` are more environment variables (WEB_CONCURRENCY="1").
    """
    port = free_port()
    env = clean_env(PASSTHRU_CONFIG=str(config), PORT=str(port), HOST="127.0.0.1",
                    DATABASE_URL=database_url or f"sqlite:///{tmp / 'keys.db'}", **extra_env)  # fmt: skip
    log = tmp / f"{name}-{port}.log"
    spawned = time.monotonic()
    child = CHILDREN.spawn(name, [sys.executable, "-m", "gunicorn", "-c", conf, app], log=log, env=env,
                           stop_signal=signal.SIGINT)  # fmt: skip  # SIGINT: gunicorn's quick shutdown
    server = Gunicorn(name, child, port, spawned)
    try:
        answered = wait_answer(port, "POST", probe, 20, child.alive, body=b"{}")
    except RuntimeError as exc:
        raise RuntimeError(f"{name} did not start: {exc}\n{child.tail()}") from None
    server.first_answer = answered - spawned
    return server


def settled_workers(server: Gunicorn, seconds: float = 10.0) -> list[int]:
    """RSS (kB) of each worker once the worker count and every worker's RSS stopped moving (all booted, idle).

    The count is read from /proc rather than from the gunicorn config: running the config here would run its
    side effects (environment variables, temp dirs) in this process. Bounded by `seconds`.
    """
    deadline = time.monotonic() + seconds
    previous: list[int] = []
    steady = 0
    while time.monotonic() < deadline:
        current = [memory_kb(pid)[0] for pid in server.workers()]
        same = len(previous) == len(current) and all(abs(a - b) < 64 for a, b in zip(previous, current, strict=True))
        steady = steady + 1 if same and current else 0
        if steady >= 3:  # ~0.9 s without a new worker or a moving RSS
            return current
        previous = current
        time.sleep(0.3)
    return previous


# ---------------------------------------------------------------------------------------------------------------
# The second passthru's key store: PostgreSQL


@dataclass(frozen=True)
class PgDatabase:
    """The run's own PostgreSQL database, the second passthru's key store: made fresh, dropped on the way out."""

    name: str

    @property
    def url(self) -> str:
        return f"{PG_SERVER}/{self.name}"


def pg_connect(database: str = PG_ADMIN_DATABASE) -> Any:
    """An autocommit connection (CREATE/DROP DATABASE refuse a transaction), by default to the `test` database.

    psycopg is imported here, not at the top: run.py imports this file under any Python, before it re-runs itself in
    the venv. Every statement on it is bounded, like every other wait of the run.
    """
    import psycopg

    return psycopg.connect(f"{PG_SERVER}/{database}", autocommit=True, connect_timeout=5,
                           options="-c statement_timeout=30s -c lock_timeout=10s")  # fmt: skip


def create_pg_database() -> PgDatabase:
    """A fresh database named after this process; raises psycopg.OperationalError when the server is unreachable."""
    from psycopg import sql

    db = PgDatabase(f"passthru_bench_{os.getpid()}")
    name = sql.Identifier(db.name)
    with pg_connect() as conn:
        # Registered once the server answered and before CREATE: from here, every way out drops the database.
        atexit.register(drop_pg_database, db)
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))  # a killed run's, same pid
        conn.execute(sql.SQL("CREATE DATABASE {}").format(name))
    return db


def drop_pg_database(db: PgDatabase) -> None:
    """DROP ... WITH (FORCE): a passthru worker still connected (a run cut short) must not keep it alive."""
    import psycopg
    from psycopg import sql

    try:
        with pg_connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db.name)))
    except psycopg.Error as exc:
        print(f"bench: could not drop PostgreSQL database {db.name} ({exc}); drop it by hand", file=sys.stderr)


def pg_cpu(db: PgDatabase) -> dict[int, float]:
    """CPU seconds so far of the PostgreSQL processes serving the run's database, a reading for cpu_used.

    The backends connected now count by pid. A pool's overflow connections come and go under load (a new backend
    for a few percent of calls), and an ended backend's CPU moves into its parent's reaped-children time: the
    postmaster's cutime + cstime counts too, under its own pid. That is the whole server's, but this database is
    the one busy while the bench runs; the server's checkpointer and WAL writer are not counted.
    """
    with pg_connect(db.name) as conn:  # not `test`: pg_other_sessions counts every database but this one
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                            "AND pid <> pg_backend_pid()").fetchall()  # fmt: skip
        own = conn.execute("SELECT pg_backend_pid()").fetchone()
        # Read while connected: once the connection closes, its backend exits and its /proc entry goes.
        postmaster = int(proc_stat(int(own[0]))[1])  # the parent of every backend, this one included
    return {**cpu_seconds(int(row[0]) for row in rows), **cpu_seconds([postmaster], reaped=True)}


def pg_other_sessions(db: PgDatabase) -> int:
    """Sessions opened so far on the server in other databases: any during the rounds may have put its CPU in
    pg_cpu's reaped time (the test suite uses the same server)."""
    with pg_connect(db.name) as conn:
        row = conn.execute("SELECT coalesce(sum(sessions), 0) FROM pg_stat_database "
                           "WHERE datname <> current_database()").fetchone()  # fmt: skip
    return int(row[0])


# ---------------------------------------------------------------------------------------------------------------
# What passthru serves in the run: its routes, and virtual keys from its own /key/generate


def passthru_config(tmp: Path, nginx: Nginx, py: PyUpstream, *, keys: bool) -> Path:
    """The passthru config of the run: routes to the fixed upstream (with and without auth) and the Python one.

    With `keys`, the master key, and so a key store, in which every pass-through call is logged: the servers that
    serve the keys. Without, no store at all: what passing calls through costs, as most LiteLLM pass-through configs
    (secrets injected, no master key) run.
    """
    fixed = f"http://127.0.0.1:{nginx.upstream_port}"
    routes = [
        {"path": "/small", "target": f"{fixed}/small"},
        {"path": "/big", "target": f"{fixed}/big.bin"},
        {"path": "/sink", "target": f"{fixed}/sink"},
        {"path": "/py", "target": f"http://127.0.0.1:{py.port}", "include_subpath": True},
        {"path": "/usage-json", "target": f"{fixed}/openai.json", "input_cost_per_token": 2.5e-6,
         "output_cost_per_token": 1e-5},
        {"path": "/usage-bin", "target": f"{fixed}/openai.bin", "input_cost_per_token": 2.5e-6,
         "output_cost_per_token": 1e-5},
        # Two healthy targets, against /small's one: what the choice between them costs a call.
        {"path": "/two", "targets": [{"url": f"{fixed}/small", "name": "a"}, {"url": f"{fixed}/small", "name": "b"}]},
        # A first target that refuses every connection (nothing listens on its port) and never cools down: every
        # call fails over to the second, the latency failover adds.
        {"path": "/failover", "allowed_fails": 10**9, "targets": [
            {"url": f"http://127.0.0.1:{free_port()}/small", "name": "refusing"},
            {"url": f"{fixed}/small", "name": "healthy", "order": 2}]},
    ]  # fmt: skip
    general: dict[str, Any] = {"pass_through_endpoints": routes}
    if keys:
        general["master_key"] = MASTER_KEY
        routes.append({"path": "/small-auth", "target": f"{fixed}/small", "auth": True, "cost_per_request": 0.001})
        # A route rpm_limit it never reaches: every call counted in the store's window, in leases, as a key's are.
        routes.append({"path": "/small-rpm", "target": f"{fixed}/small", "rpm_limit": 2_000_000_000})
    path = tmp / ("passthru-keys.yaml" if keys else "passthru.yaml")
    path.write_text(json.dumps({"general_settings": general}, indent=2))  # JSON is YAML
    return path


def openai_answer() -> bytes:
    """The usage rows' answer: the test suite's OpenAI chat answer, on one line (nginx's `return` takes a string)."""
    answer = json.loads((ROOT / "tests" / "fixtures" / "usage" / "openai_chat.json").read_bytes())
    return json.dumps(answer, separators=(",", ":")).encode()


def make_virtual_key(port: int, *, limits: bool = False) -> str:
    """A virtual key from passthru's /key/generate (in that instance's store), checked to pass the auth route.

    Without limits (LiteLLM's default key), a call is admitted from the worker's memory of the key and charged with
    its spend log entry. With `limits` (an rpm_limit and a max_budget it never reaches), every call is admitted,
    counted and charged by the store, a lease of up to leases.MOST calls at a time (a key near its limits is asked
    for call by call: tests/test_leases.py, and the earlier runs in RESULTS.md's git history, measure that case).
    """
    admin = {"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"}
    fields: dict[str, object] = {"key_alias": f"bench-{'limits' if limits else 'plain'}"}
    if limits:
        fields.update(rpm_limit=1_000_000_000, max_budget=1e12)
    status, answer = request(port, "POST", "/key/generate", json.dumps(fields).encode(), admin)
    if status != 200:
        raise RuntimeError(f"/key/generate answered {status} {answer[:200]!r}")
    key = str(json.loads(answer)["key"])
    post = json.dumps({"model": "m", "query": "q", "documents": ["d"]}).encode()
    status, answer = request(port, "POST", "/small-auth", post, {"Authorization": f"Bearer {key}"})
    if status != 200:
        raise RuntimeError(f"passthru auth route with a virtual key answered {status} {answer[:200]!r}")
    return key
