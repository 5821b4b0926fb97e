"""What goes upstream, without a socket: target path and query, headers, X-Forwarded-*, the body's framing."""

from __future__ import annotations

import io
from typing import Any

import pytest

from passthru.config import parse_settings
from passthru.errors import RequestError
from passthru.pools import new_session
from passthru.server_config import proxy_trust
from passthru.upstream_request import (
    CallerBody,
    Destination,
    Route,
    compile_route,
    encode_query,
    request_body,
    upstream_headers,
    upstream_target,
)


def route_of(**entry: Any):
    settings = parse_settings(
        {"general_settings": {"pass_through_endpoints": [{"path": "/r", "target": "http://up.test/base", **entry}]}},
        "cfg.yaml",
        {"SECRET": "s3cr3t-value"},
    )
    return compile_route(settings.endpoints[0], new_session(1), proxy_trust("192.0.2.0/24"))


def one(route: Route) -> tuple[Route, Destination]:
    """The route and its one target, as upstream_target and upstream_headers take them."""
    (destination,) = route.destinations
    return route, destination


@pytest.mark.parametrize(
    ("target", "subpath", "query", "expected"),
    [
        pytest.param("http://up.test/base", None, "", "/base", id="plain"),
        pytest.param("http://up.test/base", None, "a=1&a=2&b=", "/base?a=1&a=2&b=", id="repeats"),
        pytest.param("http://up.test/base?v=1", None, "a=1", "/base?v=1&a=1", id="target-query"),
        pytest.param("http://up.test/base/", "x/y", "", "/base/x/y", id="slash-join"),
        pytest.param("http://up.test", "x", "", "/x", id="bare-host"),
        pytest.param("http://up.test/base", "", "", "/base/", id="trailing"),
        pytest.param("http://up.test/base", "a%20b/%C3%BC", "", "/base/a%20b/%C3%BC", id="encoded-by-routes"),
        pytest.param("http://up.test/b", None, "q=\xe9", "/b?q=%E9", id="latin1-query-byte"),
    ],
)
def test_upstream_target(target: str, subpath: str | None, query: str, expected: str) -> None:
    assert upstream_target(*one(route_of(target=target)), subpath, query) == expected


def test_default_query_params_only_when_absent() -> None:
    route = route_of(default_query_params={"key": "v 1", "b": "2"})
    assert upstream_target(*one(route), None, "") == "/base?key=v+1&b=2"
    assert upstream_target(*one(route), None, "key=mine") == "/base?key=mine&b=2"
    assert upstream_target(*one(route), None, "b") == "/base?b&key=v+1"


def test_encode_query_keeps_ascii_as_is() -> None:
    assert encode_query("a=%2f&b=+&c") == "a=%2f&b=+&c"
    assert encode_query("a=b c") == "a=b%20c"


def environ(**extra: Any) -> dict[str, Any]:
    return {"REQUEST_METHOD": "GET", "REMOTE_ADDR": "10.1.2.3", "wsgi.url_scheme": "https", "HTTP_HOST": "p.test",
            "wsgi.input": io.BytesIO(b""), **extra}  # fmt: skip


def test_default_headers_are_the_few_plus_configured() -> None:
    route = route_of(headers={"Authorization": "bearer os.environ/SECRET", "Accept": "application/json"})
    headers = upstream_headers(
        *one(route), environ(CONTENT_TYPE="text/plain", HTTP_ACCEPT="*/*", HTTP_X_OTHER="1"), frozenset()
    )
    assert dict(headers) == {
        "Content-Type": "text/plain",
        "Authorization": "bearer s3cr3t-value",
        "Accept": "application/json",
        "X-Forwarded-For": "10.1.2.3",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "p.test",
    }


def test_forward_headers_drops_hop_by_hop_named_and_given() -> None:
    route = route_of(forward_headers=True)
    env = environ(
        HTTP_CONNECTION="close, X-Secret-Hop", HTTP_X_SECRET_HOP="1", HTTP_UPGRADE="h2c", HTTP_TE="trailers",
        HTTP_X_KEEP="k", HTTP_API_KEY="proxy-key", HTTP_EXPECT="100-continue", HTTP_X_FORWARDED_FOR="6.6.6.6",
        CONTENT_LENGTH="3", HTTP_TRANSFER_ENCODING="chunked",
    )  # fmt: skip
    headers = upstream_headers(*one(route), env, frozenset({"api-key"}))
    assert set(headers) == {"X-Keep", "X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host"}
    assert headers["X-Forwarded-For"] == "10.1.2.3"


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        pytest.param("192.0.2.7", ("203.0.113.9, 192.0.2.7", "https", "public.example"), id="trusted-front"),
        pytest.param("10.1.2.3", ("10.1.2.3", "http", "p.test"), id="anyone-else"),
    ],
)
def test_forwarded_headers_trusted_only_from_the_front(peer: str, expected: tuple[str, str, str]) -> None:
    env = environ(REMOTE_ADDR=peer, HTTP_X_FORWARDED_FOR="203.0.113.9", HTTP_X_FORWARDED_PROTO="https",
                  HTTP_X_FORWARDED_HOST="public.example")  # fmt: skip
    env["wsgi.url_scheme"] = "http"
    headers = upstream_headers(*one(route_of(forward_headers=True)), env, frozenset())
    assert (headers["X-Forwarded-For"], headers["X-Forwarded-Proto"], headers["X-Forwarded-Host"]) == expected


@pytest.mark.parametrize(
    ("extra", "length"),
    [
        pytest.param({}, None, id="none"),
        pytest.param({"CONTENT_LENGTH": ""}, None, id="empty"),
        pytest.param({"CONTENT_LENGTH": "0"}, "0", id="zero"),
        pytest.param({"CONTENT_LENGTH": "007"}, "7", id="leading-zeros"),
        pytest.param({"HTTP_TRANSFER_ENCODING": "chunked"}, None, id="chunked"),
    ],
)
def test_request_body_framing(extra: dict[str, str], length: str | None) -> None:
    assert request_body(environ(**extra), 1024)[1] == length


@pytest.mark.parametrize(
    "extra",
    [
        {"CONTENT_LENGTH": "3", "HTTP_TRANSFER_ENCODING": "chunked"},
        {"CONTENT_LENGTH": "-1"},
        {"CONTENT_LENGTH": "1e3"},
        {"CONTENT_LENGTH": "٣"},  # a digit to str.isdigit, not to HTTP
        {"HTTP_TRANSFER_ENCODING": "gzip, chunked"},
    ],
)
def test_request_body_refuses_bad_framing(extra: dict[str, str]) -> None:
    with pytest.raises(RequestError):
        request_body(environ(**extra), 1024)


def test_caller_body_reads_exactly_and_flags_a_short_body() -> None:
    body = CallerBody(io.BytesIO(b"abcdef"), 4, 1024)
    assert body.read(3) == b"abc" and body.read() == b"d" and body.read() == b""
    assert body.received == 4
    short = CallerBody(io.BytesIO(b"ab"), 4, 1024)
    short.read(2)
    with pytest.raises(OSError):
        short.read(2)
    assert short.broken
    chunked = CallerBody(io.BytesIO(b"xyz"), None, 1024)
    assert chunked.read(2) == b"xy" and chunked.read(2) == b"z" and chunked.read(2) == b""
    assert not chunked.broken


def test_caller_body_turns_server_read_errors_into_one_oserror() -> None:
    class Broken(io.RawIOBase):
        def read(self, size: int = -1) -> bytes:
            raise ValueError("Invalid chunk size")  # gunicorn's InvalidChunkSize is no OSError

    body = CallerBody(Broken(), None, 1024)  # type: ignore[arg-type]
    with pytest.raises(OSError):
        body.read(10)
    assert body.broken


@pytest.mark.parametrize("length", [pytest.param(10, id="content-length"), pytest.param(None, id="chunked")])
def test_caller_body_sends_what_was_read_again_then_reads_on(length: int | None) -> None:
    body = CallerBody(io.BytesIO(b"0123456789"), length, 6)
    assert body.read(4) == b"0123" and body.read(2) == b"45"
    assert body.rewind()  # six bytes read, six kept
    assert [body.read(3), body.read(3), body.read(3), body.read(3), body.read(3)] == [b"012", b"3", b"45", b"678",
                                                                                      b"9"]  # fmt: skip
    assert body.read(3) == b"" and body.received == 10  # the caller's bytes, each counted once
    assert not body.rewind()  # ten read, six kept: it cannot go out again whole


def test_caller_body_goes_out_again_only_while_all_that_was_read_is_kept() -> None:
    untouched = CallerBody(io.BytesIO(b"abc"), 3, 0)
    assert untouched.rewind() and untouched.read() == b"abc"  # nothing was read: nothing needs keeping
    assert not untouched.rewind()
    settled = CallerBody(io.BytesIO(b"abc"), 3, 1024)
    assert settled.read() == b"abc"
    settled.settle()
    assert not settled.rewind()
    broken = CallerBody(io.BytesIO(b"ab"), 3, 1024)
    broken.read(2)
    with pytest.raises(OSError):
        broken.read(1)
    assert not broken.rewind()
