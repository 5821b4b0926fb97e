"""Which route serves a path: resolved once, then the longest configured path that owns it, with that route's
auth, methods, allowed_routes and cost — never a broader route's policy for a narrower route's target."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import Gunicorn, start_gunicorn, write_config
from upstream import Upstream, start_upstream, wait_until
from wire import Reply, exchange, port_of

from passthru.errors import RequestError
from passthru.paths import PLAIN_PATH, ResolvedPath, raw_path, resolve_path, resolve_path_slowly

MASTER = "sk-master-routes"
ADMIN = {"Authorization": f"Bearer {MASTER}"}


# --- resolving the path, without a server ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "decoded", "encoded", "trailing"),
    [
        pytest.param("/", (), (), False, id="root"),
        pytest.param("/a/b", ("a", "b"), ("a", "b"), False, id="plain"),
        pytest.param("/a/b/", ("a", "b"), ("a", "b"), True, id="trailing-slash"),
        pytest.param("/a/./b", ("a", "b"), ("a", "b"), False, id="dot"),
        pytest.param("/a/x/../b", ("a", "b"), ("a", "b"), False, id="dotdot"),
        pytest.param("/a/x/%2E%2e/b", ("a", "b"), ("a", "b"), False, id="encoded-dotdot-any-case"),
        pytest.param("/a/x/.%2E/b", ("a", "b"), ("a", "b"), False, id="half-encoded-dotdot"),
        pytest.param("/a//b", ("a", "b"), ("a", "b"), False, id="empty-segment"),
        pytest.param("//a/b", ("a", "b"), ("a", "b"), False, id="leading-empty-segment"),
        pytest.param("/a/b/.", ("a", "b"), ("a", "b"), True, id="dot-last"),
        pytest.param("/a/b/x/..", ("a", "b"), ("a", "b"), True, id="dotdot-last"),
        pytest.param("/a/%61dmin", ("a", "admin"), ("a", "admin"), False, id="encoded-letter"),
        pytest.param("/a%20b/%25", ("a b", "%"), ("a%20b", "%25"), False, id="escapes"),
        pytest.param("/%c3%a9", ("\xc3\xa9",), ("%C3%A9",), False, id="utf8-bytes-as-wsgi-latin1"),
        pytest.param("/m/g:generate", ("m", "g:generate"), ("m", "g:generate"), False, id="colon"),
    ],
)
def test_resolve_path(raw: str, decoded: tuple[str, ...], encoded: tuple[str, ...], trailing: bool) -> None:
    assert resolve_path(raw) == ResolvedPath(decoded, encoded, trailing)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("/..", id="above-the-root"),
        pytest.param("/a/../..", id="above-the-root-later"),
        pytest.param("/a%2Fb", id="encoded-slash"),
        pytest.param("/a%2fb", id="encoded-slash-lower"),
        pytest.param("/a%5cb", id="encoded-backslash"),
        pytest.param("/a\\b", id="backslash"),
        pytest.param("/a%252fb", id="double-encoded-slash"),
        pytest.param("/%252e%252e/b", id="double-encoded-dotdot"),
        pytest.param("/a/..;x/b", id="dotdot-with-parameters"),
        pytest.param("/a/%2e%2e%3bx/b", id="encoded-dotdot-with-parameters"),
        pytest.param("/a%00b", id="nul"),
        pytest.param("/a%0d%0ab", id="crlf"),
        pytest.param("/a%7fb", id="del"),
    ],
)
def test_resolve_path_refuses(raw: str) -> None:
    with pytest.raises(RequestError):
        resolve_path(raw)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        pytest.param({"RAW_URI": "/a%2Fb?x=1", "PATH_INFO": "/a/b"}, "/a%2Fb", id="gunicorn"),
        pytest.param({"REQUEST_URI": "/a%2Fb", "PATH_INFO": "/a/b"}, "/a%2Fb", id="request-uri"),
        pytest.param({"RAW_URI": "http://h/a/../b?q", "PATH_INFO": "/a/../b"}, "/a/../b", id="absolute-form"),
        pytest.param({"RAW_URI": "/p/a", "SCRIPT_NAME": "/p", "PATH_INFO": "/a"}, "/a", id="script-name"),
        # No raw target, or one a middleware changed: PATH_INFO's text, its % taken literally.
        pytest.param({"PATH_INFO": "/a%2e"}, "/a%252e", id="no-raw-target"),
        pytest.param({"RAW_URI": "/other", "PATH_INFO": "/a"}, "/a", id="rewritten"),
    ],
)
def test_raw_path(environ: dict[str, str], expected: str) -> None:
    assert raw_path(environ) == expected


# --- two overlapping routes with different policies, through real gunicorn -------------------------------------


@dataclass
class Rig:
    server: Gunicorn
    upstream: Upstream
    free: str  # a virtual key that may call every route
    api_only: str  # a virtual key whose allowed_routes is ["/api"]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    directory = tmp_path_factory.mktemp("routes")
    upstream = start_upstream()
    entries: list[dict[str, Any]] = [
        # The narrower route first in the YAML here; test_yaml_order_does_not_matter has it the other way.
        {"path": "/api/admin", "target": f"{upstream.url}/narrow", "auth": True, "methods": ["GET"],
         "cost_per_request": 0.5},
        {"path": "/api", "target": f"{upstream.url}/broad", "include_subpath": True},
    ]  # fmt: skip
    config = write_config(directory, entries, master_key=MASTER)
    server = start_gunicorn(config, directory / "gunicorn.log", {"DATABASE_URL": f"sqlite:///{directory}/k.db"})
    try:
        keys = []
        for fields in ({"key_alias": "free"}, {"key_alias": "api-only", "allowed_routes": ["/api"]}):
            response = requests.post(f"{server.url}/key/generate", json=fields, headers=ADMIN, timeout=10)
            assert response.status_code == 200, response.text
            keys.append(response.json()["key"])
        yield Rig(server, upstream, *keys)
    finally:
        server.stop()
        upstream.stop()


def send(rig: Rig, method: str, target: str, key: str | None = None) -> Reply:
    """A raw request (the target exactly as written, as curl --path-as-is sends it)."""
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    head = f"{method} {target} HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nConnection: close\r\n{auth}\r\n{{}}"
    return exchange(port_of(rig.server), head.encode())


def spend_routes(rig: Rig) -> list[str]:
    """The routes of the free key's spend log entries (its calls are the only ones charged here), newest first."""
    params = {"key": rig.free}
    logs = requests.get(f"{rig.server.url}/spend/logs", params=params, headers=ADMIN, timeout=10).json()
    return [entry["route"] for entry in logs]


# Each spelling and the route whose policy must apply: "narrow" (/api/admin), "broad" (/api's sub-path),
# or the status when it is refused before any route is chosen.
SPELLINGS = [
    pytest.param("/api/admin", "narrow", id="exact"),
    pytest.param("/api/x/../admin", "narrow", id="dotdot"),
    pytest.param("/api/x/%2e%2E/admin", "narrow", id="encoded-dotdot"),
    pytest.param("/api/./admin", "narrow", id="dot"),
    pytest.param("/api//admin", "narrow", id="empty-segment"),
    pytest.param("//api/admin", "narrow", id="leading-empty-segment"),
    pytest.param("/api/%61dmin", "narrow", id="encoded-letter"),
    pytest.param("/other/../api/admin", "narrow", id="dotdot-from-outside"),
    pytest.param("/api/admin/x/..", 404, id="dotdot-to-a-trailing-slash"),
    pytest.param("/api/admin/.", 404, id="dot-last"),
    pytest.param("/api/admin/", 404, id="trailing-slash"),
    pytest.param("/api/ADMIN", 400, id="other-case"),
    pytest.param("/api/admin;x=1", 400, id="path-parameter"),
    pytest.param("/api/admin%2F", 400, id="encoded-slash"),
    pytest.param("/api/x/..%2Fadmin", 400, id="encoded-slash-after-dotdot"),
    pytest.param("/api/other", "broad", id="a-real-sub-path"),
    pytest.param("/api/admin/more", "broad", id="below-the-exact-route"),
    pytest.param("/api/admin/more/../../other", "broad", id="dotdot-back-into-the-broad-route"),
]


@pytest.mark.parametrize(("target", "owner"), SPELLINGS)
def test_the_route_that_owns_the_resolved_path_applies_its_policy(rig: Rig, target: str, owner: str | int) -> None:
    calls = [
        ("POST", None),  # the narrow route serves GET only, and needs a key
        ("GET", None),
        ("GET", rig.api_only),  # allowed_routes: ["/api"]
        ("GET", rig.free),
    ]
    charged = len(spend_routes(rig))
    results = []
    for method, key in calls:
        before = len(rig.upstream.requests)
        status = send(rig, method, target, key).status
        hits = [seen.target for seen in rig.upstream.requests[before:]]
        results.append((status, hits))
    if owner == "narrow":
        assert results == [(405, []), (401, []), (403, []), (200, ["/narrow"])]
        assert wait_until(lambda: len(spend_routes(rig)) > charged, 3)
        assert spend_routes(rig)[0] == "/api/admin"
    elif owner == "broad":
        assert [status for status, _ in results] == [200, 200, 200, 200], results
        assert all(len(hits) == 1 and hits[0].startswith("/broad/") for _, hits in results), results
        time.sleep(0.3)  # the spend writer's interval is 0.1 s: long enough for an entry that should not be there
        assert len(spend_routes(rig)) == charged  # /api is open: nothing is charged
    else:
        assert results == [(owner, [])] * 4


def test_a_method_the_narrow_route_does_not_serve_gets_its_405(rig: Rig) -> None:
    reply = send(rig, "DELETE", "/api/admin", rig.free)
    assert reply.status == 405
    assert reply.header("Allow") == ["GET, HEAD"]


def test_yaml_order_does_not_matter(upstream: Upstream, tmp_path: Path) -> None:
    """The broader route first in the YAML: the longest configured path still wins."""
    from passthru import create_app

    entries: list[dict[str, Any]] = [
        {"path": "/api", "target": f"{upstream.url}/broad", "include_subpath": True},
        {"path": "/api/admin", "target": f"{upstream.url}/narrow", "auth": True, "methods": ["GET"]},
    ]
    client = create_app(write_config(tmp_path, entries, master_key=MASTER)).test_client()
    assert client.get("/api/x/../admin").status_code == 401
    assert client.post("/api/admin").status_code == 405
    assert client.get("/api/admin", headers=ADMIN).status_code == 200
    assert [seen.target for seen in upstream.requests] == ["/narrow"]


def test_passthrus_own_paths_are_not_reached_through_dot_segments(rig: Rig) -> None:
    """werkzeug matches them on the raw path; a spelling with dot segments is the route table's, which has none."""
    assert send(rig, "POST", "/key/generate", MASTER).status == 200  # the real path answers
    assert send(rig, "POST", "/api/../key/generate", MASTER).status == 404


def test_the_plain_path_shortcut_agrees_with_the_full_resolution() -> None:
    """resolve_path skips the segment-by-segment work for plain paths: on any path, it must not change the answer."""
    pieces = ["a", "B", "v1", ".", "..", "...", ".x", "x.", "%2e", "%2E", "%41", "%2f", ";p", "a;b", ":", "~", "-", ""]
    rng = random.Random(13)
    plain = 0
    for _ in range(5000):
        raw = "/" + "/".join(rng.choice(pieces) for _ in range(rng.randint(0, 5)))
        if PLAIN_PATH.fullmatch(raw):
            plain += 1
        try:
            expected: ResolvedPath | str = resolve_path_slowly(raw)
        except RequestError:
            expected = "refused"
        try:
            got: ResolvedPath | str = resolve_path(raw)
        except RequestError:
            got = "refused"
        assert got == expected, raw
    assert plain > 500  # the shortcut was taken often enough to be tested
