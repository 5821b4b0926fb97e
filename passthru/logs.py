"""Request ids, the access line, log formats, and redaction: the one place a secret could leak, so one that masks."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from passthru import heap, metrics

log = logging.getLogger("passthru")
TEXT_FORMAT = "%(asctime)s %(levelname)s [%(process)d] [%(request_id)s] %(name)s: %(message)s"
MASK = "***"
ACCESS_LINE = "%s %s %s %dB %.1fms upstream=%s%s"
# A caller's x-request-id is kept when it looks like an id; anything else (long, spaces, control) is replaced.
SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
REQUEST_ID_HEADERS = ("x-request-id", "x-litellm-call-id")
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("passthru_request_id", default=None)
# Virtual keys are made at run time, so no list holds them; every key passthru makes or accepts starts with sk-.
# A lookbehind keeps words such as "task-list" intact.
KEY_PATTERN = re.compile(r"(?<![A-Za-z0-9_])sk-[A-Za-z0-9_-]{6,}")

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def json_logs() -> bool:
    """JSON_LOGS=true (set by `--json_logs`, as in LiteLLM) switches every log line to one JSON object."""
    return os.environ.get("JSON_LOGS", "").strip().lower() in ("1", "true", "yes")


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
        record.request_id = REQUEST_ID.get() or "-"
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
    """One JSON object per line: time, level, pid, logger, request_id, message, and the access fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "pid": record.process,
            "logger": record.name,
            "request_id": REQUEST_ID.get(),
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


def formatter() -> logging.Formatter:
    """The formatter for every passthru log line: text by default, JSON with JSON_LOGS=true."""
    return JsonFormatter() if json_logs() else TextFormatter(TEXT_FORMAT)


def configure_logging(secrets: Iterable[str], debug: bool) -> None:
    """Send passthru's log to stderr through the redaction filter; mask gunicorn's own lines too."""
    redact = Redact(secrets)
    for handler in list(log.handlers):  # a second app in one process (tests, reload) replaces the first's handler
        if getattr(handler, "passthru", False):
            log.removeHandler(handler)
    handler = _Stderr()
    handler.passthru = True  # type: ignore[attr-defined]
    handler.setFormatter(formatter())
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


class AccessLog:
    """WSGI middleware: gives each request its id, then logs and counts it once its answer is done."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        started = time.perf_counter()
        request_id = environ.get("HTTP_X_REQUEST_ID", "")
        if not SANE_REQUEST_ID.match(request_id):
            # Not uuid4: os.urandom lets go of the GIL, a wait behind every busy thread (random is reseeded per fork).
            request_id = f"{random.getrandbits(128):032x}"
        environ["passthru.request_id"] = request_id
        REQUEST_ID.set(request_id)
        status: list[str] = []

        def start(code: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            status.append(code)
            ours = [(name, request_id) for name in REQUEST_ID_HEADERS]
            for name, value in headers:
                # The upstream's own id (an API provider's, for its support desk) stays available under a new name.
                if name.lower() == "x-request-id" and value != request_id:
                    ours.append(("x-upstream-request-id", value))
            kept = [(name, value) for name, value in headers if name.lower() not in REQUEST_ID_HEADERS]
            return start_response(code, kept + ours, exc_info)

        return _Counted(self.app(environ, start), environ, status, started)


def _printable(text: str) -> str:
    """The caller's path as one log line can carry it: a decoded CR or LF would start a forged line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


class _Counted:
    """The response body, counted as it goes out; logs and records the request when the server closes it."""

    def __init__(self, body: Iterable[bytes], environ: dict[str, Any], status: list[str], started: float) -> None:
        self.body = body
        self.environ = environ
        self.status = status
        self.started = started
        self.sent = 0
        self.finished = False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.body:
            self.sent += len(chunk)
            yield chunk
        self.finished = True

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            self._record()
            REQUEST_ID.set(None)

    def _record(self) -> None:
        environ = self.environ
        seconds = time.perf_counter() - self.started
        upstream = environ.get("passthru.upstream_seconds")
        status = int(self.status[-1].split(" ", 1)[0]) if self.status else 0
        route = environ.get("passthru.route", metrics.UNMATCHED)
        received = getattr(environ.get("passthru.body"), "received", 0)
        method = environ.get("REQUEST_METHOD", "")
        metrics.record(route, method, status, self.sent, received, seconds, upstream)
        heap.relayed(self.sent + received)  # big bodies leave holes in the C heap: trimmed now and then
        finish = environ.get("passthru.on_finish")
        if finish is not None:
            try:
                finish(status or 500, seconds)
            except Exception as exc:  # the answer is gone; what is left is to say the entry is missing
                log.warning("spend log entry not written for %s: %s", _printable(environ.get("PATH_INFO", "")), exc)
        fields = {
            "method": method, "path": _printable(environ.get("PATH_INFO", "")), "status": status, "bytes": self.sent,
            "duration_ms": round(seconds * 1000, 1),
            "upstream_ms": round(upstream * 1000, 1) if upstream is not None else None,
            "complete": self.finished,
        }  # fmt: skip
        if not log.isEnabledFor(logging.INFO):
            return
        args = (
            method, fields["path"], status or "-", self.sent, seconds * 1000,
            f"{upstream * 1000:.1f}ms" if upstream is not None else "-", "" if self.finished else " incomplete",
        )  # fmt: skip
        # Made and handled here: log.info would first search the stack for the calling line, which no one reads.
        record = log.makeRecord(log.name, logging.INFO, __file__, 0, ACCESS_LINE, args, None, extra={"access": fields})
        log.handle(record)
