"""Log set-up, the access line, and redaction: the one place a secret could leak, so the one place that masks."""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

log = logging.getLogger("passthru")
FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
MASK = "***"
# Virtual keys are made at run time, so no list holds them; every key passthru makes or accepts starts with sk-.
# A lookbehind keeps words such as "task-list" intact.
KEY_PATTERN = re.compile(r"(?<![A-Za-z0-9_])sk-[A-Za-z0-9_-]{6,}")

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class Redact(logging.Filter):
    """Replace every known secret in a record's text (message and traceback) with ***."""

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
        return True


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to sys.stderr as it is at each record, not as it was when the app was built: threads that outlive a
    redirection (pytest's capture, an embedding program) never write to a closed stream."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(secrets: Iterable[str], debug: bool) -> None:
    """Send passthru's log to stderr through the redaction filter; mask gunicorn's own lines too."""
    redact = Redact(secrets)
    for handler in list(log.handlers):  # a second app in one process (tests, reload) replaces the first's handler
        if getattr(handler, "passthru", False):
            log.removeHandler(handler)
    handler = _Stderr()
    handler.passthru = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(redact)
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False
    for name in ("gunicorn.error", "gunicorn.access", ""):
        for other in logging.getLogger(name).handlers:
            for old in [f for f in other.filters if isinstance(f, Redact)]:
                other.removeFilter(old)
            other.addFilter(redact)
    # werkzeug's development server logs each request line, query included (GET /key/info?key=sk-…); it adds its
    # handler lazily, so the filter goes on the logger itself.
    werkzeug = logging.getLogger("werkzeug")
    for old in [f for f in werkzeug.filters if isinstance(f, Redact)]:
        werkzeug.removeFilter(old)
    werkzeug.addFilter(redact)


class AccessLog:
    """WSGI middleware writing one line per request once its body is done: method, path, status, bytes, times."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        started = time.perf_counter()
        status: list[str] = []

        def start(code: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            status.append(code)
            return start_response(code, headers, exc_info)

        return _Counted(self.app(environ, start), environ, status, started)


class _Counted:
    """The response body, counted as it goes out; logs the access line when the server closes it."""

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
            elapsed = (time.perf_counter() - self.started) * 1000
            upstream = self.environ.get("passthru.upstream_seconds")
            status = self.status[-1].split(" ", 1)[0] if self.status else "-"
            log.info(
                "%s %s %s %dB %.1fms upstream=%s%s",
                self.environ.get("REQUEST_METHOD"),
                self.environ.get("PATH_INFO"),
                status,
                self.sent,
                elapsed,
                f"{upstream * 1000:.1f}ms" if upstream is not None else "-",
                "" if self.finished else " incomplete",
            )
            finish = self.environ.get("passthru.on_finish")
            if finish is not None:
                try:
                    finish(int(status) if status.isdigit() else 500, elapsed / 1000)
                except Exception as exc:  # the answer is gone; what is left is to say the entry is missing
                    log.warning("spend log entry not written for %s: %s", self.environ.get("PATH_INFO"), exc)
