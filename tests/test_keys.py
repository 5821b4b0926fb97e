"""Virtual keys over HTTP, on real sockets, against a real SQLite file and a real PostgreSQL: the /key/* API and
every rule a pass-through call with `auth: true` follows."""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import requests
import sqlalchemy as sa
from upstream import Upstream, wait_until

from passthru import key_api
from passthru.auth import CACHE_SECONDS, UNKNOWN_READS
from passthru.keystore.records import SpendEntry, Tally
from passthru.keystore.schema import keys
from passthru.keystore.sql import SqlKeyStore, open_store

MASTER = "sk-1234"
ADMIN = {"Authorization": f"Bearer {MASTER}"}
Serve = Callable[..., str]


@dataclass
class Proxy:
    """passthru with virtual keys on, and the calls tests make to it."""

    url: str
    database_url: str

    def admin(self, method: str, path: str, headers: dict[str, str] | None = None, **kw: Any) -> requests.Response:
        return requests.request(
            method, self.url + path, headers=ADMIN if headers is None else headers, timeout=10, **kw
        )

    def generate(self, **fields: Any) -> dict[str, Any]:
        response = self.admin("POST", "/key/generate", json=fields)
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def call(self, key: str, path: str = "/v1/rerank", header: str = "Authorization") -> requests.Response:
        value = f"Bearer {key}" if header == "Authorization" else key
        return requests.post(self.url + path, json={"q": 1}, headers={header: value}, timeout=10)

    def info(self, key: str) -> dict[str, Any]:
        response = self.admin("GET", "/key/info", params={"key": key})
        assert response.status_code == 200, response.text
        return response.json()["info"]  # type: ignore[no-any-return]

    def spend_logs(self, **params: str) -> list[dict[str, Any]]:
        response = self.admin("GET", "/spend/logs", params=params)
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]


def error_of(response: requests.Response) -> dict[str, Any]:
    """The LiteLLM-shaped error body, checked for shape."""
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == str(response.status_code)
    return body["error"]  # type: ignore[no-any-return]


def entries(upstream: Upstream) -> list[dict[str, Any]]:
    return [
        {"path": "/v1/rerank", "target": f"{upstream.url}/v1/rerank", "auth": True, "cost_per_request": 0.25},
        {"path": "/fwd", "target": f"{upstream.url}/echo", "auth": True, "forward_headers": True,
         "include_subpath": True},
        {"path": "/other", "target": f"{upstream.url}/echo", "auth": True},
        {"path": "/v2/a", "target": f"{upstream.url}/echo", "auth": True},
        {"path": "/down", "target": f"{upstream.url}/status/503", "auth": True, "cost_per_request": 1},
        {"path": "/open", "target": f"{upstream.url}/echo"},
    ]  # fmt: skip


@pytest.fixture
def proxy(database_url: str, serve: Serve, upstream: Upstream) -> Proxy:
    # database_url first: fixtures are torn down in reverse, so the server stops before its schema is dropped.
    return Proxy(serve(entries(upstream), master_key=MASTER, database_url=database_url), database_url)


# --- /key/generate and what it shows -------------------------------------------------------------------------


def test_generate_shows_the_key_once(proxy: Proxy) -> None:
    made = proxy.generate(key_alias="team-a", max_budget=10, rpm_limit=60, allowed_routes=["/v1/rerank"],
                          metadata={"team": "a"})  # fmt: skip
    key = made["key"]
    assert key.startswith("sk-") and len(key) > 20
    token = hashlib.sha256(key.encode()).hexdigest()
    assert made["token_id"] == made["token"] == token
    assert made["key_name"] == f"sk-...{key[-4:]}"
    assert (made["key_alias"], made["max_budget"], made["rpm_limit"], made["expires"]) == ("team-a", 10, 60, None)
    assert (made["tpm_limit"], made["budget_duration"], made["budget_reset_at"]) == (None, None, None)
    assert (made["prompt_tokens"], made["completion_tokens"], made["total_tokens"]) == (0, 0, 0)
    assert (made["allowed_routes"], made["metadata"], made["spend"], made["blocked"]) == (
        ["/v1/rerank"],
        {"team": "a"},
        0.0,
        False,
    )
    for response in (proxy.admin("GET", "/key/info", params={"key": key}),
                     proxy.admin("GET", "/key/list", params={"return_full_object": "true"})):  # fmt: skip
        assert response.status_code == 200
        assert key not in response.text  # only its hash and its sk-...abcd name
        assert token in response.text


def test_generate_with_duration_and_a_custom_key(proxy: Proxy) -> None:
    made = proxy.generate(key="sk-my-own-key-0001", duration="1h")
    assert made["key"] == "sk-my-own-key-0001"
    expires = datetime.fromisoformat(made["expires"])
    assert expires.tzinfo is not None
    assert 3590 < (expires - datetime.now(UTC)).total_seconds() <= 3600
    assert proxy.call("sk-my-own-key-0001").status_code == 200


@pytest.mark.parametrize(
    ("duration", "seconds"),
    [
        pytest.param("30s", 30, id="30s"),
        pytest.param("10m", 600, id="10m"),
        pytest.param("2w", 14 * 86400, id="2w"),
        pytest.param("1mo", 30 * 86400, id="1mo"),  # key_api.DURATION_UNITS: a month is 30 days
    ],
)
def test_duration_units_set_the_expiry(proxy: Proxy, duration: str, seconds: int) -> None:
    made = proxy.generate(duration=duration)
    left = (datetime.fromisoformat(made["expires"]) - datetime.now(UTC)).total_seconds()
    assert seconds - 10 < left <= seconds + 1, (duration, made["expires"])  # on the store's clock, just now
    assert proxy.info(made["key"])["expires"] == made["expires"]
    assert proxy.call(made["key"]).status_code == 200  # not expired yet


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        pytest.param({"duration": "10 minutes"}, "duration", id="duration"),
        pytest.param({"duration": 60}, "duration", id="duration-number"),
        pytest.param({"max_budget": "5"}, "max_budget", id="budget-string"),
        pytest.param({"max_budget": -1}, "max_budget", id="budget-negative"),
        pytest.param({"rpm_limit": 1.5}, "rpm_limit", id="rpm-float"),
        pytest.param({"rpm_limit": True}, "rpm_limit", id="rpm-bool"),
        pytest.param({"allowed_routes": "/v1/rerank"}, "allowed_routes", id="routes-string"),
        pytest.param({"allowed_routes": ["v1"]}, "allowed_routes", id="routes-relative"),
        pytest.param({"metadata": [1]}, "metadata", id="metadata"),
        pytest.param({"key": "my-key-1234567"}, "key", id="key-prefix"),
        pytest.param({"key": "sk-short"}, "key", id="key-short"),
        pytest.param({"key": MASTER + "-not"}, None, id="ok-near-master"),
        pytest.param({"tpm_limit": 1.5}, "tpm_limit", id="tpm-float"),
        pytest.param({"budget_duration": "0d"}, "budget_duration", id="budget-period-of-0"),
        pytest.param({"budget_duration": "1 month"}, "budget_duration", id="budget-period-words"),
        pytest.param({"key": "sk-1234567890", "soft_budget": 2}, "soft_budget", id="unsupported-limit"),
    ],
)
def test_generate_refuses_bad_fields(proxy: Proxy, fields: dict[str, Any], param: str | None) -> None:
    response = proxy.admin("POST", "/key/generate", json=fields)
    if param is None:
        assert response.status_code == 200
        return
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == param


def test_generate_refuses_taken_keys_aliases_and_the_master_key(proxy: Proxy) -> None:
    proxy.generate(key="sk-taken-0000001", key_alias="a")
    for fields in ({"key": "sk-taken-0000001"}, {"key_alias": "a"}):
        response = proxy.admin("POST", "/key/generate", json=fields)
        assert response.status_code == 400 and "already" in error_of(response)["message"]
    proxy_with_long_master = proxy.admin("POST", "/key/generate", json={"key": MASTER})
    assert proxy_with_long_master.status_code == 400  # sk-1234 is too short to be a key at all


def test_litellm_fields_that_are_empty_are_accepted(proxy: Proxy) -> None:
    made = proxy.generate(models=[], user_id=None, team_id="", tpm_limit=None, max_parallel_requests=None)
    assert made["key"].startswith("sk-")


# --- the API is the master key's ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/key/generate"), ("GET", "/key/info"), ("POST", "/key/update"), ("POST", "/key/delete"),
     ("GET", "/key/list"), ("POST", "/key/block"), ("POST", "/key/unblock"), ("GET", "/spend/logs"),
     ("GET", "/global/spend/report")],
)  # fmt: skip
def test_only_the_master_key_administers(proxy: Proxy, method: str, path: str) -> None:
    virtual = proxy.generate()["key"]
    for headers, status in (
        ({}, 401),
        ({"Authorization": f"Bearer {virtual}"}, 403),
        ({"x-api-key": virtual}, 403),
        ({"Authorization": "Bearer sk-nope-nope-nope"}, 401),
    ):
        response = proxy.admin(method, path, headers=headers, json={})
        assert response.status_code == status, (headers, response.text)
        assert error_of(response)["type"] == "auth_error"
        assert virtual not in response.text


def test_info_update_block_delete(proxy: Proxy) -> None:
    made = proxy.generate(key_alias="x")
    key, token = made["key"], made["token"]
    assert proxy.info(token)["key_alias"] == "x"  # by hashed token, as LiteLLM accepts
    response = proxy.admin("POST", "/key/update", json={"key": key, "key_alias": "y", "rpm_limit": 5,
                                                        "max_budget": None, "metadata": {"n": 1}})  # fmt: skip
    assert response.status_code == 200, response.text
    assert (response.json()["key_alias"], response.json()["rpm_limit"]) == ("y", 5)
    blocked = proxy.admin("POST", "/key/block", json={"key": key})
    assert blocked.status_code == 200 and blocked.json()["blocked"] is True
    assert proxy.admin("POST", "/key/unblock", json={"key": token}).json()["blocked"] is False
    deleted = proxy.admin("POST", "/key/delete", json={"keys": [key]})
    assert deleted.status_code == 200 and deleted.json() == {"deleted_keys": [key]}
    for method, path, kw in (("GET", "/key/info", {"params": {"key": key}}),
                             ("POST", "/key/update", {"json": {"key": key, "rpm_limit": 1}}),
                             ("POST", "/key/block", {"json": {"key": key}}),
                             ("POST", "/key/delete", {"json": {"keys": [key]}})):  # fmt: skip
        response = proxy.admin(method, path, **kw)
        assert response.status_code == 404 and error_of(response)["type"] == "not_found_error"


@pytest.mark.parametrize(
    ("method", "path", "kw"),
    [
        pytest.param("GET", "/key/info", {}, id="info-no-key"),
        pytest.param("GET", "/key/info", {"params": {"key": "nothing-like-a-key"}}, id="info-bad-key"),
        pytest.param("POST", "/key/update", {"json": {"key": "sk-x-y-z-1234", "blocked": "yes"}}, id="blocked-type"),
        pytest.param("POST", "/key/update", {"json": {"key": "sk-x-y-z-1234", "spend": None}}, id="spend-null"),
        pytest.param("POST", "/key/delete", {"json": {"keys": []}}, id="delete-empty"),
        pytest.param("POST", "/key/delete", {"json": {"keys": "sk-x-y-z-1234"}}, id="delete-string"),
        pytest.param("POST", "/key/generate", {"data": "not json"}, id="not-json"),
        pytest.param("POST", "/key/generate", {"json": [1]}, id="json-list"),
        pytest.param("GET", "/key/list", {"params": {"size": "1000"}}, id="size-too-big"),
        pytest.param("GET", "/key/list", {"params": {"page": "zero"}}, id="page-word"),
        pytest.param("GET", "/spend/logs", {"params": {"start_date": "yesterday"}}, id="bad-date"),
    ],
)
def test_bad_api_requests_are_400(proxy: Proxy, method: str, path: str, kw: dict[str, Any]) -> None:
    response = proxy.admin(method, path, **kw)
    assert response.status_code == 400, response.text
    assert error_of(response)["type"] == "bad_request_error"


def test_delete_is_all_or_nothing(proxy: Proxy) -> None:
    key = proxy.generate()["key"]
    response = proxy.admin("POST", "/key/delete", json={"keys": [key, "sk-never-made-1234"]})
    assert response.status_code == 404
    assert proxy.call(key).status_code == 200


def test_list_is_paginated(proxy: Proxy) -> None:
    made = [proxy.generate(key_alias=f"k{n}") for n in range(5)]
    page = proxy.admin("GET", "/key/list", params={"page": 2, "size": 2}).json()
    assert page["total_count"] == 5 and page["current_page"] == 2 and page["total_pages"] == 3
    assert page["keys"] == [made[2]["token"], made[1]["token"]]  # newest first, hashed tokens only
    full = proxy.admin("GET", "/key/list", params={"key_alias": "k4", "return_full_object": "true"}).json()
    assert [k["key_alias"] for k in full["keys"]] == ["k4"]


def test_api_paths_take_no_other_methods(proxy: Proxy) -> None:
    response = proxy.admin("GET", "/key/generate")
    assert response.status_code == 405 and "POST" in response.headers["Allow"]


# --- a pass-through call with a virtual key ------------------------------------------------------------------


@pytest.mark.parametrize("header", ["Authorization", "x-litellm-api-key", "api-key", "x-api-key", "x-goog-api-key"])
def test_every_header_form_and_the_key_never_goes_upstream(proxy: Proxy, upstream: Upstream, header: str) -> None:
    key = proxy.generate()["key"]
    for path in ("/v1/rerank", "/fwd", "/fwd/deeper"):
        response = proxy.call(key, path, header)
        assert response.status_code == 200, response.text
    assert len(upstream.requests) == 3
    for seen in upstream.requests:
        assert all(key not in value for _, value in seen.headers)


def test_master_key_still_passes_and_touches_no_spend(proxy: Proxy) -> None:
    assert proxy.call(MASTER).status_code == 200
    assert proxy.spend_logs() == []


@pytest.mark.parametrize(
    "make_invalid",
    [
        pytest.param(lambda p, k: None, id="unknown"),
        pytest.param(lambda p, k: p.admin("POST", "/key/delete", json={"keys": [k]}), id="deleted"),
        pytest.param(lambda p, k: p.admin("POST", "/key/block", json={"key": k}), id="blocked"),
        pytest.param(lambda p, k: p.admin("POST", "/key/update", json={"key": k, "duration": "0s"}), id="expired"),
    ],
)
def test_invalid_keys_get_401(proxy: Proxy, upstream: Upstream, make_invalid: Callable[..., Any]) -> None:
    key = proxy.generate()["key"]
    if make_invalid(proxy, key) is None:
        key = "sk-was-never-generated"
    response = proxy.call(key)
    assert response.status_code == 401
    assert error_of(response)["type"] == "auth_error"
    assert key not in response.text
    assert upstream.requests == []


def test_blocked_key_works_again_once_unblocked(proxy: Proxy) -> None:
    key = proxy.generate()["key"]
    proxy.admin("POST", "/key/block", json={"key": key})
    assert proxy.call(key).status_code == 401
    proxy.admin("POST", "/key/unblock", json={"key": key})
    assert proxy.call(key).status_code == 200


def test_a_key_without_limits_is_not_counted_per_call_but_charged_with_its_entries(
    proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No rpm_limit, max_budget or expiry: nothing for the store to decide per call, so no per-call write; the cost
    reaches the key's spend with the spend log entries. A key with any of the three is admitted by the store (one
    call at a time, or leased a few at a time, whose unused calls go back)."""
    asked: list[str] = []
    admit, lease = SqlKeyStore.admit, SqlKeyStore.lease
    monkeypatch.setattr(SqlKeyStore, "admit", lambda self, token, *a: asked.append(token) or admit(self, token, *a))
    monkeypatch.setattr(SqlKeyStore, "lease", lambda self, token, *a: asked.append(token) or lease(self, token, *a))
    free, limited, expiring = proxy.generate()["key"], proxy.generate(rpm_limit=1000)["key"], proxy.generate(
        duration="1h")["key"]  # fmt: skip
    for key in (free, limited, expiring):
        assert [proxy.call(key).status_code for _ in range(4)] == [200] * 4
    tokens = [hashlib.sha256(key.encode()).hexdigest() for key in (free, limited, expiring)]
    # One call admitted, then leases of 2 and 4: three questions for four calls.
    assert asked == [tokens[1]] * 3 + [tokens[2]] * 3
    assert wait_until(lambda: len(proxy.spend_logs()) == 12, 5)
    # Each key pays for its four calls: the leased calls not used are given back within leases.HOLD.
    assert wait_until(lambda: [proxy.info(key)["spend"] for key in (free, limited, expiring)] == [1.0] * 3, 5)
    # Blocked through this worker: refused by it at once (the other workers within CACHE_SECONDS).
    proxy.admin("POST", "/key/block", json={"key": free})
    assert proxy.call(free).status_code == 401
    proxy.admin("POST", "/key/block", json={"key": limited})
    assert proxy.call(limited).status_code == 401


def test_allowed_routes(proxy: Proxy, upstream: Upstream) -> None:
    key = proxy.generate(allowed_routes=["/v1/rerank", "/fwd", "/v2/*"])["key"]
    for path in ("/v1/rerank", "/fwd", "/fwd/sub/path", "/v2/a"):
        assert proxy.call(key, path).status_code == 200, path
    refused = proxy.call(key, "/other")
    assert refused.status_code == 403
    assert error_of(refused)["param"] == "allowed_routes"
    assert len(upstream.requests) == 4


def test_allowed_routes_changes_reach_the_check_within_the_cache_bound(proxy: Proxy) -> None:
    key = proxy.generate(allowed_routes=["/other"])["key"]
    assert proxy.call(key, "/other").status_code == 200
    proxy.admin("POST", "/key/update", json={"key": key, "allowed_routes": ["/v1/rerank"]})
    assert wait_until(lambda: proxy.call(key, "/other").status_code == 403, 1.5)


def test_rpm_limit_is_429_with_retry_after(proxy: Proxy, upstream: Upstream) -> None:
    key = proxy.generate(rpm_limit=2)["key"]
    assert [proxy.call(key).status_code for _ in range(2)] == [200, 200]
    response = proxy.call(key)
    assert response.status_code == 429
    assert error_of(response)["type"] == "rate_limit_error"
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert len(upstream.requests) == 2
    assert proxy.info(key)["spend"] == 0.5  # the refused call cost nothing


def test_budget_exceeded_is_litellms_400(proxy: Proxy, upstream: Upstream) -> None:
    key = proxy.generate(max_budget=0.5)["key"]
    assert [proxy.call(key).status_code for _ in range(2)] == [200, 200]
    response = proxy.call(key)
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "budget_exceeded"
    assert "Budget has been exceeded! Current cost: 0.5, Max budget: 0.5" == error["message"]
    assert proxy.info(key)["spend"] == 0.5
    proxy.admin("POST", "/key/update", json={"key": key, "max_budget": 1})
    assert proxy.call(key).status_code == 200


def test_each_allowed_call_writes_a_spend_log_entry(proxy: Proxy) -> None:
    one, two = proxy.generate()["key"], proxy.generate()["key"]
    assert proxy.call(one).status_code == 200
    assert proxy.call(one, "/down").status_code == 503  # the upstream's answer, relayed and still charged
    assert proxy.call(two, "/other").status_code == 200
    assert wait_until(lambda: len(proxy.spend_logs()) == 3, 5)  # written once each body is done
    logs = proxy.spend_logs(key=one)
    assert [(e["route"], e["status_code"], e["status"], e["spend"]) for e in logs] == [
        ("/down", 503, "failure", 1.0), ("/v1/rerank", 200, "success", 0.25)]  # fmt: skip
    token = hashlib.sha256(one.encode()).hexdigest()
    assert {e["api_key"] for e in logs} == {token}
    assert all(e["call_type"] == "pass_through_endpoint" and e["request_duration_ms"] >= 0 for e in logs)
    assert proxy.spend_logs(api_key=token) == logs  # LiteLLM's parameter name, the hashed token
    assert proxy.info(one)["spend"] == 1.25
    today = datetime.now(UTC).date().isoformat()
    assert len(proxy.spend_logs(start_date=today, end_date=today)) == 3
    assert proxy.spend_logs(start_date="2000-01-01", end_date="2000-01-02") == []


def test_refused_calls_write_no_spend_log(proxy: Proxy) -> None:
    key = proxy.generate(rpm_limit=1, allowed_routes=["/v1/rerank"])["key"]
    assert [proxy.call(key).status_code, proxy.call(key).status_code] == [200, 429]
    assert proxy.call(key, "/other").status_code == 403
    time.sleep(0.2)
    assert len(proxy.spend_logs(key=key)) == 1


def test_routes_without_auth_ignore_keys(proxy: Proxy) -> None:
    response = requests.get(proxy.url + "/open", headers={"Authorization": "Bearer sk-not-a-key-at-all"})
    assert response.status_code == 200


def test_store_down_is_503_and_the_master_key_still_works(
    postgres: str, postgres_url: str, serve: Serve, upstream: Upstream
) -> None:
    proxy = Proxy(serve(entries(upstream), master_key=MASTER, database_url=postgres_url), postgres_url)
    key = proxy.generate()["key"]
    schema = postgres_url.split("search_path%3D")[1].split("&")[0]
    with psycopg.connect(postgres, autocommit=True) as conn:
        conn.execute(f'ALTER SCHEMA "{schema}" RENAME TO "{schema}_away"')
    try:
        response = proxy.call(key)
        assert response.status_code == 503
        assert error_of(response)["type"] == "service_unavailable"
        assert "Traceback" not in response.text and "passthru_keys" not in response.text
        assert proxy.admin("GET", "/key/list").status_code == 503
        assert proxy.call(MASTER).status_code == 200
    finally:
        with psycopg.connect(postgres, autocommit=True) as conn:
            conn.execute(f'ALTER SCHEMA "{schema}_away" RENAME TO "{schema}"')
    assert proxy.call(key).status_code == 200


def test_master_key_alone_keeps_keys_in_passthru_db_in_the_working_directory(
    serve: Serve, upstream: Upstream, tmp_path: Any
) -> None:
    base = serve(entries(upstream), master_key=MASTER)  # no database_url, no DATABASE_URL (conftest clears it)
    proxy = Proxy(base, "sqlite:///passthru.db")
    key = proxy.generate()["key"]
    assert proxy.call(key).status_code == 200
    assert (tmp_path / "passthru.db").exists() and (tmp_path / "passthru.db-wal").exists()


def test_unknown_keys_cost_a_bounded_number_of_store_reads(proxy: Proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key the store does not have is remembered as unknown for CACHE_SECONDS; a flood of new made-up keys costs
    at most UNKNOWN_READS reads a second (then 503), and keys this worker found valid before are not held back."""
    reads: list[str] = []
    find = SqlKeyStore.find
    monkeypatch.setattr(SqlKeyStore, "find", lambda self, token: reads.append(token) or find(self, token))
    known = proxy.generate()["key"]
    assert proxy.call(known).status_code == 200
    session = requests.Session()

    def call(key: str) -> int:
        return session.post(proxy.url + "/v1/rerank", json={}, headers={"Authorization": f"Bearer {key}"},
                            timeout=10).status_code  # fmt: skip

    reads.clear()
    assert [call("sk-made-up-and-repeated") for _ in range(30)] == [401] * 30
    assert len(reads) == 1
    # A key this worker just found unknown, then made through this worker: known at once.
    proxy.generate(key="sk-made-up-and-repeated")
    assert call("sk-made-up-and-repeated") == 200
    reads.clear()
    start = time.monotonic()
    statuses = Counter(call(f"sk-made-up-{n:08d}") for n in range(10 * UNKNOWN_READS))
    seconds = time.monotonic() - start
    assert set(statuses) == {401, 503}, statuses
    # At most UNKNOWN_READS in each second the flood lasted (a slow machine makes it last longer), not one a call:
    # the seconds it touched, the first of which an earlier miss may have begun (the repeated key's, above).
    assert len(reads) <= UNKNOWN_READS * (2 + int(seconds)) and seconds < 9, (len(reads), seconds)
    time.sleep(CACHE_SECONDS)  # the known key's entry is out of date: it is read again, flood or not
    statuses = Counter(call(f"sk-made-up-again-{n:08d}") for n in range(UNKNOWN_READS + 10))
    assert statuses[503] > 0 and call(known) == 200


# --- tokens, budget periods, the spend log's fields and the report ----------------------------------------------


def store_of(proxy: Proxy) -> SqlKeyStore:
    """A store of the test's own on the server's database: what another worker or host writes, the server reads."""
    return open_store(proxy.database_url)


def test_tpm_limit_is_429_with_retry_after_once_the_window_holds_its_tokens(proxy: Proxy) -> None:
    made = proxy.generate(tpm_limit=100)
    assert proxy.info(made["key"])["tpm_limit"] == 100
    assert proxy.call(made["key"]).status_code == 200
    store = store_of(proxy)
    try:
        store.record([], {made["token"]: Tally(total_tokens=100)})  # as the spend writer counts an answer's usage
    finally:
        store.close()
    response = proxy.call(made["key"])
    assert response.status_code == 429
    error = error_of(response)
    retry = int(response.headers["Retry-After"])
    assert 1 <= retry <= 60 and error["type"] == "rate_limit_error"
    assert error["message"] == f"Rate limit exceeded: this key's tpm_limit is reached; retry in {retry}s"
    info = proxy.info(made["key"])
    assert (info["total_tokens"], info["spend"]) == (100, 0.25)  # the refused call cost nothing
    updated = proxy.admin("POST", "/key/update", json={"key": made["key"], "tpm_limit": None})
    assert updated.status_code == 200 and updated.json()["tpm_limit"] is None
    assert proxy.call(made["key"]).status_code == 200


def test_a_budget_period_resets_spend_when_the_key_is_only_read(proxy: Proxy) -> None:
    made = proxy.generate(max_budget=1, budget_duration="1mo")
    reset_at = datetime.fromisoformat(made["budget_reset_at"])
    assert 27 * 86400 < (reset_at - datetime.now(UTC)).total_seconds() <= 31 * 86400  # a calendar month
    assert [proxy.call(made["key"]).status_code for _ in range(5)] == [200] * 4 + [400]  # 4 × 0.25: the budget
    store = store_of(proxy)
    try:
        with store.engine.begin() as conn:  # the period is over
            conn.execute(sa.update(keys).where(keys.c.token == made["token"]).values(budget_reset_at=time.time() - 60))
    finally:
        store.close()
    info = proxy.info(made["key"])  # read, not called
    assert info["spend"] == 0.0 and datetime.fromisoformat(info["budget_reset_at"]) > datetime.now(UTC)
    assert proxy.call(made["key"]).status_code == 200


def test_spend_logs_show_usage_under_litellms_names(proxy: Proxy) -> None:
    made = proxy.generate()
    master = hashlib.sha256(MASTER.encode()).hexdigest()
    now = time.time()
    store = store_of(proxy)
    try:
        store.record([
            SpendEntry("0190a000-0000-7000-8000-000000000001", made["token"], "/v1/rerank", 200, 0.75, now - 3, 1.5,
                       call_id="caller-id-1", model="gpt-4o", prompt_tokens=10, completion_tokens=5, total_tokens=15,
                       target="primary"),
            SpendEntry("0190a000-0000-7000-8000-000000000002", None, "/open", 502, 0.0, now - 2, 0.5, call_id="c2"),
            SpendEntry("0190a000-0000-7000-8000-000000000003", master, "/v1/rerank", 200, 0.25, now - 1, 0.1),
        ])  # fmt: skip
    finally:
        store.close()
    logs = proxy.spend_logs()
    assert [e["request_id"] for e in logs] == ["0190a000-0000-7000-8000-000000000003", "c2", "caller-id-1"]
    assert logs[2] == {
        "request_id": "caller-id-1", "api_key": made["token"], "call_type": "pass_through_endpoint",
        "model": "gpt-4o", "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "spend": 0.75,
        "startTime": datetime.fromtimestamp(now - 3, UTC).isoformat(),
        "endTime": datetime.fromtimestamp(now - 1.5, UTC).isoformat(), "request_duration_ms": 1500.0,
        "status": "success", "status_code": 200, "route": "/v1/rerank", "target": "primary",
    }  # fmt: skip
    assert (logs[1]["api_key"], logs[1]["model"], logs[1]["total_tokens"], logs[1]["status"]) == (None, None, None,
                                                                                                 "failure")  # fmt: skip
    # A key named: its entries only. The master key's calls are logged under its hash, and found by it.
    assert [e["request_id"] for e in proxy.spend_logs(api_key=made["token"])] == ["caller-id-1"]
    assert [e["api_key"] for e in proxy.spend_logs(api_key=MASTER)] == [master]


def report(proxy: Proxy, **params: str) -> requests.Response:
    return proxy.admin("GET", "/global/spend/report", params=params)


def test_the_spend_report_sums_what_the_log_holds(proxy: Proxy) -> None:
    """Per UTC day and per key, route or model: the sums of the log's entries (unknown tokens left out; None when
    no entry of a group knew them), every entry counted once."""
    one, two = proxy.generate()["token"], proxy.generate()["token"]
    today = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    days = [(today.timestamp() - 86400 * back) for back in (2, 1, 0)]
    entries = []
    for n in range(60):
        usage = {
            "model": ("m1", "m2", None)[n % 3],
            "prompt_tokens": n if n % 4 else None,
            "completion_tokens": 2 * n if n % 4 else None,
            "total_tokens": 3 * n if n % 4 else None,
        }
        entries.append(SpendEntry(f"0190a000-0000-7000-8000-{n:012d}", (one, two, None)[n % 3 if n % 5 else 0],
                                  ("/v1/rerank", "/other")[n % 2], 200, 0.25 * n, days[n % 3] + n, 0.1,
                                  **usage))  # type: ignore[arg-type]  # fmt: skip
    store = store_of(proxy)
    try:
        store.record(entries)
    finally:
        store.close()
    logs = proxy.spend_logs(limit="1000")
    assert len(logs) == 60
    for group_by, name, field in (("api_key", "api_keys", "api_key"), ("route", "routes", "route"),
                                  ("model", "models", "model")):  # fmt: skip
        response = report(proxy, start_date=datetime.fromtimestamp(days[0], UTC).date().isoformat(),
                          end_date=today.date().isoformat(), group_by=group_by)  # fmt: skip
        assert response.status_code == 200, response.text
        got = {(day["group_by_day"], row[field]): row for day in response.json() for row in day[name]}
        expected: dict[tuple[str, Any], dict[str, Any]] = {}
        for entry in logs:
            key = (entry["startTime"][:10], entry[field])
            sums = expected.setdefault(key, {"total_spend": 0.0, "api_requests": 0, "prompt_tokens": None,
                                             "completion_tokens": None, "total_tokens": None})  # fmt: skip
            sums["total_spend"] += entry["spend"]
            sums["api_requests"] += 1
            for count in ("prompt_tokens", "completion_tokens", "total_tokens"):
                if entry[count] is not None:
                    sums[count] = (sums[count] or 0) + entry[count]
        assert set(got) == set(expected), group_by
        for key, sums in expected.items():
            row = got[key]
            assert row["total_spend"] == pytest.approx(sums.pop("total_spend")), (group_by, key)
            assert {k: row[k] for k in sums} == sums, (group_by, key)
        assert [day["group_by_day"] for day in response.json()] == sorted({d for d, _ in got})  # days in order
    # Only the days asked for: today's entries alone.
    only_today = report(proxy, start_date=today.date().isoformat(), end_date=today.date().isoformat())
    assert [day["group_by_day"] for day in only_today.json()] == [today.date().isoformat()]
    assert sum(row["api_requests"] for row in only_today.json()[0]["api_keys"]) == 20


@pytest.mark.parametrize(
    ("params", "param"),
    [
        pytest.param({"end_date": "2026-01-31"}, "start_date", id="no-start"),
        pytest.param({"start_date": "2026-01-01"}, "end_date", id="no-end"),
        pytest.param({"start_date": "2025-01-01", "end_date": "2026-01-02"}, "end_date", id="over-366-days"),
        pytest.param({"start_date": "2026-01-02", "end_date": "2025-12-31"}, "end_date", id="backwards"),
        pytest.param({"start_date": "2026-01-01", "end_date": "2026-01-02", "group_by": "team"}, "group_by",
                     id="litellm-team"),
    ],
)  # fmt: skip
def test_the_spend_report_is_bounded(proxy: Proxy, params: dict[str, str], param: str) -> None:
    response = report(proxy, **params)
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == param


def test_a_report_with_too_many_rows_is_refused_not_cut_short(proxy: Proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(key_api, "MAX_REPORT_ROWS", 2)
    now = time.time()
    store = store_of(proxy)
    try:
        store.record([SpendEntry(f"0190a000-0000-7000-8000-{n:012d}", None, f"/r{n}", 200, 1.0, now, 0.1)
                      for n in range(3)])  # fmt: skip
    finally:
        store.close()
    today = datetime.now(UTC).date().isoformat()
    assert report(proxy, start_date=today, end_date=today, group_by="api_key").status_code == 200  # one row
    response = report(proxy, start_date=today, end_date=today, group_by="route")  # three
    assert response.status_code == 400 and "narrow the dates" in error_of(response)["message"]
