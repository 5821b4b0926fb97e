"""What one run measures, and for how long: the full and the --quick plan, and the slow-stream row of each gunicorn
config (its streams and its target). The run follows it; the report reads it back.
"""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from procs import ROOT

DEFAULT_CONF = "deploy/gunicorn.conf.py"
GEVENT_CONF = "deploy/gunicorn.gevent.conf.py"
GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True)
class Plan:
    """Durations and sizes of one run; --quick shrinks them."""

    rounds: int
    throughput_seconds: int  # wrk -t2 -c32 per configuration per round
    latency_seconds: int  # wrk -t1 -c1 per configuration per round
    transfer_bytes: int  # one download and one upload per round, each way direct and through passthru
    sse_streams: int  # per configuration per round
    sse_events: int
    sse_gap: float
    startups: int  # fresh gunicorn starts timed, per app
    slow_streams: int  # SSE streams opened at once against a fresh passthru (gthread: --conf and --slow-conf)
    gevent_streams: int  # the same under deploy/gunicorn.gevent.conf.py, which is meant to hold thousands
    slow_window: float  # seconds allowed for them all to get their first event
    slow_heads: int  # connections trickling request heads a byte a second to one fresh worker, per config
    slow_heads_seconds: float  # how long normal requests are timed beside them
    repeat_pairs: int  # downloads + uploads of transfer_bytes, one after another, through a fresh one-worker passthru
    watchdog: int  # the whole run is cut after this many seconds


FULL = Plan(rounds=3, throughput_seconds=10, latency_seconds=5, transfer_bytes=GIB, sse_streams=10, sse_events=11,
            sse_gap=0.02, startups=3, slow_streams=300, gevent_streams=1000, slow_window=15.0, slow_heads=1000,
            slow_heads_seconds=12.0, repeat_pairs=8, watchdog=1260)  # fmt: skip
QUICK = Plan(rounds=3, throughput_seconds=3, latency_seconds=2, transfer_bytes=256 * MIB, sse_streams=4, sse_events=11,
             sse_gap=0.02, startups=2, slow_streams=300, gevent_streams=1000, slow_window=10.0, slow_heads=1000,
             slow_heads_seconds=8.0, repeat_pairs=4, watchdog=540)  # fmt: skip


@dataclass(frozen=True)
class SlowCase:
    """One slow-streams row: a fresh passthru under `conf`, `streams` SSE streams opened at once, `target` to hold."""

    conf: str
    streams: int
    target: int


def same_file(a: str, b: str) -> bool:
    return (ROOT / a).resolve() == (ROOT / b).resolve()


def gevent_installed() -> bool:
    return importlib.util.find_spec("gevent") is not None


def slow_cases(plan: Plan, args: argparse.Namespace) -> list[SlowCase]:
    """--conf (300 streams, 200 to hold), the gevent config (1,000 and 1,000; the issue's targets), each --slow-conf.

    A config named twice runs once. The gevent row needs gevent (requirements-gevent.txt): without it the row is
    left out and the report says so, rather than the run failing at its very end.
    """
    cases: dict[Path, SlowCase] = {}
    for conf in (args.conf, GEVENT_CONF, *args.slow_conf):
        if same_file(conf, GEVENT_CONF):
            if gevent_installed():
                cases.setdefault((ROOT / conf).resolve(), SlowCase(conf, plan.gevent_streams, 1000))
        else:
            cases.setdefault((ROOT / conf).resolve(), SlowCase(conf, plan.slow_streams, 200))
    return list(cases.values())
