"""Each forwarding rule, through real sockets: the client → passthru (werkzeug, threaded) → the fake upstream."""

from __future__ import annotations

import base64
import gzip
import hashlib
import hmac
import json
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlencode

import pytest
import requests
from upstream import GZIP_TEXT, RERANK_RESPONSE, Upstream, wait_until

from passthru import auth, key_api
from passthru.server import heap

SEED_QUERY = {
    "model": "rerank-english-v3.0",
    "query": "What is the capital of the United States?",
    "top_n": 3,
    "documents": ["Carson City is the capital city of the American state of Nevada."],
}
Serve = Callable[..., str]


def raw_request(base: str, request: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes to passthru and read until it closes (the request asks for Connection: close)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def error_of(response: requests.Response) -> dict[str, object]:
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == str(response.status_code)
    return body["error"]  # type: ignore[no-any-return]


# --- the seed page's tutorials, verbatim ---------------------------------------------------------------------


def test_seed_cohere_rerank(serve: Serve, upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COHERE_API_KEY", "co-test-key")
    base = serve(
        [
            {
                "path": "/v1/rerank",
                "target": f"{upstream.url}/v1/rerank",
                "headers": {
                    "Authorization": "bearer os.environ/COHERE_API_KEY",
                    "content-type": "application/json",
                    "accept": "application/json",
                },
            }
        ],
        master_key="sk-1234",
    )
    body = json.dumps(SEED_QUERY).encode()
    response = requests.post(
        f"{base}/v1/rerank",
        data=body,
        headers={"accept": "application/json", "content-type": "application/json"},
    )
    assert response.status_code == 200
    assert response.json() == RERANK_RESPONSE
    (seen,) = upstream.requests
    assert seen.method == "POST" and seen.target == "/v1/rerank"
    assert seen.header("Authorization") == "bearer co-test-key"
    assert seen.header("content-type") == "application/json"
    assert seen.body_sha256 == hashlib.sha256(body).hexdigest()  # relayed byte for byte, not re-serialised


def test_seed_langfuse_ingestion(serve: Serve, upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    public, secret = upstream.langfuse_auth
    monkeypatch.setenv("LANGFUSE_DEV_PUBLIC_KEY", public)
    monkeypatch.setenv("LANGFUSE_DEV_SK_KEY", secret)
    base = serve(
        [
            {
                "path": "/api/public/ingestion",
                "target": f"{upstream.url}/api/public/ingestion",
                "headers": {
                    "LANGFUSE_PUBLIC_KEY": "os.environ/LANGFUSE_DEV_PUBLIC_KEY",
                    "LANGFUSE_SECRET_KEY": "os.environ/LANGFUSE_DEV_SK_KEY",
                },
            }
        ],
        master_key="sk-1234",
    )
    # The Langfuse SDK authenticates to passthru with "anything" keys; passthru replaces them.
    anything = base64.b64encode(b"anything:anything").decode()
    response = requests.post(
        f"{base}/api/public/ingestion", json={"batch": []}, headers={"Authorization": f"Basic {anything}"}
    )
    assert response.status_code == 207
    assert response.json()["errors"] == []
    (seen,) = upstream.requests
    assert seen.header("LANGFUSE_PUBLIC_KEY") is None and seen.header("LANGFUSE_SECRET_KEY") is None


@pytest.fixture
def auth_base(serve: Serve, upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("COHERE_API_KEY", "co-test-key")
    return serve(
        [
            {
                "path": "/v1/rerank",
                "target": f"{upstream.url}/v1/rerank",
                "auth": True,
                "headers": {
                    "Authorization": "bearer os.environ/COHERE_API_KEY",
                    "content-type": "application/json",
                },
            },
            {"path": "/fwd", "target": f"{upstream.url}/echo", "auth": True, "forward_headers": True},
        ],
        master_key="sk-1234",
    )


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"Authorization": "Bearer sk-1234"}, id="bearer"),
        pytest.param({"x-litellm-api-key": "sk-1234"}, id="x-litellm-api-key"),
        pytest.param({"x-litellm-api-key": "Bearer sk-1234"}, id="x-litellm-api-key-bearer"),
        pytest.param({"api-key": "sk-1234"}, id="api-key"),
        pytest.param({"x-api-key": "sk-1234"}, id="x-api-key"),
        pytest.param({"x-goog-api-key": "sk-1234"}, id="x-goog-api-key"),
    ],
)
def test_auth_accepts_every_header_form(auth_base: str, upstream: Upstream, headers: dict[str, str]) -> None:
    response = requests.post(f"{auth_base}/v1/rerank", json=SEED_QUERY, headers=headers)
    assert response.status_code == 200, response.text
    response = requests.post(f"{auth_base}/fwd", json=SEED_QUERY, headers=headers)
    assert response.status_code == 200, response.text
    for seen in upstream.requests:  # the caller's key went nowhere, even with forward_headers
        assert all("sk-1234" not in value for _, value in seen.headers)
    assert upstream.requests[0].header("Authorization") == "bearer co-test-key"


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="none"),
        pytest.param({"Authorization": "Bearer sk-12345"}, id="wrong"),
        pytest.param({"Authorization": "Basic sk-1234"}, id="not-bearer"),
        pytest.param({"Authorization": "Bearer "}, id="empty"),
        pytest.param({"x-api-key": "SK-1234"}, id="case"),
    ],
)
def test_auth_refuses_missing_or_wrong_keys(auth_base: str, upstream: Upstream, headers: dict[str, str]) -> None:
    response = requests.post(f"{auth_base}/v1/rerank", json=SEED_QUERY, headers=headers)
    assert response.status_code == 401
    assert error_of(response)["type"] == "auth_error"
    assert "sk-1234" not in response.text
    assert upstream.requests == []


def test_keys_are_compared_as_sha256_digests_in_constant_time(
    serve: Serve, upstream: Upstream, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every check of a caller's key (a route, forward_headers, /metrics, the key API) is hmac.compare_digest on two
    32-byte sha256 digests, never on the key: neither its length nor how much of it matches shows in the time."""
    master, wrong = "sk-ct-master-0001", "sk-ct-wrong-00002"
    compared: list[tuple[object, object]] = []

    def recording(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return hmac.compare_digest(a, b)

    for module in (auth, key_api):
        monkeypatch.setattr(module, "hmac", SimpleNamespace(compare_digest=recording))
    base = serve([{"path": "/secure", "target": f"{upstream.url}/echo", "auth": True},
                  {"path": "/open", "target": f"{upstream.url}/echo", "forward_headers": True}],
                 master_key=master, metrics_require_auth=True,
                 database_url=f"sqlite:///{tmp_path / 'keys.db'}")  # fmt: skip
    calls = [
        ("POST", "/secure", master, {}, 200),
        ("POST", "/secure", wrong, {}, 401),
        ("GET", "/open", master, {}, 200),  # forward_headers: the master key is found, and not relayed
        ("GET", "/metrics", master, {}, 200),
        ("GET", "/metrics", wrong, {}, 401),
        ("POST", "/key/generate", master, {}, 200),
        ("POST", "/key/generate", wrong, {}, 401),
        ("POST", "/key/generate", master, {"key": master}, 400),  # a new key may not be the master key
    ]
    for method, path, key, body, status in calls:
        before = len(compared)
        response = requests.request(method, f"{base}{path}", headers={"x-api-key": key}, json=body, timeout=10)
        assert response.status_code == status, (path, key, response.text)
        assert len(compared) > before, f"{method} {path} checked the key without compare_digest"
    assert upstream.requests[-1].header("x-api-key") is None
    sides = [side for pair in compared for side in pair]
    assert all(isinstance(side, bytes) and len(side) == 32 for side in sides), compared
    assert {hashlib.sha256(key.encode()).digest() for key in (master, wrong)} <= set(sides)


# --- request: URL, query, headers, body ----------------------------------------------------------------------


def test_query_is_forwarded_as_sent(serve: Serve, upstream: Upstream) -> None:
    base = serve([{"path": "/e", "target": f"{upstream.url}/echo"}])
    query = "a=1&a=2&empty=&flag&sp=x+y&enc=%2F%3D&b=%C3%A9"
    assert requests.get(f"{base}/e?{query}").status_code == 200
    assert upstream.requests[0].target == f"/echo?{query}"


def test_target_query_and_default_query_params(serve: Serve, upstream: Upstream) -> None:
    base = serve(
        [
            {
                "path": "/e",
                "target": f"{upstream.url}/echo?v=2",
                "default_query_params": {"api-version": "2024-01-01", "mode": "fast"},
            }
        ]
    )
    requests.get(f"{base}/e?mode=slow&x=1")
    requests.get(f"{base}/e")
    assert [seen.target for seen in upstream.requests] == [
        "/echo?v=2&mode=slow&x=1&api-version=2024-01-01",
        "/echo?v=2&api-version=2024-01-01&mode=fast",
    ]


@pytest.mark.parametrize(
    ("path", "forwarded"),
    [
        pytest.param("/e", "/echo", id="exact"),
        pytest.param("/e/", "/echo/", id="trailing-slash"),
        pytest.param("/e/a/b.json", "/echo/a/b.json", id="nested"),
        pytest.param("/e/a/../b", "/echo/b", id="dotdot-inside"),
        pytest.param("/e/./a/", "/echo/a/", id="dot"),
        pytest.param("/e/models/gemini:generate", "/echo/models/gemini:generate", id="colon"),
        pytest.param("/e/a%20b/%25", "/echo/a%20b/%25", id="escapes-kept"),
        pytest.param("/e//a", "/echo/a", id="empty-segment-merged"),
        pytest.param("/e/a/..", "/echo/", id="dotdot-last-ends-in-a-slash"),
        pytest.param("/e/%C3%A9t%C3%A9", "/echo/%C3%A9t%C3%A9", id="utf8-escapes"),
    ],
)
def test_subpaths_stay_inside_the_target(serve: Serve, upstream: Upstream, path: str, forwarded: str) -> None:
    base = serve([{"path": "/e", "target": f"{upstream.url}/echo", "include_subpath": True}])
    response = raw_request(base, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert response.startswith(b"HTTP/1.1 200"), response[:200]
    assert upstream.requests[-1].target == forwarded


@pytest.mark.parametrize(
    ("path", "status"),
    [
        # Resolved before a route is chosen: what lands outside every route is not found.
        pytest.param("/e/../etc/passwd", 404, id="dotdot"),
        pytest.param("/e/%2e%2e/etc/passwd", 404, id="encoded-dotdot"),
        pytest.param("/e/a/%2E%2E/%2e%2e/x", 404, id="encoded-dotdot-deeper"),
        # What cannot be resolved, or hides a slash, is refused.
        pytest.param("/e/../../etc", 400, id="dotdot-above-the-root"),
        pytest.param("/e/a%2Fb", 400, id="encoded-slash"),
        pytest.param("/e/%252e%252e/x", 400, id="double-encoded-dotdot"),
        pytest.param("/e/a%5c..%5cb", 400, id="encoded-backslash"),
        pytest.param("/e/a%252fb", 400, id="double-encoded-slash"),
        pytest.param("/e/a%00b", 400, id="nul"),
    ],
)
def test_subpath_traversal_is_refused(serve: Serve, upstream: Upstream, path: str, status: int) -> None:
    base = serve([{"path": "/e", "target": f"{upstream.url}/echo/inner", "include_subpath": True}])
    response = raw_request(base, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert response.split(b" ", 2)[1] == str(status).encode(), response[:200]
    assert upstream.requests == []


def test_without_include_subpath_only_the_exact_path_is_served(serve: Serve, upstream: Upstream) -> None:
    base = serve([{"path": "/e", "target": f"{upstream.url}/echo"}])
    response = requests.get(f"{base}/e/more")
    assert response.status_code == 404
    assert error_of(response)["type"] == "not_found_error"
    assert requests.get(f"{base}/nowhere").status_code == 404
    assert upstream.requests == []


def test_methods_limit_and_405_with_allow(serve: Serve, upstream: Upstream) -> None:
    base = serve([{"path": "/e", "target": f"{upstream.url}/echo", "methods": ["POST"]}])
    response = requests.get(f"{base}/e")
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"
    error_of(response)
    assert requests.post(f"{base}/e", data=b"x").status_code == 200


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
def test_every_default_method_is_forwarded(serve: Serve, upstream: Upstream, method: str) -> None:
    base = serve([{"path": "/e", "target": f"{upstream.url}/echo"}])
    response = requests.request(method, f"{base}/e")
    assert response.status_code == 200
    assert upstream.requests[-1].method == method


def test_default_headers_only(serve: Serve, upstream: Upstream) -> None:
    base = serve([{"path": "/e", "target": f"{upstream.url}/echo", "headers": {"X-Injected": "yes"}}])
    requests.post(
        f"{base}/e",
        data=b"{}",
        headers={"Content-Type": "application/json", "Accept": "text/plain", "X-Custom": "1", "Cookie": "c=1",
                 "Authorization": "Bearer caller", "X-Injected": "caller"},
    )  # fmt: skip
    seen = upstream.requests[-1]
    names = {name.lower() for name, _ in seen.headers}
    assert names >= {"content-type", "accept", "x-injected", "x-forwarded-for", "content-length"}
    assert not names & {"x-custom", "cookie", "authorization"}
    assert seen.header("X-Injected") == "yes"
    assert seen.header("Host") == upstream.url.removeprefix("http://")
    assert seen.header("X-Forwarded-For") == "127.0.0.1"


def test_forward_headers_relays_all_but_hop_by_hop(
    serve: Serve, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "192.0.2.1")  # this client is not a trusted front
    base = serve(
        [
            {
                "path": "/e",
                "target": f"{upstream.url}/echo",
                "forward_headers": True,
                "headers": {"X-Set": "ours"},
            }
        ]
    )
    request = (
        "GET /e HTTP/1.1\r\nHost: passthru.example\r\nConnection: close, X-Private\r\nX-Private: p\r\n"
        "Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic x\r\nX-Custom: 1\r\n"
        "Authorization: Bearer for-upstream\r\nX-Set: caller\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
    )
    assert raw_request(base, request.encode()).startswith(b"HTTP/1.1 200")
    seen = upstream.requests[-1]
    names = {name.lower() for name, _ in seen.headers}
    assert not names & {"x-private", "keep-alive", "te", "proxy-authorization"}
    assert seen.header("Connection") != "close, X-Private"
    assert seen.header("X-Custom") == "1"
    assert seen.header("Authorization") == "Bearer for-upstream"  # no auth on this route: it is the upstream's
    assert seen.header("X-Set") == "ours"
    assert seen.header("Host") == upstream.url.removeprefix("http://")
    assert seen.header("X-Forwarded-For") == "127.0.0.1"
    assert seen.header("X-Forwarded-Host") == "passthru.example"


def test_master_key_is_stripped_even_on_routes_without_auth(serve: Serve, upstream: Upstream) -> None:
    base = serve([{"path": "/e", "target": f"{upstream.url}/echo", "forward_headers": True}], master_key="sk-1234")
    requests.get(f"{base}/e", headers={"Authorization": "Bearer sk-1234", "x-api-key": "upstream-key"})
    seen = upstream.requests[-1]
    assert seen.header("Authorization") is None
    assert seen.header("x-api-key") == "upstream-key"


def body_pieces(total: int, piece: int = 10_000) -> Iterator[bytes]:
    for start in range(0, total, piece):
        yield bytes([start % 251]) * min(piece, total - start)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_upload_streams_byte_for_byte(serve: Serve, upstream: Upstream, chunked: bool) -> None:
    base = serve([{"path": "/e", "target": f"{upstream.url}/echo"}])
    expected = hashlib.sha256(b"".join(body_pieces(1_000_000))).hexdigest()
    body = body_pieces(1_000_000) if chunked else b"".join(body_pieces(1_000_000))
    response = requests.post(f"{base}/e", data=body)
    assert response.status_code == 200
    seen = upstream.requests[-1]
    assert (seen.body_len, seen.body_sha256) == (1_000_000, expected)
    assert (seen.header("Transfer-Encoding") == "chunked") is chunked
    assert (seen.header("Content-Length") is None) is chunked


def test_bytes_both_ways_count_towards_the_heap_trim(
    serve: Serve, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted: list[int] = []
    monkeypatch.setattr(heap, "relayed", counted.append)
    base = serve([{"path": "/e", "target": f"{upstream.url}/echo"}])
    response = requests.post(f"{base}/e", data=b"x" * 1_000_000)
    assert response.status_code == 200
    # Counted when the server closes the answer, just after the caller has read it.
    assert wait_until(lambda: counted == [1_000_000 + len(response.content)], 5), counted


@pytest.mark.parametrize(
    "framing",
    [
        pytest.param("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", id="cl-and-te"),
        pytest.param("Content-Length: -5\r\n", id="negative"),
        pytest.param("Content-Length: 5x\r\n", id="not-a-number"),
    ],
)
def test_malformed_framing_gets_400(serve: Serve, upstream: Upstream, framing: str) -> None:
    base = serve([{"path": "/e", "target": f"{upstream.url}/echo"}])
    request = f"POST /e HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{framing}\r\n5\r\nhello\r\n0\r\n\r\n"
    response = raw_request(base, request.encode())
    assert response.startswith(b"HTTP/1.1 400"), response[:200]
    assert upstream.requests == []


# --- response: status, headers, body --------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 207, 400, 401, 404, 429, 500, 503])
def test_status_and_body_relayed(serve: Serve, upstream: Upstream, status: int) -> None:
    base = serve([{"path": "/s", "target": f"{upstream.url}/status", "include_subpath": True}])
    response = requests.get(f"{base}/s/{status}")
    assert response.status_code == status
    assert response.json() == {"status": status}


@pytest.mark.parametrize("status", [204, 304])
def test_bodiless_statuses(serve: Serve, upstream: Upstream, status: int) -> None:
    base = serve([{"path": "/s", "target": f"{upstream.url}/status", "include_subpath": True}])
    response = raw_request(base, f"GET /s/{status} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status}".encode())
    assert body == b""
    assert b"content-type" not in head.lower()  # nothing invented


def test_head_has_no_body_and_keeps_content_length(serve: Serve, upstream: Upstream) -> None:
    base = serve([{"path": "/e", "target": f"{upstream.url}/echo"}])
    response = raw_request(base, b"HEAD /e HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length" in head
    assert body == b""


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirects_relayed_not_followed(serve: Serve, upstream: Upstream, status: int) -> None:
    base = serve([{"path": "/s", "target": f"{upstream.url}/status", "include_subpath": True}])
    response = requests.post(f"{base}/s/{status}?location=https://elsewhere.example/x", allow_redirects=False)
    assert response.status_code == status
    assert response.headers["Location"] == "https://elsewhere.example/x"
    assert len(upstream.requests) == 1


def test_repeated_set_cookie_kept_and_never_shared(serve: Serve, upstream: Upstream) -> None:
    base = serve(
        [
            {"path": "/c", "target": f"{upstream.url}/cookies"},
            {"path": "/e", "target": f"{upstream.url}/echo"},
        ]
    )
    response = raw_request(base, b"GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head = response.partition(b"\r\n\r\n")[0].decode()
    assert [line for line in head.split("\r\n") if line.lower().startswith("set-cookie")] == [
        "Set-Cookie: a=1; Path=/",
        "Set-Cookie: b=2; Path=/",
    ]
    requests.get(f"{base}/e")  # the next caller must not get the first caller's cookies
    assert upstream.requests[-1].header("Cookie") is None


def test_gzip_passes_through_untouched(serve: Serve, upstream: Upstream) -> None:
    base = serve([{"path": "/g", "target": f"{upstream.url}/gzip"}])
    response = requests.get(f"{base}/g", headers={"Accept-Encoding": "gzip"}, stream=True)
    raw = response.raw.read(decode_content=False)
    assert response.headers["Content-Encoding"] == "gzip"
    assert int(response.headers["Content-Length"]) == len(raw)
    assert gzip.decompress(raw).decode() == GZIP_TEXT
    assert upstream.requests[-1].header("Accept-Encoding") == "gzip"


def head_fields(response: bytes) -> list[tuple[str, str]]:
    """The header fields of a raw answer, in order, repeats kept: (lower-case name, value)."""
    lines = response.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]
    return [(name.strip().lower(), value.strip()) for name, _, value in (line.partition(":") for line in lines)]


# Connection-specific fields an upstream may send (RFC 9110 §7.6.1), one named only by the upstream's Connection
# header, and one ordinary field that must still come through.
HOP_BY_HOP_ANSWER = {
    "Keep-Alive": "timeout=5, max=100",
    "Proxy-Authenticate": "Basic realm=upstream",
    "Proxy-Connection": "keep-alive",
    "TE": "trailers",
    "Trailer": "X-Checksum",
    "Upgrade": "h2c",
    "Connection": "keep-alive, X-Hop-Named",
    "X-Hop-Named": "named in Connection",
    "X-Kept": "end to end",
}


def test_hop_by_hop_response_headers_dropped(serve: Serve, upstream: Upstream) -> None:
    target = f"{upstream.url}/headers?{urlencode(HOP_BY_HOP_ANSWER)}"
    sent = requests.get(target, timeout=5).headers  # the upstream really sends every one of them
    assert all(sent.get(name) == value for name, value in HOP_BY_HOP_ANSWER.items()), sent
    base = serve([{"path": "/h", "target": target}])
    fields = head_fields(raw_request(base, b"GET /h HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
    names = {name for name, _ in fields}
    assert ("x-kept", "end to end") in fields
    dropped = {"keep-alive", "proxy-authenticate", "proxy-connection", "te", "trailer", "upgrade", "x-hop-named"}
    assert names & dropped == set(), fields
    # The server writes a Connection header of its own; the upstream's is not relayed into it.
    assert all("x-hop-named" not in value.lower() for name, value in fields if name == "connection"), fields


def test_upstream_date_and_server_are_replaced(serve: Serve, upstream: Upstream) -> None:
    theirs = {"Date": "Thu, 01 Jan 1970 00:00:00 GMT", "Server": "upstream-server/9.9"}
    base = serve([{"path": "/h", "target": f"{upstream.url}/headers?{urlencode(theirs)}"}])
    fields = head_fields(raw_request(base, b"GET /h HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
    dates = [value for name, value in fields if name == "date"]
    servers = [value for name, value in fields if name == "server"]
    assert len(dates) == 1 and len(servers) == 1, fields  # the server's own, once each
    assert abs((parsedate_to_datetime(dates[0]) - datetime.now(UTC)).total_seconds()) < 60, dates
    assert servers != [theirs["Server"]], servers


# --- errors ----------------------------------------------------------------------------------------------------


def test_upstream_refused_is_502_without_internals(serve: Serve) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    base = serve([{"path": "/down", "target": f"http://127.0.0.1:{port}/x"}])
    response = requests.get(f"{base}/down")
    assert response.status_code == 502
    assert error_of(response)["type"] == "upstream_error"
    assert str(port) not in response.text and "Traceback" not in response.text


def test_upstream_timeout_is_504(serve: Serve, upstream: Upstream) -> None:
    base = serve([{"path": "/slow", "target": f"{upstream.url}/stall?phase=headers&seconds=5", "timeout": 0.5}])
    response = requests.get(f"{base}/slow")
    assert response.status_code == 504
    assert error_of(response)["type"] == "timeout_error"


@contextmanager
def never_answering() -> Iterator[str]:
    """A loopback address that never answers a connection: a listener with a backlog of 0 that never accepts, its
    queue filled by one connection. The kernel then drops every new SYN, as a firewalled or vanished host would."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        with socket.create_connection(address, timeout=1):  # the one connection the queue holds
            with socket.socket() as probe, pytest.raises(TimeoutError):  # the trick holds on this machine
                probe.settimeout(0.3)
                probe.connect(address)
            yield f"http://127.0.0.1:{address[1]}/x"


def test_connect_timeout_is_504_at_the_routes_timeout(serve: Serve) -> None:
    with never_answering() as target:
        base = serve([{"path": "/unreachable", "target": target, "timeout": 1}])
        started = time.monotonic()
        response = requests.get(f"{base}/unreachable", timeout=5)
        waited = time.monotonic() - started
    assert response.status_code == 504
    assert error_of(response)["type"] == "timeout_error"
    assert 0.9 <= waited < 2, waited  # the route's 1 s, not the client's 5 s nor the kernel's minutes


@pytest.mark.parametrize("phase", ["headers"])
def test_upstream_reset_before_headers_is_502(serve: Serve, upstream: Upstream, phase: str) -> None:
    base = serve([{"path": "/r", "target": f"{upstream.url}/reset?phase={phase}"}])
    response = requests.get(f"{base}/r")
    assert response.status_code == 502
    error_of(response)


def test_malformed_upstream_status_is_502(serve: Serve, upstream: Upstream) -> None:
    base = serve([{"path": "/m", "target": f"{upstream.url}/malformed"}])
    response = requests.get(f"{base}/m")
    assert response.status_code == 502
    error_of(response)


def test_forwarded_chain_from_a_trusted_front(serve: Serve, upstream: Upstream) -> None:
    # 127.0.0.1 is trusted by default (gunicorn's default FORWARDED_ALLOW_IPS), as nginx on the same host is.
    base = serve([{"path": "/e", "target": f"{upstream.url}/echo"}])
    requests.get(f"{base}/e", headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"})
    seen = upstream.requests[-1]
    assert seen.header("X-Forwarded-For") == "203.0.113.9, 127.0.0.1"
    assert seen.header("X-Forwarded-Proto") == "https"
