"""The routes page: each configured route as the config says it (path, methods, auth, limits, its targets' names,
never their URLs or headers), with live figures from this host's metrics: calls a minute, error rates, calls in
flight."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from flask import Blueprint, render_template

from passthru.metrics import registry_of
from passthru.ui import Admin

KEEP = 180.0  # seconds of samples kept; the rates are over the oldest kept sample
EVERY = 2.0  # a sample is kept at most this often (any page view takes one)
REFRESH = 15  # the page reloads itself every so many seconds (a meta refresh: no script)


@dataclass(frozen=True)
class Counts:
    """A route's answers so far on this host (every worker's), by kind, and its calls being relayed now."""

    calls: float = 0.0
    client_errors: float = 0.0  # 4xx: refused keys, limits, the upstream's own 4xx
    server_errors: float = 0.0  # 5xx: the upstream's, and passthru's 502 and 504
    in_flight: float = 0.0


@dataclass(frozen=True)
class Target:
    """One upstream of a route, as the page shows it: its name (the URL's host, never the URL), and its state."""

    name: str
    state: str | None = None  # None: a route with one target has none to show


@dataclass(frozen=True)
class Figures:
    counts: Counts
    per_minute: float | None  # calls a minute over `window` seconds; None before a second sample
    client_rate: float | None  # shares of the answers in that window (since the start without one)
    server_rate: float | None
    window: float | None


def add_rules(blueprint: Blueprint, admin: Admin, metrics_dir: str | None) -> None:
    sampler = Sampler(metrics_dir)

    def routes() -> str:
        """GET /ui/routes."""
        now, current, before = sampler.take()
        states = admin.cooling()
        shown = [(endpoint, targets_of(states.get(endpoint.path, ())), figures(endpoint.path, current, before, now))
                 for endpoint in admin.settings.endpoints]  # fmt: skip
        return render_template("ui/routes.html", routes=shown, refresh=REFRESH)

    blueprint.add_url_rule("/routes", "routes", routes, methods=["GET"])


def targets_of(states: Sequence[tuple[str, float]]) -> tuple[Target, ...]:
    """The route's targets by name (never a URL), with their states in the worker that answers, as readiness gives
    them: a route with one target has no state worth a word."""
    if len(states) == 1:
        return (Target(states[0][0]),)
    return tuple(Target(name, f"cooling down, {math.ceil(left)} s left" if left else "ok") for name, left in states)


def figures(path: str, current: dict[str, Counts], before: tuple[float, dict[str, Counts]] | None,
            now: float) -> Figures:  # fmt: skip
    """The route's rates over the window since an earlier sample, or its shares since the start without one."""
    counts = current.get(path, Counts())
    if before is None:
        return Figures(counts, None, _share(counts.client_errors, counts.calls),
                       _share(counts.server_errors, counts.calls), None)  # fmt: skip
    then, earlier = before
    old = earlier.get(path, Counts())
    calls = counts.calls - old.calls
    window = now - then
    return Figures(counts, calls * 60 / window, _share(counts.client_errors - old.client_errors, calls),
                   _share(counts.server_errors - old.server_errors, calls), window)  # fmt: skip


def _share(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None


class Sampler:
    """This host's request counters, read from the metrics at each view of the page (all workers' files under
    gunicorn), and samples of them kept for KEEP seconds in this worker: rates need two readings."""

    def __init__(self, metrics_dir: str | None) -> None:
        self.registry = registry_of(metrics_dir)
        self._lock = threading.Lock()
        self._samples: deque[tuple[float, dict[str, Counts]]] = deque()

    def read(self) -> dict[str, Counts]:
        """Each route's counts now (routes keyed by their path, as the metrics label them)."""
        found: dict[str, dict[str, float]] = {}
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.name == "passthru_requests_total":
                    kind = {"4": "client_errors", "5": "server_errors"}.get(sample.labels.get("status", "")[:1])
                    route = found.setdefault(sample.labels.get("route", ""), {})
                    route["calls"] = route.get("calls", 0.0) + sample.value
                    if kind:
                        route[kind] = route.get(kind, 0.0) + sample.value
                elif sample.name == "passthru_streams_in_flight":
                    route = found.setdefault(sample.labels.get("route", ""), {})
                    route["in_flight"] = route.get("in_flight", 0.0) + sample.value
        return {route: Counts(**values) for route, values in found.items()}

    def take(self) -> tuple[float, dict[str, Counts], tuple[float, dict[str, Counts]] | None]:
        """(now, the counts now, the oldest sample kept that is at least EVERY seconds old, or None)."""
        now, current = time.monotonic(), self.read()
        with self._lock:
            while self._samples and self._samples[0][0] < now - KEEP:
                self._samples.popleft()
            before = self._samples[0] if self._samples and self._samples[0][0] <= now - EVERY else None
            if not self._samples or self._samples[-1][0] <= now - EVERY:
                self._samples.append((now, current))
        return now, current, before
