"""How a request path is read and resolved, once, before any route is chosen; and how a lenient upstream may read
a segment. routes.py picks a route from the result; config.py refuses route paths no request could match."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from passthru.errors import RequestError

SEGMENT_SAFE = "!$&'()*+,;=:@-._~"  # RFC 3986 pchar minus "%": a decoded segment is re-encoded with these kept
# What no segment may hold once decoded, even twice (as a careless upstream might decode): a slash or backslash
# would split it into two, and a control character has no place in a path (a CR or LF could forge a log line).
FORBIDDEN = re.compile(r"[/\\\x00-\x1f\x7f]")
DOTS = (".", "..")
# A path with nothing to resolve or re-encode: plain segments (none a dot segment, none empty), no escapes, no `;`.
# Most requests are such; they skip resolve_path's segment by segment work.
PLAIN_PATH = re.compile(r"(?:/(?!\.\.?(?:/|$))[A-Za-z0-9!$&'()*+,=:@._~-]+)*/?")


@dataclass(frozen=True)
class ResolvedPath:
    """A request path with its dot segments resolved and empty segments merged, as nginx and Envoy normalise."""

    decoded: tuple[str, ...]  # the segments as routes are compared (percent-decoded once, latin-1 as WSGI has it)
    encoded: tuple[str, ...]  # the same segments as they go upstream
    trailing_slash: bool


def raw_path(environ: Mapping[str, Any]) -> str:
    """The path as the client wrote it, escapes intact: PATH_INFO is decoded already, so `%2F` is a `/` there.

    gunicorn and werkzeug give the request target as RAW_URI (REQUEST_URI elsewhere). When it does not decode to
    PATH_INFO (a middleware rewrote the path, or the server has neither), PATH_INFO is taken as the literal path.
    """
    path_info: str = environ.get("PATH_INFO", "")
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI") or ""
    if not raw.startswith("/"):
        raw = urlsplit(raw).path  # absolute-form: http://host/path
    raw = raw.split("?", 1)[0]
    script = environ.get("SCRIPT_NAME", "")
    if script and raw.startswith(script):
        raw = raw[len(script) :]
    if unquote(raw, encoding="latin-1") == path_info:
        return raw
    return path_info.replace("%", "%25")


def resolve_path(raw: str) -> ResolvedPath:
    """Resolve `.` and `..` (raw or escaped, any case) and merge `//`; RequestError for what cannot be resolved.

    Refused: a `..` above the root; a segment that hides a slash, backslash or control character in an escape, or
    that a second decoding would turn into one of those or into a dot segment; a dot segment with `;parameters`,
    which Tomcat and Jetty read as a dot segment.
    """
    if PLAIN_PATH.fullmatch(raw):
        segments = tuple(raw.strip("/").split("/")) if len(raw) > 1 else ()
        return ResolvedPath(segments, segments, len(raw) > 1 and raw.endswith("/"))
    return resolve_path_slowly(raw)


def resolve_path_slowly(raw: str) -> ResolvedPath:
    """resolve_path without its shortcut for plain paths, segment by segment (what the shortcut must agree with)."""
    decoded: list[str] = []
    encoded: list[str] = []
    parts = raw.split("/")
    for part in parts:
        segment = unquote(part, encoding="latin-1")
        if segment == "..":
            if not decoded:
                raise RequestError("the path climbs above /", param="path")
            decoded.pop()
            encoded.pop()
            continue
        if segment in ("", "."):
            continue
        twice = unquote(segment, encoding="latin-1")
        if twice in DOTS or FORBIDDEN.search(twice):
            raise RequestError("the path has an encoded slash, dot segment or control character", param="path")
        if ";" in segment and segment.split(";", 1)[0] in DOTS:
            raise RequestError("the path has a dot segment with parameters", param="path")
        decoded.append(segment)
        # Re-encoded as RFC 3986 writes a segment; a plain one (the usual case) is already written so.
        plain = part == segment and part.isascii() and part.isalnum()
        encoded.append(part if plain else quote(segment.encode("latin-1"), SEGMENT_SAFE))
    # "/a/", "/a/." and "/a/b/.." all end in a slash once resolved (RFC 3986 §5.2.4).
    trailing = bool(decoded) and len(parts) > 1 and unquote(parts[-1]) in ("", *DOTS)
    return ResolvedPath(tuple(decoded), tuple(encoded), trailing)


def loose(segment: str) -> str:
    """A segment as a lenient upstream may read it: any letter case, `;parameters` dropped (Tomcat, Jetty)."""
    return segment.split(";", 1)[0].casefold()
