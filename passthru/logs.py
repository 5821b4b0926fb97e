"""The access line, log formats, and redaction: the one place a secret could leak, so one that masks."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from passthru.exchange import Exchange

log = logging.getLogger("passthru")
TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] [%(request_id)s] %(name)s: %(message)s"
MASK = "***"
ACCESS_LINE = "%s %s %s %dB %.1fms upstream=%s%s trace=%s%s%s"
# (request id, trace id) of the request this thread serves, for every line logged about it; one variable, set once a
# request (each set costs as much as the rest of a line's bookkeeping).
REQUEST_IDS: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("passthru_ids", default=None)
# Virtual keys are made at run time, so no list holds them; every key passthru makes or accepts starts with sk-.
# A lookbehind keeps words such as "task-list" intact.
KEY_PATTERN = re.compile(r"(?<![A-Za-z0-9_])sk-[A-Za-z0-9_-]{6,}")


class Redact(logging.Filter):
    """Replace every known secret in a record's text (message, traceback, access fields) with ***."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Longest first, so a secret that contains another is masked whole.
        self.secrets = tuple(sorted((s for s in secrets if s), key=len, reverse=True))

    def mask(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        if "sk-" in text:
            text = KEY_PATTERN.sub(f"sk-{MASK}", text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.mask(record.getMessage())
        record.args = None
        if record.exc_info:
            record.exc_text = self.mask(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        fields = getattr(record, "access", None)
        if fields:
            record.access = {k: self.mask(v) if isinstance(v, str) else v for k, v in fields.items()}
        ids = REQUEST_IDS.get()
        record.request_id = ids[0] if ids else "-"
        return True


class TextFormatter(logging.Formatter):
    """logging's Formatter, with the time's text made once a second rather than once a line: every request logs."""

    _second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached = self._second  # one tuple, read and replaced whole: threads never see half of it
        if cached[0] != second:
            cached = self._second = (second, time.strftime(self.default_time_format, self.converter(second)))
        return f"{cached[1]},{int(record.msecs):03d}"  # as logging.Formatter.default_msec_format does


class JsonFormatter(TextFormatter):
    """One JSON object per line: time, level, pid, logger, request_id, trace_id, message, and the access fields."""

    def format(self, record: logging.LogRecord) -> str:
        request_id, trace_id = REQUEST_IDS.get() or (None, None)
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "pid": record.process,
            "logger": record.name,
            "request_id": request_id,
            "trace_id": trace_id,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "access", None) or {})
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to sys.stderr as it is at each record, not as it was when the app was built: threads that outlive a
    redirection (pytest's capture, an embedding program) never write to a closed stream."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(secrets: Iterable[str], debug: bool, json_lines: bool) -> None:
    """Send passthru's log to stderr through the redaction filter; mask gunicorn's own lines too."""
    redact = Redact(secrets)
    for handler in list(log.handlers):  # a second app in one process (tests, reload) replaces the first's handler
        if getattr(handler, "passthru", False):
            log.removeHandler(handler)
    handler = _Stderr()
    handler.passthru = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter(TEXT_FORMAT))
    handler.addFilter(redact)
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False
    # The servers' own loggers (werkzeug logs request lines with their query) and every root handler mask too.
    # A filter on a logger covers the records it makes, whichever handler it later gets; one on a handler
    # covers whatever reaches that handler.
    servers = [logging.getLogger(name) for name in ("gunicorn.error", "gunicorn.access", "werkzeug")]
    for target in (*servers, *logging.getLogger().handlers):
        for old in [f for f in target.filters if isinstance(f, Redact)]:
            target.removeFilter(old)
        target.addFilter(redact)


def printable(text: str) -> str:
    """The caller's path as one log line can carry it: a decoded CR or LF would start a forged line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def access_line(exchange: Exchange) -> None:
    """The exchange's one access line: method, path without query, status, bytes, total and upstream time, the target
    that answered and the attempts it took, and the trace id (the request id is in every line's prefix)."""
    if not log.isEnabledFor(logging.INFO):
        return
    path, upstream, status = printable(exchange.path), exchange.upstream_seconds, exchange.status
    fields = {
        "method": exchange.method, "path": path, "status": status, "bytes": exchange.sent,
        "duration_ms": round(exchange.seconds * 1000, 1),
        "upstream_ms": round(upstream * 1000, 1) if upstream is not None else None, "complete": exchange.complete,
        "target": exchange.target, "attempts": exchange.attempts,
    }  # fmt: skip
    usage, spent = "", ""
    if exchange.usage is not None:
        prompt, completion = exchange.usage.prompt_tokens, exchange.usage.completion_tokens
        fields.update(model=exchange.model, prompt_tokens=prompt, completion_tokens=completion)
        usage = f" tokens={prompt}+{completion}"
    if exchange.spend:
        fields["spend"] = exchange.spend
        spent = f" spend={exchange.spend:.6g}"
    args = (
        exchange.method, path, status or "-", exchange.sent, exchange.seconds * 1000,
        f"{upstream * 1000:.1f}ms" if upstream is not None else "-",
        f" target={exchange.target} attempts={exchange.attempts}" if exchange.target else "", exchange.trace.trace_id,
        "" if exchange.complete else " incomplete", usage + spent,
    )  # fmt: skip
    # Made and handled here: log.info would first search the stack for the calling line, which no one reads.
    record = log.makeRecord(log.name, logging.INFO, __file__, 0, ACCESS_LINE, args, None, extra={"access": fields})
    log.handle(record)
