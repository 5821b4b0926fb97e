"""Unit tests of the pure logic: URL and query building, header filtering, framing, keys, redaction.

The transport seam (the urllib3 pool's urlopen) is replaced with monkeypatch; everything that depends on real
sockets is in test_proxy.py and test_gunicorn.py.
"""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import urllib3
from conftest import write_config

from passthru import create_app, heap
from passthru.auth import digest, headers_carrying, read_key, route_allowed
from passthru.config import parse_settings
from passthru.errors import ConfigError, RequestError
from passthru.forward import new_session
from passthru.logs import Redact, TextFormatter
from passthru.server_config import proxy_trust, read_server_settings
from passthru.upstream_request import (
    CallerBody,
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
    assert upstream_target(route_of(target=target), subpath, query) == expected


def test_default_query_params_only_when_absent() -> None:
    route = route_of(default_query_params={"key": "v 1", "b": "2"})
    assert upstream_target(route, None, "") == "/base?key=v+1&b=2"
    assert upstream_target(route, None, "key=mine") == "/base?key=mine&b=2"
    assert upstream_target(route, None, "b") == "/base?b&key=v+1"


def test_encode_query_keeps_ascii_as_is() -> None:
    assert encode_query("a=%2f&b=+&c") == "a=%2f&b=+&c"
    assert encode_query("a=b c") == "a=b%20c"


def environ(**extra: Any) -> dict[str, Any]:
    return {"REQUEST_METHOD": "GET", "REMOTE_ADDR": "10.1.2.3", "wsgi.url_scheme": "https", "HTTP_HOST": "p.test",
            "wsgi.input": io.BytesIO(b""), **extra}  # fmt: skip


def test_default_headers_are_the_few_plus_configured() -> None:
    route = route_of(headers={"Authorization": "bearer os.environ/SECRET", "Accept": "application/json"})
    headers = upstream_headers(
        route, environ(CONTENT_TYPE="text/plain", HTTP_ACCEPT="*/*", HTTP_X_OTHER="1"), frozenset()
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
    headers = upstream_headers(route, env, frozenset({"api-key"}))
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
    headers = upstream_headers(route_of(forward_headers=True), env, frozenset())
    assert (headers["X-Forwarded-For"], headers["X-Forwarded-Proto"], headers["X-Forwarded-Host"]) == expected


def test_proxy_trust_spec() -> None:
    assert proxy_trust("*")("198.51.100.1")
    trusted = proxy_trust("127.0.0.1, ::1,10.0.0.0/8")
    assert trusted("127.0.0.1") and trusted("::1") and trusted("10.2.3.4")
    assert not trusted("11.0.0.1") and not trusted("not-an-ip") and not trusted("")
    with pytest.raises(ConfigError, match="FORWARDED_ALLOW_IPS"):
        proxy_trust("localhost")


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
    assert request_body(environ(**extra))[1] == length


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
        request_body(environ(**extra))


def test_caller_body_reads_exactly_and_flags_a_short_body() -> None:
    body = CallerBody(io.BytesIO(b"abcdef"), 4)
    assert body.read(3) == b"abc" and body.read() == b"d" and body.read() == b""
    assert body.received == 4
    short = CallerBody(io.BytesIO(b"ab"), 4)
    short.read(2)
    with pytest.raises(OSError):
        short.read(2)
    assert short.broken
    chunked = CallerBody(io.BytesIO(b"xyz"), None)
    assert chunked.read(2) == b"xy" and chunked.read(2) == b"z" and chunked.read(2) == b""
    assert not chunked.broken


def test_caller_body_turns_server_read_errors_into_one_oserror() -> None:
    class Broken(io.RawIOBase):
        def read(self, size: int = -1) -> bytes:
            raise ValueError("Invalid chunk size")  # gunicorn's InvalidChunkSize is no OSError

    body = CallerBody(Broken(), None)  # type: ignore[arg-type]
    with pytest.raises(OSError):
        body.read(10)
    assert body.broken


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({"HTTP_AUTHORIZATION": "Bearer k1"}, ("k1", "authorization"), id="bearer"),
        pytest.param({"HTTP_AUTHORIZATION": "bearer  k1 "}, ("k1", "authorization"), id="bearer-spaces"),
        pytest.param({"HTTP_AUTHORIZATION": "Basic abc"}, None, id="basic-is-not-ours"),
        pytest.param({"HTTP_X_LITELLM_API_KEY": "k2", "HTTP_AUTHORIZATION": "Bearer up"}, ("k2", "x-litellm-api-key"),
                     id="litellm-header-first"),
        pytest.param({"HTTP_X_GOOG_API_KEY": "k3"}, ("k3", "x-goog-api-key"), id="goog"),
        pytest.param({}, None, id="none"),
    ],
)  # fmt: skip
def test_read_key(headers: dict[str, str], expected: tuple[str, str] | None) -> None:
    assert read_key(headers) == expected


def test_headers_carrying_finds_every_form_of_a_key() -> None:
    env = {"HTTP_AUTHORIZATION": "Bearer mk", "HTTP_X_API_KEY": "mk", "HTTP_API_KEY": "other"}
    assert headers_carrying(env, (digest("mk"),)) == {"authorization", "x-api-key"}


def test_redact_masks_message_args_and_traceback() -> None:
    redact = Redact(["s3cr3t", "s3cr3t-longer"])
    try:
        raise ValueError("boom s3cr3t")
    except ValueError:
        record = logging.LogRecord("passthru", logging.ERROR, __file__, 1, "key=%s", ("s3cr3t-longer",), True)
        record.exc_info = sys.exc_info()
    redact.filter(record)
    assert record.getMessage() == "key=***"
    assert "s3cr3t" not in (record.exc_text or "") and "boom ***" in (record.exc_text or "")


def test_log_time_made_once_a_second_reads_as_loggings_own() -> None:
    ours, theirs = TextFormatter("%(asctime)s"), logging.Formatter("%(asctime)s")
    for created in (1_700_000_000.25, 1_700_000_000.999, 1_700_000_001.0, 1_700_000_061.5, 1_700_000_000.5):
        record = logging.LogRecord("passthru", logging.INFO, __file__, 1, "m", None, None)
        record.created, record.msecs = created, (created % 1) * 1000
        assert ours.formatTime(record) == theirs.formatTime(record)
        assert ours.formatTime(record, "%H:%M") == theirs.formatTime(record, "%H:%M")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("GET /key/info?key=sk-AbC_123-xyz HTTP/1.1", "GET /key/info?key=sk-*** HTTP/1.1", id="query"),
        pytest.param("key sk-abcdef and sk-ghijkl", "key sk-*** and sk-***", id="two"),
        pytest.param("POST /task-list /ask-questions-now", "POST /task-list /ask-questions-now", id="words"),
        pytest.param("key_name sk-...abcd", "key_name sk-...abcd", id="key-name"),
    ],
)
def test_redact_masks_anything_shaped_like_a_virtual_key(text: str, expected: str) -> None:
    assert Redact([]).mask(text) == expected


@pytest.mark.parametrize(
    ("allowed", "path", "expected"),
    [
        pytest.param(None, "/any", True, id="no-list"),
        pytest.param(("/v1/rerank",), "/v1/rerank", True, id="listed"),
        pytest.param(("/v1/rerank",), "/v1/rerank2", False, id="longer"),
        pytest.param(("/v1/*",), "/v1/rerank", True, id="prefix"),
        pytest.param(("/v1/*",), "/v2/rerank", False, id="other-prefix"),
        pytest.param((), "/v1/rerank", True, id="empty-list-like-litellm"),
    ],
)
def test_route_allowed(allowed: tuple[str, ...] | None, path: str, expected: bool) -> None:
    assert route_allowed(allowed, path) is expected


# --- the transport seam, mocked: errors map to LiteLLM-shaped answers --------------------------------------------


@pytest.fixture
def client(tmp_path: Path):
    config = write_config(tmp_path, [{"path": "/r", "target": "http://up.test/base", "timeout": 1}])
    return create_app(config).test_client()


def failing(error: BaseException) -> Any:
    def urlopen(self: Any, *args: Any, **kwargs: Any) -> None:
        raise error

    return urlopen


@pytest.mark.parametrize(
    ("error", "status", "error_type"),
    [
        pytest.param(urllib3.exceptions.NewConnectionError(None, "http://up.test/base refused"), 502,
                     "upstream_error", id="refused"),
        pytest.param(urllib3.exceptions.ConnectTimeoutError("http://up.test/base"), 504, "timeout_error",
                     id="connect-timeout"),
        pytest.param(urllib3.exceptions.ReadTimeoutError(None, "http://up.test/base", "read timed out"), 504,
                     "timeout_error", id="read-timeout"),
        pytest.param(urllib3.exceptions.ProtocolError("http://up.test/base reset"), 502, "upstream_error",
                     id="reset"),
        pytest.param(ConnectionResetError(104, "reset"), 502, "upstream_error", id="socket-reset"),
    ],
)  # fmt: skip
def test_transport_errors_become_json(
    client: Any, monkeypatch: pytest.MonkeyPatch, error: Exception, status: int, error_type: str
) -> None:
    monkeypatch.setattr(urllib3.HTTPConnectionPool, "urlopen", failing(error))
    answer = client.get("/r")
    assert answer.status_code == status
    body = answer.get_json()
    assert body["error"]["type"] == error_type and body["error"]["code"] == str(status)
    assert "up.test" not in answer.get_data(as_text=True)


def test_unexpected_errors_are_json_without_a_trace(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(urllib3.HTTPConnectionPool, "urlopen", failing(RuntimeError("internal detail")))
    answer = client.get("/r")
    assert answer.status_code == 500
    assert answer.get_json()["error"]["type"] == "internal_server_error"
    assert "internal detail" not in answer.get_data(as_text=True)


def test_heap_trimmed_once_per_trim_every_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(heap, "_trim", lambda pad: calls.append(pad) or 1)
    monkeypatch.setattr(heap, "_since_trim", 0)
    heap.relayed(heap.TRIM_EVERY - 1)
    assert calls == []
    heap.relayed(1)  # the transfer that crosses the mark trims, and the count starts again
    assert calls == [0]
    heap.relayed(heap.TRIM_EVERY // 2)
    heap.relayed(0)
    assert calls == [0]


def test_heap_trim_is_a_no_op_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    def unknown(name: str) -> str:
        raise ValueError(f"unrecognized configuration name: {name}")

    monkeypatch.setattr(heap.os, "confstr", unknown)
    assert heap._load_glibc() is None
    monkeypatch.setattr(heap, "_glibc", None)
    monkeypatch.setattr(heap, "_trim", None)
    heap.relayed(heap.TRIM_EVERY * 2)  # nothing to call, nothing raised
    heap.limit_arenas()


ARENA_PROBE = """
import ctypes, sys, threading
from passthru import heap
if sys.argv[1] == "limit":
    heap.limit_arenas()
ready, done = threading.Barrier(7), threading.Event()
def allocate():
    piece = bytearray(300_000)  # above pymalloc's sizes: from this thread's arena
    ready.wait(10)
    done.wait(10)
threads = [threading.Thread(target=allocate) for _ in range(6)]
for thread in threads:
    thread.start()
ready.wait(10)  # every thread holds its piece at once
ctypes.CDLL(None).malloc_stats()  # one "Arena N:" section per arena, to stderr
done.set()
"""


@pytest.mark.skipif(heap._glibc is None, reason="glibc's arenas only")
def test_threads_share_the_limited_arenas() -> None:
    """Each arena keeps a piece or two of large transfers resident: threads of their own multiplied that."""
    counts = {}
    for mode in ("limit", "default"):
        done = subprocess.run([sys.executable, "-c", ARENA_PROBE, mode], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        counts[mode] = done.stderr.count("Arena ")
    assert counts["limit"] == heap.ARENAS
    assert counts["default"] > heap.ARENAS  # the probe can tell: without the limit, more threads, more arenas


def test_server_settings_are_read_from_the_environment_once() -> None:
    server = read_server_settings(
        {"FORWARDED_ALLOW_IPS": "10.0.0.0/8", "JSON_LOGS": "True", "PROMETHEUS_MULTIPROC_DIR": "/tmp/m"}
    )
    assert server.trusted_proxy("10.1.2.3") and not server.trusted_proxy("127.0.0.1")
    assert server.json_logs and server.metrics_dir == "/tmp/m" and not server.config_accepted
    default = read_server_settings({})
    assert default.trusted_proxy("127.0.0.1") and default.trusted_proxy("::1") and not default.trusted_proxy("10.1.2.3")
    assert not default.json_logs and default.metrics_dir is None
    with pytest.raises(ConfigError, match="FORWARDED_ALLOW_IPS"):
        read_server_settings({"FORWARDED_ALLOW_IPS": "localhost"})
