"""The markdown report: a run's raw samples (Results) reduced to medians, each figure against its target, the machine
and software it ran on, and the tables of rounds behind the figures.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from load import SlowHeads, Transfer, WrkResult
from plan import GEVENT_CONF, GIB, MIB, Plan, SlowCase, same_file
from procs import BENCH, ROOT
from servers import openai_answer


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


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
         f"{tp['passthru']:.0f} vs {tp['ceiling']:.0f} req/s", "≥ 0.55",
         verdict(tp["passthru"] >= 0.55 * tp["ceiling"])),
        ("small POST throughput, passthru / nginx proxy", f"{tp['passthru'] / tp['nginx proxy']:.2f}",
         f"{tp['passthru']:.0f} vs {tp['nginx proxy']:.0f} req/s", "—", "info"),
        ("small POST throughput, floor / ceiling (Flask + urllib3's pool alone, bench/floor.py)",
         f"{tp['floor'] / tp['ceiling']:.3f}", f"{tp['floor']:.0f} vs {tp['ceiling']:.0f} req/s; CPU "
         f"{cpu['floor']:.0f} vs {cpu['ceiling']:.0f} µs/request", "—", "info"),
        ("small POST throughput, passthru / floor", f"{tp['passthru'] / tp['floor']:.3f}",
         f"{tp['passthru']:.0f} vs {tp['floor']:.0f} req/s; CPU {cpu['passthru']:.0f} vs {cpu['floor']:.0f} "
         "µs/request", "—", "info"),
        ("two healthy targets: CPU per request over one target",
         f"{(cpu['passthru two targets'] / cpu['passthru'] - 1) * 100:+.1f} %",
         f"{cpu['passthru two targets']:.0f} vs {cpu['passthru']:.0f} µs/request", "≤ +5 %",
         verdict(cpu["passthru two targets"] <= 1.05 * cpu["passthru"])),
        ("failover past a first target that refuses: latency added at 1 conn over one target, p50 / p99",
         f"{lat50['passthru failover'] - lat50['passthru']:.3f} / "
         f"{lat99['passthru failover'] - lat99['passthru']:.3f} ms",
         f"p50 {lat50['passthru failover']:.3f} vs {lat50['passthru']:.3f} ms, p99 {lat99['passthru failover']:.3f} vs "
         f"{lat99['passthru']:.3f} ms; a refused connect on loopback", "one connect attempt", "info"),
        (f"usage read from a {len(openai_answer())}-byte OpenAI JSON answer: CPU per request over the same bytes "
         "unread", f"{(cpu['passthru usage json'] / cpu['passthru usage bin'] - 1) * 100:+.1f} %",
         f"{cpu['passthru usage json']:.0f} vs {cpu['passthru usage bin']:.0f} µs/request", "≤ +5 %",
         verdict(cpu["passthru usage json"] <= 1.05 * cpu["passthru usage bin"])),
        ("server CPU per request at 32 conns, ceiling / passthru", f"{cpu['ceiling'] / cpu['passthru']:.3f}",
         f"{cpu['passthru']:.0f} vs {cpu['ceiling']:.0f} µs", "—", "info"),
        ("latency added at 1 conn, p50 (passthru − nginx direct)", f"{added50:.3f} ms",
         f"{lat50['passthru']:.3f} vs {lat50['nginx direct']:.3f} ms", "≤ 0.5 ms", verdict(added50 <= 0.5)),
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
    rows.append(("`auth: true` (master key) / no auth, throughput",
                 f"{tp['passthru-keys auth'] / tp['passthru-keys']:.2f}",
                 f"{tp['passthru-keys auth']:.0f} vs {tp['passthru-keys']:.0f} req/s; CPU "
                 f"{cpu['passthru-keys auth']:.0f} vs {cpu['passthru-keys']:.0f} µs/request", "—", "info"))  # fmt: skip
    logged = cpu["passthru-keys"] / cpu["passthru"] - 1
    rows.append(("every call in the spend log (SQLite): CPU per request over no key store", f"{logged * 100:+.0f} %",
                 f"{cpu['passthru-keys']:.0f} vs {cpu['passthru']:.0f} µs/request; throughput "
                 f"{tp['passthru-keys']:.0f} vs {tp['passthru']:.0f} req/s", "—", "info"))  # fmt: skip
    for kind in ("", " with limits"):
        rows += virtual_key_rows("SQLite", "passthru-keys", kind, tp, cpu, store_cpu, lat50)
    route_rpm = cpu["passthru-keys route rpm_limit"] / cpu["passthru-keys"] - 1
    key_limits = cpu["passthru-keys virtual key with limits"] / cpu["passthru-keys"] - 1
    rows.append(("route `rpm_limit` (SQLite): CPU per request over no limit", f"{route_rpm * 100:+.0f} %",
                 f"{cpu['passthru-keys route rpm_limit']:.0f} vs {cpu['passthru-keys']:.0f} µs/request; a virtual key "
                 f"with limits {key_limits * 100:+.0f} %", "≤ the key's",
                 verdict(route_rpm <= key_limits)))  # fmt: skip
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
