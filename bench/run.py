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
import datetime
import functools
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# bench/ is not a package: run as a script, run.py has its directory on sys.path. Like this file, its modules import
# only the standard library at the top, so that they load under any Python before run.py re-runs itself in the venv.
from load import (
    SlowHeads,
    Transfer,
    WrkResult,
    download,
    measured,
    slow_heads,
    slow_streams,
    sse_stream,
    upload,
    warm,
    wrk,
)
from plan import (
    DEFAULT_CONF,
    FULL,
    GEVENT_CONF,
    GIB,
    MIB,
    QUICK,
    Plan,
    SlowCase,
    gevent_installed,
    same_file,
    slow_cases,
)
from procs import (
    BENCH,
    CHILDREN,
    ROOT,
    children_of,
    memory_kb,
    raise_fd_limit,
    request,
)
from servers import (
    MASTER_KEY,
    PG_SERVER,
    Gunicorn,
    Nginx,
    PyUpstream,
    create_pg_database,
    ensure_tools,
    make_virtual_key,
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


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


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


@dataclass
class Results:
    """Every raw sample, by figure and configuration; the report reduces them to medians."""

    throughput: dict[str, list[WrkResult]] = field(default_factory=dict)
    latency: dict[str, list[WrkResult]] = field(default_factory=dict)
    sse_first: dict[str, list[float]] = field(default_factory=dict)
    sse_gaps: dict[str, list[float]] = field(default_factory=dict)
    downloads: dict[str, list[Transfer]] = field(default_factory=dict)
    uploads: dict[str, list[Transfer]] = field(default_factory=dict)
    startup: dict[str, list[float]] = field(default_factory=dict)
    idle_rss_kb: dict[str, list[int]] = field(default_factory=dict)
    slow: dict[SlowCase, tuple[int, int, float]] = field(default_factory=dict)
    heads: dict[str, SlowHeads] = field(default_factory=dict)  # by gunicorn config
    repeated_rss_kb: list[int] = field(default_factory=list)  # one worker: settled, then after each pair
    workers: int = 0
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    pg_skipped: str = ""  # why the PostgreSQL rows were not run, when they were not
    pg_other_sessions: int = 0  # sessions other databases on that server opened during the rounds
    fd_limit: str = ""  # what raise_fd_limit did

    def add(self, table: dict[str, list[Any]], name: str, value: Any) -> None:
        table.setdefault(name, []).append(value)


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
    config = passthru_config(tmp, nginx, py)
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
    passthru_keys = start_gunicorn("passthru-keys", "wsgi:app", conf, config, tmp, "/small",
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
        passthru_pg = start_gunicorn("passthru-pg", "wsgi:app", conf, config, tmp, "/small", pg_db.url)
        settled_workers(passthru_pg)
        log(f"passthru-pg: keys in PostgreSQL database {pg_db.name}")

    # The same passthru under the gevent config, for its latency and key-path rows (only with gevent installed).
    passthru_gevent = None
    if gevent_installed():
        passthru_gevent = start_gunicorn("passthru-gevent", "wsgi:app", GEVENT_CONF, config, tmp, "/small",
                                         f"sqlite:///{tmp / 'keys-gevent.db'}")  # fmt: skip
        settled_workers(passthru_gevent)

    check_answers(nginx, ceiling, passthru, py, BODY)
    nginx_workers = nginx.child.proc.pid
    loads = [Load("nginx direct", nginx.upstream_port, "/small", None, lambda: children_of(nginx_workers)),
             Load("nginx proxy", nginx.proxy_port, "/small", None, lambda: children_of(nginx_workers)),
             Load("ceiling", ceiling.port, "/small", None, ceiling.workers),
             Load("passthru", passthru.port, "/small", None, passthru.workers),
             Load("passthru auth", passthru.port, "/small-auth", MASTER_KEY, passthru.workers),
             Load("passthru-keys", passthru_keys.port, "/small", None, passthru_keys.workers),
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


def check_answers(nginx: Nginx, ceiling: Gunicorn, passthru: Gunicorn, py: PyUpstream, body: bytes) -> None:
    """Every configuration gives the same answer before anything is timed; auth refuses a missing key."""
    post = json.dumps({"model": "m", "query": "q", "documents": ["d"]}).encode()
    ctype = {"Content-Type": "application/json"}
    for name, port, path, headers in (
        ("nginx direct", nginx.upstream_port, "/small", ctype),
        ("nginx proxy", nginx.proxy_port, "/small", ctype),
        ("ceiling", ceiling.port, "/small", ctype),
        ("passthru", passthru.port, "/small", ctype),
        ("passthru auth", passthru.port, "/small-auth", {**ctype, "Authorization": f"Bearer {MASTER_KEY}"}),
    ):
        status, answer = request(port, "POST", path, post, headers)
        if status != 200 or answer != body:
            raise RuntimeError(f"{name} answered {status} {answer[:100]!r}, not the fixed body")
    status, _ = request(passthru.port, "POST", "/small-auth", post, ctype)
    if status != 401:
        raise RuntimeError(f"passthru auth route without a key answered {status}, not 401")
    sse_stream(passthru.port, "/py/sse?n=2&gap=0.01", 2)


# ---------------------------------------------------------------------------------------------------------------
# The report


def verdict(ok: bool) -> str:
    return "PASS" if ok else "SHORT"


def machine(args: argparse.Namespace, tools: dict[str, str], res: Results) -> list[str]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor() or "?")  # fmt: skip
    mem = next((int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), 0)  # fmt: skip
    nginx_v = subprocess.run([tools["nginx"], "-v"], capture_output=True, text=True).stderr.strip()
    wrk_v = subprocess.run([tools["wrk"], "-v"], capture_output=True, text=True).stdout.splitlines()[:1]
    # Read-only git: --no-optional-locks keeps even `diff` from refreshing the index file.
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "--no-optional-locks", "diff", "--quiet", "HEAD", "--"], cwd=ROOT,
                           capture_output=True).returncode == 1  # fmt: skip
    versions = {}
    for module in ("flask", "werkzeug", "requests", "urllib3", "gunicorn"):
        try:
            from importlib.metadata import version

            versions[module] = version(module)
        except Exception:
            versions[module] = "?"
    argv = " ".join(shlex.quote(a) for a in sys.argv[1:])
    return [
        f"- date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `.venv/bin/python bench/run.py{' ' + argv if argv else ''}`",
        f"- machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu}, "
        f"{mem / 1024 / 1024:.0f} GiB RAM, Linux {platform.release()}; load average (1 min) "
        f"{res.load_before[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end (others' work shares the CPUs)",
        f"- software: Python {platform.python_version()}, "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f", {nginx_v}, {(wrk_v or ['wrk ?'])[0].split(' Copyright')[0]}",
        f"- passthru: commit {commit.stdout.strip() or '?'}{' plus uncommitted changes' if dirty else ''}; "
        f"gunicorn config `{args.conf}`",
    ]


def report(res: Results, plan: Plan, args: argparse.Namespace, tools: dict[str, str]) -> str:
    tp = {name: median([r.rps for r in rs]) for name, rs in res.throughput.items()}
    lat50 = {name: median([r.p50_ms for r in rs]) for name, rs in res.latency.items()}
    lat99 = {name: median([r.p99_ms for r in rs]) for name, rs in res.latency.items()}
    cpu = {name: median([r.cpu_us + r.store_cpu_us for r in rs]) for name, rs in res.throughput.items()}
    store_cpu = {name: median([r.store_cpu_us for r in rs]) for name, rs in res.throughput.items()}
    errors = {name: sum(r.errors for r in rs) for name, rs in res.throughput.items()}
    for name, rs in res.latency.items():
        errors[name] = errors.get(name, 0) + sum(r.errors for r in rs)
    sse = {name: median(v) * 1000 for name, v in res.sse_first.items()}
    gap_nominal = plan.sse_gap * 1000
    gap50 = {name: median(v) * 1000 for name, v in res.sse_gaps.items()}
    gap_dev = {name: percentile([abs(g * 1000 - gap_nominal) for g in v], 99) for name, v in res.sse_gaps.items()}
    size = plan.transfer_bytes
    transfers = (("download", res.downloads), ("upload", res.uploads))
    rate = {f"{kind} {name}": median([size / t.seconds / 1e6 for t in ts])
            for kind, table in transfers for name, ts in table.items()}  # fmt: skip
    growth = {kind: max(t.rss_growth_kb for t in table["passthru"]) / 1024
              for kind, table in (("download", res.downloads), ("upload", res.uploads))}  # fmt: skip
    peak = {kind: max(t.peak_growth_kb for t in table["passthru"]) / 1024
            for kind, table in (("download", res.downloads), ("upload", res.uploads))}  # fmt: skip
    idle = {name: max(v) / 1024 for name, v in res.idle_rss_kb.items()}
    start = {name: median(v) for name, v in res.startup.items()}
    size_label = f"{size // GIB} GiB" if size >= GIB else f"{size // MIB} MiB"

    added50 = lat50["passthru"] - lat50["nginx direct"]
    rows = [
        ("small POST throughput, passthru / ceiling (32 conns)", f"{tp['passthru'] / tp['ceiling']:.3f}",
         f"{tp['passthru']:.0f} vs {tp['ceiling']:.0f} req/s", "≥ 0.35",
         verdict(tp["passthru"] >= 0.35 * tp["ceiling"])),
        ("small POST throughput, passthru / nginx proxy", f"{tp['passthru'] / tp['nginx proxy']:.2f}",
         f"{tp['passthru']:.0f} vs {tp['nginx proxy']:.0f} req/s", "—", "info"),
        ("server CPU per request at 32 conns, ceiling / passthru", f"{cpu['ceiling'] / cpu['passthru']:.3f}",
         f"{cpu['passthru']:.0f} vs {cpu['ceiling']:.0f} µs", "—", "info"),
        ("latency added at 1 conn, p50 (passthru − nginx direct)", f"{added50:.3f} ms",
         f"{lat50['passthru']:.3f} vs {lat50['nginx direct']:.3f} ms", "≤ 0.6 ms", verdict(added50 <= 0.6)),
        ("latency added at 1 conn, p99 (passthru − nginx direct)",
         f"{lat99['passthru'] - lat99['nginx direct']:.3f} ms",
         f"{lat99['passthru']:.3f} vs {lat99['nginx direct']:.3f} ms", "—", "info"),
        ("latency added at 1 conn, p50, passthru − ceiling", f"{lat50['passthru'] - lat50['ceiling']:.3f} ms",
         f"ceiling adds {lat50['ceiling'] - lat50['nginx direct']:.3f} ms, nginx proxy "
         f"{lat50['nginx proxy'] - lat50['nginx direct']:.3f} ms", "—", "info"),
        ("SSE first event, later than direct (median)", f"{sse['passthru'] - sse['direct']:.2f} ms",
         f"{sse['passthru']:.2f} vs {sse['direct']:.2f} ms", "≤ 3 ms", verdict(sse["passthru"] - sse["direct"] <= 3)),
        (f"SSE spacing (nominal {gap_nominal:.0f} ms): median gap, p99 |gap − nominal|",
         f"{gap50['passthru']:.2f} ms, {gap_dev['passthru']:.2f} ms",
         f"direct {gap50['direct']:.2f} ms, {gap_dev['direct']:.2f} ms", "—", "info"),
        (f"download {size_label} through passthru", f"{rate['download passthru'] / 1000:.2f} GB/s",
         f"direct {rate['download direct'] / 1000:.2f} GB/s", "≥ 1 GB/s", verdict(rate["download passthru"] >= 1000)),
        (f"upload {size_label} through passthru", f"{rate['upload passthru']:.0f} MB/s",
         f"direct {rate['upload direct']:.0f} MB/s", "≥ 300 MB/s", verdict(rate["upload passthru"] >= 300)),
        (f"worker RSS growth, {size_label} download", f"{growth['download']:.1f} MB",
         f"peak +{peak['download']:.1f} MB", "≤ 10 MB", verdict(growth["download"] <= 10)),
        (f"worker RSS growth, {size_label} upload", f"{growth['upload']:.1f} MB", f"peak +{peak['upload']:.1f} MB",
         "≤ 10 MB", verdict(growth["upload"] <= 10)),
        (f"worker RSS growth, {plan.repeat_pairs} × {size_label} down + up through one fresh worker",
         f"{(res.repeated_rss_kb[-1] - res.repeated_rss_kb[0]) / 1024:.1f} MB",
         f"{res.repeated_rss_kb[0] / 1024:.1f} MB → " + ", ".join(f"{kb / 1024:.1f}" for kb in res.repeated_rss_kb[1:])
         + " MB", "—", "info"),
        ("idle RSS per worker, fresh (largest worker)", f"{idle['passthru fresh']:.1f} MB",
         f"ceiling {idle['ceiling fresh']:.1f} MB", "≤ 40 MB", verdict(idle["passthru fresh"] <= 40)),
        ("idle RSS per worker, after the run (largest worker)", f"{idle['passthru after run']:.1f} MB",
         f"ceiling {idle['ceiling after run']:.1f} MB", "≤ 40 MB", verdict(idle["passthru after run"] <= 40)),
        ("idle RSS per worker after the run, serving virtual keys (largest worker)",
         f"{idle['passthru-keys after run']:.1f} MB",
         "PostgreSQL " + (f"{idle['passthru-pg after run']:.1f} MB" if "passthru-pg after run" in idle else "not run")
         + "; the key store's driver, connections and caches", "—", "info"),
        ("start-up: spawn to first forwarded answer (median)", f"{start['passthru']:.2f} s",
         f"ceiling {start['ceiling']:.2f} s", "≤ 1 s", verdict(start["passthru"] <= 1.0)),
    ]  # fmt: skip
    for case, (held, failed, _) in res.slow.items():
        rows.append((f"slow SSE streams held at once, `{case.conf}` ({case.streams} opened)", f"{held}",
                     f"{failed} failed; {res.workers} workers", f"≥ {case.target}",
                     verdict(held >= case.target)))  # fmt: skip
    if not any(same_file(case.conf, GEVENT_CONF) for case in res.slow):
        rows.append((f"slow SSE streams held at once, `{GEVENT_CONF}`", "—",
                     "not run: gevent is not installed (pip install -r requirements-gevent.txt)", "≥ 1000",
                     "SKIPPED"))  # fmt: skip
    for conf, heads in res.heads.items():
        worst, typical = max(heads.seconds), median(heads.seconds)
        rows.append((f"slow heads: slowest normal request beside {plan.slow_heads} trickled heads, one worker, "
                     f"`{conf}`", f"{worst * 1000:.0f} ms",
                     f"{len(heads.seconds)} requests, {heads.failed} failed; median {typical * 1000:.0f} ms",
                     "≤ 1 s", verdict(heads.failed == 0 and worst <= 1.0)))  # fmt: skip
    rows.append(("`auth: true` (master key) / no auth, throughput", f"{tp['passthru auth'] / tp['passthru']:.2f}",
                 f"{tp['passthru auth']:.0f} vs {tp['passthru']:.0f} req/s; CPU {cpu['passthru auth']:.0f} vs "
                 f"{cpu['passthru']:.0f} µs/request", "—", "info"))  # fmt: skip
    for kind in ("", " with limits"):
        rows += virtual_key_rows("SQLite", "passthru-keys", kind, tp, cpu, store_cpu, lat50)
    if res.pg_skipped:
        rows.append(("`auth: true` (virtual key, PostgreSQL): CPU per request over no auth", "—",
                     f"not run: {res.pg_skipped}", "< +25 %", "SKIPPED"))  # fmt: skip
    else:
        others = res.pg_other_sessions
        caveat = f"; {others} sessions in other databases meanwhile, whose CPU may be in it" if others else ""
        for kind in ("", " with limits"):
            rows += virtual_key_rows("PostgreSQL", "passthru-pg", kind, tp, cpu, store_cpu, lat50, caveat)
    if "passthru-gevent" in tp:  # the same passthru under GEVENT_CONF: what the worker class changes
        added = lat50["passthru-gevent"] - lat50["nginx direct"]
        rows.append((f"latency added at 1 conn, p50, under `{GEVENT_CONF}`", f"{added:.3f} ms",
                     f"{lat50['passthru-gevent']:.3f} vs {lat50['nginx direct']:.3f} ms; throughput "
                     f"{tp['passthru-gevent']:.0f} req/s", "—", "info"))  # fmt: skip
        for kind in ("", " with limits"):
            rows += [
                (f"{row[0]}, gevent", *row[1:4], "info")
                for row in virtual_key_rows("SQLite", "passthru-gevent", kind, tp, cpu, store_cpu, lat50)
            ]

    out = ["# passthru benchmark", "", *machine(args, tools, res), ""]
    out += [f"{plan.rounds} interleaved rounds, medians; {res.workers} gunicorn workers per app "
            f"(WEB_CONCURRENCY={os.environ.get('WEB_CONCURRENCY', 'unset')}).", ""]  # fmt: skip
    out += ["| figure | passthru | reference | target | result |", "| --- | --- | --- | --- | --- |"]
    out += [f"| {' | '.join(row)} |" for row in rows]
    out += ["", f"## Throughput and latency (wrk, bench/post.lua: {len(post_body())}-byte JSON POST, "
            f"{len(_body())}-byte JSON answer)", "",
            "| configuration | req/s at 32 conns (median; rounds) | server CPU per request | p50 at 1 conn | "
            "p99 at 1 conn | errors |", "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name in res.throughput:
        rounds = ", ".join(f"{r.rps:.0f}" for r in res.throughput[name])
        store = f" ({store_cpu[name]:.0f} in PostgreSQL)" if name.startswith("passthru-pg") else ""
        out.append(f"| {name} | {tp[name]:.0f} ({rounds}) | {cpu[name]:.0f} µs{store} | {lat50[name]:.3f} ms | "
                   f"{lat99[name]:.3f} ms | {errors[name]} |")  # fmt: skip
    out += ["", f"Throughput: `wrk -t2 -c32 -d{plan.throughput_seconds}s`; latency: `wrk -t1 -c1 "
            f"-d{plan.latency_seconds}s` (one request at a time on one keep-alive connection). Server CPU: user + "
            "system time of the serving processes during the 32-connection run over the requests served "
            "(nginx's workers serve both the upstream and the proxy, so `nginx proxy` counts both; "
            "`passthru-keys` is a second passthru that serves the virtual keys from SQLite; `passthru-pg` a third, "
            "whose key store is PostgreSQL, and its CPU counts that server's work for it: the backends connected to "
            "its database and the ones that ended, as SQLite's work is counted in the workers; `passthru-gevent` "
            "is a fourth, under the gevent config). The virtual-key route has a "
            "cost_per_request. `virtual key` is a key without limits (LiteLLM's "
            "default): admitted from the worker's memory of it, its cost charged with its spend log entry. `virtual "
            "key with limits` has an rpm_limit and a max_budget it never reaches: every call is admitted, counted "
            "and charged by the store, in leases of up to 64 calls (leases.py; a key near its limits is decided "
            "call by call).",
            ""]  # fmt: skip
    out += [f"## SSE ({plan.sse_events} events, {gap_nominal:.0f} ms apart, tests/rig/upstream.py in its own process; "
            f"new connection per stream)", "", "| path | first event p50 | first event max | gap p50 | gap p99 |",
            "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for name in res.sse_first:
        firsts = [v * 1000 for v in res.sse_first[name]]
        gaps = [v * 1000 for v in res.sse_gaps[name]]
        out.append(f"| {name} | {median(firsts):.2f} ms | {max(firsts):.2f} ms | {median(gaps):.2f} ms | "
                   f"{percentile(gaps, 99):.2f} ms |")  # fmt: skip
    out += ["", f"## Transfers ({size_label} each way; nginx serves a sparse file and discards uploads)", "",
            "| transfer | MB/s per round | worker RSS growth per round | peak (VmHWM) growth |",
            "| --- | --- | --- | --- |"]  # fmt: skip
    for kind, table in (("download", res.downloads), ("upload", res.uploads)):
        for name, ts in table.items():
            rates = ", ".join(f"{size / t.seconds / 1e6:.0f}" for t in ts)
            grow = ", ".join(f"{t.rss_growth_kb / 1024:.1f}" for t in ts) if name == "passthru" else "—"
            pk = ", ".join(f"{t.peak_growth_kb / 1024:.1f}" for t in ts) if name == "passthru" else "—"
            out.append(f"| {kind} {name} | {rates} | {grow} MB | {pk} MB |" if name == "passthru"
                       else f"| {kind} {name} | {rates} | — | — |")  # fmt: skip
    out += ["", "## Start-up and memory", "", "| app | spawn → first answer per start | largest idle worker RSS |",
            "| --- | --- | --- |"]  # fmt: skip
    for name in res.startup:
        starts = ", ".join(f"{s:.2f} s" for s in res.startup[name])
        out.append(f"| {name} | {starts} | fresh {idle[name + ' fresh']:.1f} MB, after run "
                   f"{idle[name + ' after run']:.1f} MB |")  # fmt: skip
    out += [
        "",
        "## Slow streams",
        "",
        f"A fresh passthru per gunicorn config; SSE streams through it whose second event is due "
        f"{plan.slow_window + 30:.0f} s later, all opened at once. Held: answered 200 with the first event, and "
        f"still open when counting stopped ({plan.slow_window:.0f} s at most), so served at the same time.",
        "",
    ]
    for case, (h, f, took) in res.slow.items():
        out.append(f"- `{case.conf}`: {h} of {case.streams} held at once ({f} failed; the last one held after "
                   f"{took:.1f} s).")  # fmt: skip
    out.append(f"- {res.fd_limit}; other gunicorn configs: `--slow-conf deploy/<file>.py` (repeatable).")
    out += [
        "",
        "## Slow heads",
        "",
        f"A fresh passthru of one worker per gunicorn config; {plan.slow_heads} connections each trickling a request "
        "head that never ends, a byte a second, each opened again as soon as passthru drops it (tests/rig/trickle.py), "
        f"while a small POST on a fresh connection goes every 0.5 s for {plan.slow_heads_seconds:.0f} s.",
        "",
    ]
    for conf, heads in res.heads.items():
        dropped = (f"{len(heads.dropped)} heads dropped, each after {heads.dropped[0]:.1f}–{heads.dropped[-1]:.1f} s"
                   if heads.dropped else "no head dropped")  # fmt: skip
        out.append(f"- `{conf}`: normal requests {', '.join(f'{t * 1000:.0f}' for t in heads.seconds)} ms "
                   f"({heads.failed} failed); {heads.held} trickling when timing began; {dropped}.")  # fmt: skip
    return "\n".join(out) + "\n"


def virtual_key_rows(store: str, base: str, kind: str, tp: dict[str, float], cpu: dict[str, float],
                     store_cpu: dict[str, float], lat50: dict[str, float],
                     caveat: str = "") -> list[tuple[str, str, str, str, str]]:  # fmt: skip
    """A virtual key (`kind`: "" or " with limits") against the no-auth route of the same passthru instance:
    throughput, CPU (the issue's 25 % budget) and p50 latency added. `caveat` ends the CPU row's reference."""
    keyed = f"{base} virtual key{kind}"
    store = f"{store}{kind.replace(' with', ',')}"
    over = cpu[keyed] / cpu[base] - 1
    split = (f" (PostgreSQL {store_cpu[keyed]:.0f} vs {store_cpu[base]:.0f} µs of it)"
             if store_cpu[keyed] or store_cpu[base] else "")  # fmt: skip
    return [
        (f"virtual key ({store}) / no auth, throughput", f"{tp[keyed] / tp[base]:.2f}",
         f"{tp[keyed]:.0f} vs {tp[base]:.0f} req/s", "—", "info"),
        (f"`auth: true` (virtual key, {store}): CPU per request over no auth", f"{over * 100:+.0f} %",
         f"{cpu[keyed]:.0f} vs {cpu[base]:.0f} µs/request{split}{caveat}", "< +25 %", verdict(over < 0.25)),
        (f"virtual key ({store}): p50 latency added at 1 conn over no auth", f"{lat50[keyed] - lat50[base]:.3f} ms",
         f"{lat50[keyed]:.3f} vs {lat50[base]:.3f} ms", "—", "info"),
    ]  # fmt: skip


def post_body() -> bytes:
    text = (BENCH / "post.lua").read_text()
    start = text.index("wrk.body = ")
    chunk = text[start : text.index("\n\n", start)]
    return "".join(part.split("'")[1] for part in chunk.split("\n")).encode()


def _body() -> bytes:
    from ceiling import BODY

    return BODY


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
