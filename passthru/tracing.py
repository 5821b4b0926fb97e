"""W3C Trace Context (level 1) on every call, with no dependency: the caller's `traceparent` continued or a new trace
started, a span id of passthru's own for the request and one for each attempt upstream, and the headers that carry
them. Whether a trace is recorded and exported is otel.py's business, and only when export is on (otel_settings.py).
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from urllib3 import HTTPConnectionPool

# version-traceid-parentid-flags in lower-case hex (§3.2.2). A version after 00 may carry more fields behind a dash,
# which a reader of version 00 skips (§3.2.4); version ff is invalid, and so are ids of zeros only.
TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.DOTALL)
INVALID_TRACE_ID = "0" * 32
INVALID_SPAN_ID = "0" * 16
SAMPLED = 0x01  # the only flag of level 1; the others are sent as 0 (§3.2.2.5.2)
TRACE_ID_BITS = 64  # the trace id's low 64 bits decide a ratio sampler, as the OpenTelemetry SDK decides it


def parse_traceparent(value: str | None) -> tuple[str, str, bool] | None:
    """(trace id, parent span id, sampled) of a valid `traceparent`; None for an absent or invalid one."""
    if not value:
        return None
    match = TRACEPARENT.fullmatch(value.strip(" \t"))
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == INVALID_TRACE_ID or parent_id == INVALID_SPAN_ID:
        return None
    return trace_id, parent_id, bool(int(flags, 16) & SAMPLED)


def new_trace_id() -> str:
    """A new trace's id: 128 random bits (never all zero, which is invalid).

    random, not os.urandom or uuid4: os.urandom lets go of the GIL, a wait behind every busy thread (exchange.py's
    request id); random is reseeded in each forked worker. bytes.hex() writes it a third of the time format() takes.
    """
    return (random.getrandbits(128) or 1).to_bytes(16, "big").hex()


def new_span_id() -> str:
    """A new span's id: 64 random bits, never all zero."""
    return (random.getrandbits(64) or 1).to_bytes(8, "big").hex()


@dataclass(frozen=True)
class Sampler:
    """Which traces passthru records when it exports: OTEL_TRACES_SAMPLER's samplers, decided as the SDK decides them
    (a ratio on the trace id's low 64 bits), so that services sampling one trace by ratio agree."""

    ratio: float  # the share of traces recorded: of those passthru starts, and of every one unless parent_based
    parent_based: bool  # a caller's valid traceparent decides instead, by its sampled flag
    bound: int = field(init=False)  # trace ids whose low 64 bits are under this are recorded

    def __post_init__(self) -> None:
        object.__setattr__(self, "bound", round(self.ratio * 2**TRACE_ID_BITS))

    def sample(self, trace_id: str, parent_sampled: bool | None) -> bool:
        """Whether this trace is recorded; parent_sampled is the caller's flag, None when passthru started it."""
        if self.parent_based and parent_sampled is not None:
            return parent_sampled
        return int(trace_id[16:], 16) < self.bound


@dataclass(eq=False, slots=True)
class UpstreamSpan:
    """One attempt upstream, as its CLIENT span: its id (the parent id the upstream was sent), when it went and how it
    ended. The attempt whose answer is relayed ends with that answer's body, when the exchange ends."""

    span_id: str
    started: float  # time.perf_counter() when it was sent
    pool: HTTPConnectionPool  # where it went: the target's scheme, host and port
    target: str  # the request target sent: path and query
    name: str | None  # the target's name, when a route has several
    status: int | None = None  # its answer's status, once the headers came
    error: str | None = None  # why it failed before an answer came: the exception's class
    ended: float | None = None  # time.perf_counter() when it failed; None: it ends with the exchange


@dataclass(eq=False, slots=True)
class Trace:
    """One request's place in its trace: the ids passthru sends on, and the spans of its attempts upstream."""

    trace_id: str
    span_id: str  # passthru's span of this request: the parent of its attempts', the one its caller is told
    parent_id: str | None  # the caller's span, when it sent a valid traceparent
    sampled: bool  # the flag passthru sends on
    state: str | None  # the caller's tracestate, relayed as it came (only with a valid traceparent)
    recorded: bool = False  # its spans are exported (otel.py): export is on and the sampler took it
    arrival: dict[str, str] | None = None  # when recorded, what the server span keeps of the request (otel.py)
    upstream: list[UpstreamSpan] = field(default_factory=list)  # when recorded: one span per attempt, in order

    def traceparent(self) -> str:
        """The `traceparent` of passthru's own span, which the caller gets with the answer."""
        return f"00-{self.trace_id}-{self.span_id}-{'01' if self.sampled else '00'}"

    def attempt(
        self, headers: MutableMapping[str, str], pool: HTTPConnectionPool, target: str, name: str | None = None
    ) -> None:
        """A new attempt upstream, with a span id of its own under passthru's: the `traceparent` naming it (and the
        caller's `tracestate`) set in the headers it sends. Called once per attempt; answered() or failed() then
        says how it went. Its span is kept only when the trace is recorded: an attempt costs no more otherwise."""
        span_id = new_span_id()
        headers["traceparent"] = f"00-{self.trace_id}-{span_id}-{'01' if self.sampled else '00'}"
        if self.state is not None:
            headers["tracestate"] = self.state
        if self.recorded:
            self.upstream.append(UpstreamSpan(span_id, time.perf_counter(), pool, target, name))

    def answered(self, status: int) -> None:
        """The last attempt's answer came, with this status."""
        if self.recorded:
            self.upstream[-1].status = status

    def failed(self, exc: BaseException) -> None:
        """The last attempt failed before an answer came (refused, reset, timed out)."""
        if self.recorded:
            span = self.upstream[-1]
            span.error, span.ended = type(exc).__name__, time.perf_counter()

    def dropped(self) -> None:
        """The last attempt's answer is not relayed (another attempt follows): its span ends here."""
        if self.recorded:
            self.upstream[-1].ended = time.perf_counter()


def begin(environ: Mapping[str, Any], sampler: Sampler | None = None) -> Trace:
    """This request's trace: the caller's, continued, when its traceparent is valid; else a new one.

    Without a sampler (export off) passthru records nothing: it passes on the caller's sampled flag, and starts a new
    trace unsampled (00), since no one has recorded any of it. With one, the sampler's decision is the flag.
    """
    value = environ.get("HTTP_TRACEPARENT")
    parent = parse_traceparent(value) if value else None
    state = None
    if parent is None:
        trace_id, parent_id, sampled = new_trace_id(), None, False
    else:
        trace_id, parent_id, sampled = parent
        state = environ.get("HTTP_TRACESTATE", "").strip(" \t") or None
    recorded = False
    if sampler is not None:
        sampled = recorded = sampler.sample(trace_id, None if parent_id is None else sampled)
    return Trace(trace_id, new_span_id(), parent_id, sampled, state, recorded)
