"""One-command benchmark of passthru against nginx and a bare Flask ceiling: `.venv/bin/python bench/run.py [--quick]`.

Starts nginx (a fixed upstream and a proxy to it), tests/rig/upstream.py (SSE), bench/ceiling.py and passthru under
deploy/gunicorn.conf.py (a second passthru keeps its keys in PostgreSQL), all on free 127.0.0.1 ports; measures every
configuration in alternating rounds (ratios within one run are what count on a noisy machine), then slow streams
and slow request heads under the default and the gevent config; prints a markdown report and writes it to
bench/out/latest.md. Everything it starts runs in its own process group and is killed on the way out, whatever the
way out is; the PostgreSQL database it makes is dropped.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# bench/ is not a package: its modules are found on sys.path, where a script's own directory is, and where this puts
# it for `python -m bench.run` too. Like this file, they import only the standard library at the top, so that they
# load under any Python before run.py re-runs itself in the venv.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import download, measured, slow_heads, slow_streams, sse_stream, upload, warm, wrk  # noqa: E402
from plan import DEFAULT_CONF, FULL, GEVENT_CONF, QUICK, Plan, gevent_installed, slow_cases  # noqa: E402
from procs import BENCH, CHILDREN, ROOT, children_of, memory_kb, raise_fd_limit, request  # noqa: E402
from report import Results, median, report  # noqa: E402
from servers import (  # noqa: E402
    MASTER_KEY,
    PG_SERVER,
    Gunicorn,
    Nginx,
    PyUpstream,
    create_pg_database,
    ensure_tools,
    make_virtual_key,
    openai_answer,
    passthru_config,
    pg_cpu,
    pg_other_sessions,
    settled_workers,
    start_gunicorn,
    start_nginx,
    start_py_upstream,
)

VENV_PYTHON = ROOT / ".venv" / "bin" / "python"


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(f"bench: stopped by signal {signum}; everything started is being stopped")


def _watchdog(signum: int, frame: Any) -> None:
    raise SystemExit("bench: the run took longer than its watchdog allows; stopping everything")


# ---------------------------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class Load:
    """One configuration wrk drives: where the POST goes, with which key, and whose CPU pays for it."""

    name: str
    port: int
    path: str
    key: str | None
    server_pids: Callable[[], list[int]]
    store_cpu: Callable[[], dict[int, float]] | None = None  # a CPU reading of the key store's own server, if any


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> str:
    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = Plan(**{**plan.__dict__, "rounds": args.rounds})
    if args.streams:
        streams = min(args.streams, 5000)
        plan = Plan(**{**plan.__dict__, "slow_streams": streams, "gevent_streams": streams})
    signal.signal(signal.SIGALRM, _watchdog)
    signal.alarm(plan.watchdog)
    tools = ensure_tools(install=not args.no_install)
    sys.path.insert(0, str(BENCH))
    from ceiling import BODY  # the same ~300 bytes for nginx and the ceiling

    res = Results()
    res.load_before = os.getloadavg()
    cases = slow_cases(plan, args)
    res.fd_limit = raise_fd_limit([case.streams for case in cases])  # before any child: they inherit it
    log(res.fd_limit)
    tmp = Path(tempfile.mkdtemp(prefix="passthru-bench-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    conf = args.conf
    nginx = start_nginx(tools["nginx"], tmp, BODY, plan.transfer_bytes)
    py = start_py_upstream(tmp)
    config = passthru_config(tmp, nginx, py, keys=False)
    config_keys = passthru_config(tmp, nginx, py, keys=True)
    log(f"nginx upstream :{nginx.upstream_port}, nginx proxy :{nginx.proxy_port}, Python upstream :{py.port}")

    # Start-up to first answer and idle RSS: fresh starts, passthru and ceiling alternating; the last ones serve.
    passthru = ceiling = None
    for i in range(plan.startups):
        for name, app in (("passthru", "wsgi:app"), ("ceiling", "bench.ceiling:app")):
            server = start_gunicorn(name, app, conf, config, tmp, "/small")
            res.add(res.startup, name, server.first_answer)
            rss = settled_workers(server)
            res.add(res.idle_rss_kb, f"{name} fresh", max(rss, default=0))
            res.workers = max(res.workers, len(rss))
            log(f"start {i + 1}: {name} first answer after {server.first_answer * 1000:.0f} ms, "
                f"idle worker RSS {[r // 1024 for r in rss]} MB")  # fmt: skip
            if i < plan.startups - 1:
                CHILDREN.stop(server.child)
            elif name == "passthru":
                passthru = server
            else:
                ceiling = server
    assert passthru is not None and ceiling is not None

    # The same passthru, config and gunicorn config, serving the virtual keys, started after the timed starts: one
    # with its own SQLite store, one with its store in PostgreSQL. Apart from `passthru`, so that its workers show
    # what one that only passes calls through weighs after the load, and these what the key store adds.
    passthru_keys = start_gunicorn("passthru-keys", "wsgi:app", conf, config_keys, tmp, "/small",
                                   f"sqlite:///{tmp / 'keys-sqlite.db'}")  # fmt: skip
    settled_workers(passthru_keys)
    # No server on 127.0.0.1:5432 skips the PostgreSQL rows, not the run.
    import psycopg

    passthru_pg = pg_db = None
    try:
        pg_db = create_pg_database()
    except psycopg.OperationalError as exc:
        res.pg_skipped = f"no PostgreSQL at {PG_SERVER.split('@', 1)[1]} ({str(exc).strip().splitlines()[0]})"
        log(f"PostgreSQL rows skipped: {res.pg_skipped}")
    if pg_db is not None:
        passthru_pg = start_gunicorn("passthru-pg", "wsgi:app", conf, config_keys, tmp, "/small", pg_db.url)
        settled_workers(passthru_pg)
        log(f"passthru-pg: keys in PostgreSQL database {pg_db.name}")

    # The same passthru under the gevent config, for its latency and key-path rows (only with gevent installed).
    passthru_gevent = None
    if gevent_installed():
        passthru_gevent = start_gunicorn("passthru-gevent", "wsgi:app", GEVENT_CONF, config_keys, tmp, "/small",
                                         f"sqlite:///{tmp / 'keys-gevent.db'}")  # fmt: skip
        settled_workers(passthru_gevent)

    # The floor: Flask and urllib3's pool with nothing of passthru's (bench/floor.py), under the same config.
    floor = start_gunicorn("floor", "bench.floor:app", conf, config, tmp, "/small",
                           FLOOR_UPSTREAM=f"http://127.0.0.1:{nginx.upstream_port}/small")  # fmt: skip
    settled_workers(floor)

    check_answers(nginx, ceiling, floor, passthru, passthru_keys, py, BODY)
    nginx_workers = nginx.child.proc.pid
    loads = [Load("nginx direct", nginx.upstream_port, "/small", None, lambda: children_of(nginx_workers)),
             Load("nginx proxy", nginx.proxy_port, "/small", None, lambda: children_of(nginx_workers)),
             Load("ceiling", ceiling.port, "/small", None, ceiling.workers),
             Load("floor", floor.port, "/small", None, floor.workers),
             Load("passthru", passthru.port, "/small", None, passthru.workers),
             Load("passthru usage json", passthru.port, "/usage-json", None, passthru.workers),
             Load("passthru usage bin", passthru.port, "/usage-bin", None, passthru.workers),
             Load("passthru two targets", passthru.port, "/two", None, passthru.workers),
             Load("passthru failover", passthru.port, "/failover", None, passthru.workers),
             Load("passthru-keys", passthru_keys.port, "/small", None, passthru_keys.workers),
             Load("passthru-keys auth", passthru_keys.port, "/small-auth", MASTER_KEY, passthru_keys.workers),
             Load("passthru-keys route rpm_limit", passthru_keys.port, "/small-rpm", None, passthru_keys.workers),
             Load("passthru-keys virtual key", passthru_keys.port, "/small-auth",
                  make_virtual_key(passthru_keys.port), passthru_keys.workers),
             Load("passthru-keys virtual key with limits", passthru_keys.port, "/small-auth",
                  make_virtual_key(passthru_keys.port, limits=True), passthru_keys.workers)]  # fmt: skip
    if passthru_pg is not None and pg_db is not None:
        pg_readings = functools.partial(pg_cpu, pg_db)
        loads += [Load("passthru-pg", passthru_pg.port, "/small", None, passthru_pg.workers, pg_readings),
                  Load("passthru-pg virtual key", passthru_pg.port, "/small-auth", make_virtual_key(passthru_pg.port),
                       passthru_pg.workers, pg_readings),
                  Load("passthru-pg virtual key with limits", passthru_pg.port, "/small-auth",
                       make_virtual_key(passthru_pg.port, limits=True), passthru_pg.workers, pg_readings)]  # fmt: skip
    if passthru_gevent is not None:
        loads += [Load("passthru-gevent", passthru_gevent.port, "/small", None, passthru_gevent.workers),
                  Load("passthru-gevent virtual key", passthru_gevent.port, "/small-auth",
                       make_virtual_key(passthru_gevent.port), passthru_gevent.workers),
                  Load("passthru-gevent virtual key with limits", passthru_gevent.port, "/small-auth",
                       make_virtual_key(passthru_gevent.port, limits=True), passthru_gevent.workers)]  # fmt: skip
    for load in loads:  # warm-up: pools filled, code paths hot
        wrk(tools["wrk"], load.port, load.path, 32, 2, 1, load.key)
    download(nginx.upstream_port, "/big.bin", plan.transfer_bytes)  # the file's pages into the page cache

    sse_query = f"?n={plan.sse_events}&gap={plan.sse_gap}"
    other_sessions = pg_other_sessions(pg_db) if pg_db else 0
    for rnd in range(plan.rounds):
        order = loads[rnd % len(loads) :] + loads[: rnd % len(loads)]  # rotate, so no one always goes first
        for load in order:
            r = wrk(tools["wrk"], load.port, load.path, 32, 2, plan.throughput_seconds, load.key, load.server_pids,
                    load.store_cpu)  # fmt: skip
            res.add(res.throughput, load.name, r)
            store = f" (+{r.store_cpu_us:.0f} µs in PostgreSQL)" if load.store_cpu else ""
            log(f"round {rnd + 1} throughput {load.name}: {r.rps:.0f} req/s, {r.cpu_us:.0f} µs CPU/request{store}, "
                f"errors {r.errors}")  # fmt: skip
        for load in order:
            r = wrk(tools["wrk"], load.port, load.path, 1, 1, plan.latency_seconds, load.key)
            res.add(res.latency, load.name, r)
            log(f"round {rnd + 1} latency {load.name}: p50 {r.p50_ms:.3f} ms p99 {r.p99_ms:.3f} ms, "
                f"errors {r.errors}")  # fmt: skip
        for i in range(plan.sse_streams):
            pair = [("direct", py.port, f"/sse{sse_query}"), ("passthru", passthru.port, f"/py/sse{sse_query}")]
            for name, port, target in pair if (i + rnd) % 2 == 0 else reversed(pair):
                first, gaps = sse_stream(port, target, plan.sse_events)
                res.add(res.sse_first, name, first)
                res.sse_gaps.setdefault(name, []).extend(gaps)
        log(f"round {rnd + 1} SSE first event: direct {median(res.sse_first['direct']) * 1000:.2f} ms, "
            f"passthru {median(res.sse_first['passthru']) * 1000:.2f} ms")  # fmt: skip
        size = plan.transfer_bytes
        for kind, move, table, direct, through in (("download", download, res.downloads, "/big.bin", "/big"),
                                                   ("upload", upload, res.uploads, "/sink", "/sink")):  # fmt: skip
            pair = [("direct", nginx.upstream_port, direct), ("passthru", passthru.port, through)]
            if kind == "download":
                warm(nginx.big_file)
            for name, port, path in pair if rnd % 2 == 0 else reversed(pair):
                t = measured(passthru, functools.partial(move, port, path, size))
                res.add(table, name, t)
                log(f"round {rnd + 1} {kind} {name}: {size / t.seconds / 1e6:.0f} MB/s, worker RSS "
                    f"+{t.rss_growth_kb / 1024:.1f} MB (peak +{t.peak_growth_kb / 1024:.1f} MB)")  # fmt: skip

    time.sleep(1.0)  # also lets the server's statistics of sessions catch up (flushed at most once a second)
    if pg_db:
        res.pg_other_sessions = pg_other_sessions(pg_db) - other_sessions
    after = [("passthru", passthru), ("ceiling", ceiling), ("passthru-keys", passthru_keys)]
    for name, server in after + ([("passthru-pg", passthru_pg)] if passthru_pg is not None else []):
        rss = [memory_kb(pid)[0] for pid in server.workers()]
        res.add(res.idle_rss_kb, f"{name} after run", max(rss, default=0))
        log(f"idle worker RSS after the run, {name}: {[r // 1024 for r in rss]} MB")
    CHILDREN.stop(ceiling.child)
    CHILDREN.stop(floor.child)
    CHILDREN.stop(passthru.child)
    CHILDREN.stop(passthru_keys.child)
    if passthru_pg is not None:
        CHILDREN.stop(passthru_pg.child)  # its database is dropped at exit (create_pg_database's atexit)
    if passthru_gevent is not None:
        CHILDREN.stop(passthru_gevent.child)

    # Many transfers through one worker: memory a worker never gives back grows with each, which the per-transfer
    # rows above cannot show (`git show b46f6ce:bench/RESULTS.md`, "Memory across many transfers").
    server = start_gunicorn("passthru-repeat", "wsgi:app", DEFAULT_CONF, config, tmp, "/small", WEB_CONCURRENCY="1")
    try:
        settled_workers(server)
        res.repeated_rss_kb = [max(memory_kb(pid)[0] for pid in server.workers())]
        for _ in range(plan.repeat_pairs):
            warm(nginx.big_file)
            download(server.port, "/big", plan.transfer_bytes)
            upload(server.port, "/sink", plan.transfer_bytes)
            time.sleep(0.2)  # the upstream release and the access line come after the last byte
            res.repeated_rss_kb.append(max(memory_kb(pid)[0] for pid in server.workers()))
    finally:
        CHILDREN.stop(server.child, grace=2.0)
    log(f"{plan.repeat_pairs} pairs through one worker: RSS {[kb // 1024 for kb in res.repeated_rss_kb]} MB")

    # Slow streams last: their upstream handlers sleep out a long gap. A fresh passthru per gunicorn config.
    gap = plan.slow_window + 30
    for case in cases:
        server = start_gunicorn("passthru-slow", "wsgi:app", case.conf, config, tmp, "/small")
        try:
            settled_workers(server)  # every worker booted: one early worker would take all the connections
            held = slow_streams(server.port, f"/py/sse?n=2&gap={gap}", case.streams, plan.slow_window)
        finally:
            CHILDREN.stop(server.child, grace=2.0)
        res.slow[case] = held
        log(f"slow streams ({case.conf}): {held[0]} of {case.streams} held at once, {held[1]} failed")

    # Slow heads: a fresh passthru of one worker per config, the 1,000 trickled heads beside normal requests.
    for case in cases:
        server = start_gunicorn("passthru-heads", "wsgi:app", case.conf, config, tmp, "/small", WEB_CONCURRENCY="1")
        try:
            settled_workers(server)
            heads = slow_heads(server.port, plan.slow_heads, plan.slow_heads_seconds)
        finally:
            CHILDREN.stop(server.child, grace=2.0)
        res.heads[case.conf] = heads
        log(f"slow heads ({case.conf}): slowest of {len(heads.seconds)} normal requests {max(heads.seconds):.3f} s, "
            f"{heads.failed} failed")  # fmt: skip

    signal.alarm(0)
    return report(res, plan, args, tools)


def check_answers(nginx: Nginx, ceiling: Gunicorn, floor: Gunicorn, passthru: Gunicorn, keys: Gunicorn,
                  py: PyUpstream, body: bytes) -> None:  # fmt: skip
    """Every configuration gives the same answer before anything is timed; auth refuses a missing key."""
    post = json.dumps({"model": "m", "query": "q", "documents": ["d"]}).encode()
    ctype = {"Content-Type": "application/json"}
    for name, port, path, headers in (
        ("nginx direct", nginx.upstream_port, "/small", ctype),
        ("nginx proxy", nginx.proxy_port, "/small", ctype),
        ("ceiling", ceiling.port, "/small", ctype),
        ("floor", floor.port, "/small", ctype),
        ("passthru", passthru.port, "/small", ctype),
        ("passthru-keys auth", keys.port, "/small-auth", {**ctype, "Authorization": f"Bearer {MASTER_KEY}"}),
    ):
        status, answer = request(port, "POST", path, post, headers)
        if status != 200 or answer != body:
            raise RuntimeError(f"{name} answered {status} {answer[:100]!r}, not the fixed body")
    for path in ("/usage-json", "/usage-bin"):
        status, answer = request(passthru.port, "POST", path, post, ctype)
        if status != 200 or answer != openai_answer():
            raise RuntimeError(f"passthru {path} answered {status} {answer[:100]!r}, not the OpenAI answer")
    status, _ = request(keys.port, "POST", "/small-auth", post, ctype)
    if status != 401:
        raise RuntimeError(f"passthru auth route without a key answered {status}, not 401")
    sse_stream(passthru.port, "/py/sse?n=2&gap=0.01", 2)


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark passthru against nginx and a bare Flask ceiling.")
    parser.add_argument("--quick", action="store_true", help="short durations and 256 MiB transfers (~3 minutes)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3)")
    parser.add_argument("--conf", default=DEFAULT_CONF, help="gunicorn config for passthru and the ceiling")
    parser.add_argument(
        "--slow-conf",
        action="append",
        default=[],
        metavar="CONF",
        help=f"also count slow streams under this gunicorn config ({GEVENT_CONF} runs anyway); repeatable",
    )
    parser.add_argument("--streams", type=int,
                        help="slow streams to open at once in every row (default 300, and 1000 for the gevent config; "
                        "at most 5000)")  # fmt: skip
    parser.add_argument("--no-install", action="store_true", help="do not apt-get install nginx-light / wrk")
    parser.add_argument("--out", type=Path, default=BENCH / "out" / "latest.md", help="where the report goes too")
    args = parser.parse_args()
    for name in (args.conf, *args.slow_conf):
        if not (ROOT / name).is_file():
            parser.error(f"{name}: no such gunicorn config (paths are relative to the repo root)")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    atexit.register(CHILDREN.stop_all)
    try:
        text = run(args)
    finally:
        CHILDREN.stop_all()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    log(f"report written to {args.out}")


if __name__ == "__main__":
    # The benchmark needs the project's venv (flask, requests, gunicorn); re-run under it when started otherwise.
    if VENV_PYTHON.exists() and Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), __file__, *sys.argv[1:]])
    main()
