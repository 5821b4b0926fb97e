"""The usage tap on the relay: fed each chunk of an answer after the caller got it, it finds the JSON documents (a whole
body, server-sent events, JSON lines), decompressed for itself alone, within fixed caps, and hands them to usage.py.
It never holds the answer back, and what it has seen can be asked for at any moment (a caller that hangs up).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import replace
from typing import Any, Protocol

from passthru.usage import Tally, Usage, worth_reading

JSON_CAP = 1 << 20  # a JSON answer is held up to this and parsed at its end; past it the call's usage is unknown
EVENT_CAP = 256 << 10  # one event (or JSON line) waiting for its end; a longer one is skipped
OVER_CAP = f"an event over {EVENT_CAP} bytes"
PIECE = 64 << 10  # decompressed bytes made at a time: what a compressed chunk may grow to in memory at once
# Decompressed bytes read of one answer at most: a small compressed answer can inflate to gigabytes (a bomb), which
# bounded memory alone would still let cost seconds of CPU. Far past any LLM answer or stream's text.
INFLATE_CAP = 64 << 20
# JSON lines: Cohere v1's stream (application/stream+json), Ollama's (application/x-ndjson)
LINE_TYPES = frozenset(
    ("application/x-ndjson", "application/jsonl", "application/x-jsonlines", "application/stream+json")
)


class Tap(Protocol):
    """Reads usage from one answer's body as it goes by; feed() never raises and never holds more than a cap."""

    @property
    def lost(self) -> str | None:
        """Why some of the answer went unread (over a cap, undecodable): to log once, when the answer is done."""

    def feed(self, chunk: bytes) -> None:
        """Read the next chunk of the body; called after the chunk was handed on to the caller."""

    def usage(self) -> Usage | None:
        """The usage seen so far, or None when none was (or it was lost)."""


def tap_for(content_type: str | None, content_encoding: str | None, request_model: str | None) -> Tap | None:
    """A tap for an answer of this type and encoding, or None where no usage can be read (then it costs nothing).

    request_model (model_from_prefix) names the model of an answer that does not name its own.
    """
    mime = (content_type or "").partition(";")[0].strip().lower()
    tap: _Body | _Events
    if mime == "text/event-stream":
        tap = _Events(request_model, b"\n\n")
    elif mime in LINE_TYPES:
        tap = _Events(request_model, b"\n")
    elif mime == "application/json" or mime.endswith("+json"):
        tap = _Body(request_model)
    else:
        return None
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return tap
    if encoding in ("gzip", "x-gzip", "deflate"):
        return _Inflated(tap, encoding == "deflate")
    return None  # br, zstd or a chain of codings: no decoder in the standard library, so no usage rather than a guess


class _Body:
    """A JSON answer: held up to JSON_CAP and parsed when its usage is asked for (once, unless more came since)."""

    __slots__ = ("chunks", "lost", "model", "read", "size")

    def __init__(self, request_model: str | None) -> None:
        self.model = request_model
        self.chunks: list[bytes] = []
        self.size = 0
        self.lost: str | None = None
        self.read: tuple[int, Usage | None] = (-1, None)  # the size last parsed, and what it gave

    def feed(self, chunk: bytes) -> None:
        if self.lost is not None:
            return
        self.size += len(chunk)
        if self.size > JSON_CAP:
            self.chunks = []
            self.lost = f"a JSON answer over {JSON_CAP} bytes"
        else:
            self.chunks.append(chunk)

    def usage(self) -> Usage | None:
        if self.lost is not None:
            return None
        if self.read[0] != self.size:
            body = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
            self.chunks = [body]
            tally = Tally()
            if worth_reading(body):  # a model list or an error has no counts: not worth parsing
                tally.read(_loads(body))
            self.read = (self.size, tally.usage(self.model))
        return self.read[1]


class _Events:
    """A stream of events (server-sent, ended by a blank line) or of JSON lines, each read as it ends."""

    __slots__ = ("buffer", "cr", "lost", "model", "separator", "skipping", "tally")

    def __init__(self, request_model: str | None, separator: bytes) -> None:
        self.model = request_model
        self.separator = separator
        self.tally = Tally()
        self.buffer = bytearray()  # the event not yet ended, its line ends made \n
        self.cr = False  # the last chunk ended in \r: a \n opening the next one belongs to it
        self.skipping = False  # inside an event over EVENT_CAP, dropped up to its end
        self.lost: str | None = None

    def feed(self, chunk: bytes) -> None:
        separator = self.separator
        end = len(chunk) - len(separator)
        if end > 0 and chunk.find(separator) == end and not (self.buffer or self.skipping or self.cr or b"\r" in chunk):
            # The usual chunk of a stream: one whole event, and nothing waiting before it. Read it without a copy.
            if end > EVENT_CAP:
                self.lost = OVER_CAP
            else:
                self._read(chunk[:end], self.tally)
            return
        if self.cr and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self.cr = chunk[-1:] == b"\r"
        if b"\r" in chunk:  # SSE ends a line with \r\n, \n or \r: one kind of end lets one search find the events
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buffer = self.buffer
        start = max(len(buffer) - len(separator) + 1, 0)  # a separator may straddle the two chunks
        buffer += chunk
        begin, end = 0, buffer.find(separator, start)
        while end >= 0:
            if self.skipping:
                self.skipping = False
            elif end - begin > EVENT_CAP:  # it ended in the chunk that took it past the cap
                self.lost = OVER_CAP
            elif end > begin:
                self._read(bytes(buffer[begin:end]), self.tally)
            begin = end + len(separator)
            end = buffer.find(separator, begin)
        del buffer[:begin]
        if len(buffer) > EVENT_CAP:
            # Skip the event, not the stream: the counts come last, in a small event, maybe after a long one (an image).
            self.lost = OVER_CAP
            self.skipping = True
            del buffer[: len(buffer) - len(separator) + 1]

    def _read(self, event: bytes, tally: Tally) -> None:
        if worth_reading(event):
            data = event if self.separator == b"\n" else _data(event)
            if data is not None:
                tally.read(_loads(data))

    def usage(self) -> Usage | None:
        if not self.buffer or self.skipping:
            return self.tally.usage(self.model)
        # The last event may lack its end (a line stream's last line, or a stream cut short): read it on a copy, so
        # that when its end does come it counts once.
        tally = replace(self.tally)
        self._read(bytes(self.buffer), tally)
        return tally.usage(self.model)


class _Inflated:
    """A gzip or deflate answer, decompressed for the inner tap alone, at most PIECE bytes at a time."""

    __slots__ = ("broken", "head", "inflated", "inflater", "inner")

    def __init__(self, inner: _Body | _Events, deflate: bool) -> None:
        self.inner = inner
        self.head = b""  # deflate: the first bytes, until there are two to tell zlib-wrapped from raw
        self.inflater = None if deflate else zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip, or zlib mislabelled
        self.broken: str | None = None
        self.inflated = 0

    @property
    def lost(self) -> str | None:
        return self.broken or self.inner.lost

    def feed(self, chunk: bytes) -> None:
        inner, inflater = self.inner, self.inflater
        if self.broken is not None or isinstance(inner, _Body) and inner.lost is not None:
            return  # nothing more can be read: stop decompressing
        if inflater is None:
            chunk = self.head + chunk
            if len(chunk) < 2:
                self.head = chunk
                return
            # "deflate" is zlib-wrapped (RFC 9110), yet some servers send raw deflate: a zlib header tells them apart.
            wrapped = chunk[0] & 0x0F == 8 and (chunk[0] << 8 | chunk[1]) % 31 == 0
            inflater = self.inflater = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        try:
            # After the end of the first gzip member zlib would keep all that follows in unused_data: stop there.
            while chunk and not inflater.eof:
                piece = inflater.decompress(chunk, PIECE)
                chunk = inflater.unconsumed_tail
                self.inflated += len(piece)
                if self.inflated > INFLATE_CAP:
                    self.broken = f"an answer that decompresses to over {INFLATE_CAP} bytes"
                    return
                inner.feed(piece)
        except zlib.error:
            self.broken = "an answer that does not decompress"

    def usage(self) -> Usage | None:
        return None if self.broken is not None else self.inner.usage()


def _loads(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # not JSON ([DONE], a cut-off event), or nested past the parser's depth
        return None


def _data(event: bytes) -> bytes | None:
    """An event's data: the values of its data lines joined with \\n (the SSE rule), or None when it has none."""
    if event.startswith(b"data:") and b"\n" not in event:
        return event[6:] if event[5:6] == b" " else event[5:]
    values = []
    for line in event.split(b"\n"):
        name, _, value = line.partition(b":")
        if name == b"data":  # event:, id:, retry: and comments (":") tell nothing about usage: the JSON says it all
            values.append(value[1:] if value[:1] == b" " else value)
    return b"\n".join(values) if values else None
