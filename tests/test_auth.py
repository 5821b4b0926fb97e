"""The caller's key: where it is read, which headers carry it, and which routes it may call."""

from __future__ import annotations

import pytest

from passthru.auth import digest, headers_carrying, read_key, route_allowed


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
