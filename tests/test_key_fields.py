"""Hostile input to the key API (key_fields.py), on SQLite and PostgreSQL: every field out of range or of the wrong type
is a 400 naming it, nothing is written, and no value of any field of any operation gets a 5xx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from conftest import write_config
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from passthru import create_app
from passthru.key_fields import MAX_BODY_BYTES
from passthru.keystore.records import NewKey, SpendEntry

MASTER = "sk-1234"
ADMIN = {"Authorization": f"Bearer {MASTER}"}
EXISTING = "sk-existing-key-0001"  # made by the `api` fixture: /key/update, block and unblock reach the store
REPORT = "/global/spend/report"


@pytest.fixture
def api(database_url: str, tmp_path: Path) -> Iterator[FlaskClient]:
    """The key API of an app on this backend's store (Flask's test client: thousands of calls stay quick)."""
    entries = [{"path": "/v1/rerank", "target": "http://127.0.0.1:9/v1/rerank", "auth": True}]
    app = create_app(write_config(tmp_path, entries, master_key=MASTER, database_url=database_url))
    client = app.test_client()
    try:
        made = client.post("/key/generate", json={"key": EXISTING, "key_alias": "existing", "rpm_limit": 5,
                                                  "metadata": {"team": "a"}}, headers=ADMIN)  # fmt: skip
        assert made.status_code == 200, made.text
        yield client
    finally:
        app.extensions["passthru.key_store"].close()


def send(api: FlaskClient, method: str, path: str, fields: Any) -> Any:
    """A body operation gets `fields` as JSON (NaN and Infinity included, as Python's json writes them); a query
    operation gets each field as text (JSON for what is not a string)."""
    if method == "POST":
        return api.post(path, data=json.dumps(fields), headers={**ADMIN, "Content-Type": "application/json"})
    query = {name: value if isinstance(value, str) else json.dumps(value) for name, value in fields.items()}
    # A lone surrogate goes as the bytes UTF-8 would give it: invalid UTF-8, as a hostile client may send.
    return api.get(path, query_string=urlencode(query, errors="surrogatepass"), headers=ADMIN)


def everything(api: FlaskClient) -> Any:
    """Every key as /key/list shows it, whole: what must not change when a call is refused."""
    response = api.get("/key/list", query_string={"return_full_object": "true", "size": "100"}, headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json


def error_of(response: Any) -> dict[str, Any]:
    """LiteLLM's error shape, checked."""
    assert response.mimetype == "application/json"
    body = response.json
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == str(response.status_code)
    return body["error"]  # type: ignore[no-any-return]


def deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


BAD_FIELDS = [
    ("duration", "99999999999w"),  # the report: a 500 after the key was made, then /key/list broken for everyone
    ("duration", "36501d"),  # past 100 years
    ("duration", "9" * 5000 + "s"),  # int() refuses 4,300 digits or more
    ("duration", "1h\n"),
    ("duration", 3600),
    ("max_budget", 1e16),
    ("max_budget", 10**400),  # a JSON integer with no float: math.isfinite raised OverflowError
    ("max_budget", float("nan")),
    ("max_budget", float("inf")),
    ("max_budget", -1),
    ("max_budget", "5"),
    ("rpm_limit", 1e23),
    ("rpm_limit", 10**23),  # SQLite's INTEGER holds 64 bits
    ("rpm_limit", 2**31),  # PostgreSQL's integer holds 32
    ("rpm_limit", 1.5),
    ("rpm_limit", True),
    ("tpm_limit", 2**31),
    ("tpm_limit", -1),
    ("tpm_limit", "100"),
    ("budget_duration", "0s"),  # a period that would never end
    ("budget_duration", "36501d"),
    ("budget_duration", "1217mo"),  # months count as 30 days against the bound, as for duration
    ("budget_duration", "1mo\n"),
    ("budget_duration", 86400),
    ("key_alias", "a\x00b"),  # PostgreSQL refuses NUL in text (was a 503)
    ("key_alias", "\ud800"),  # a lone surrogate, from JSON's "\ud800": cannot be encoded (was a 500)
    ("key_alias", "x" * 256),
    ("key_alias", 5),
    ("key_alias", ""),
    ("allowed_routes", ["/a\x00"]),
    ("allowed_routes", [1]),
    ("allowed_routes", ["/v1"] * 101),
    ("allowed_routes", ["/" + "a" * 1024]),
    ("allowed_routes", "/v1/rerank"),
    ("metadata", {"a": float("nan")}),  # PostgreSQL's json refuses NaN (was a 503)
    ("metadata", {"a": "\ud800"}),
    ("metadata", {"a": "x" * 5000}),
    ("metadata", deep(17)),
    ("metadata", [1]),
]


@pytest.mark.parametrize(("name", "value"), [pytest.param(n, v, id=f"{n}-{i}") for i, (n, v) in enumerate(BAD_FIELDS)])
def test_a_bad_field_is_400_naming_it_and_nothing_is_written(api: FlaskClient, name: str, value: Any) -> None:
    before = everything(api)
    for path, fields in (("/key/generate", {name: value}), ("/key/update", {"key": EXISTING, name: value})):
        response = send(api, "POST", path, fields)
        assert response.status_code == 400, (path, response.text)
        error = error_of(response)
        assert error["param"] == name and error["type"] == "bad_request_error"
    assert everything(api) == before


@pytest.mark.parametrize(
    ("method", "path", "fields", "param"),
    [
        pytest.param("POST", "/key/generate", {"key": "sk-abcdefgh12\n"}, "key", id="custom-key-newline"),
        pytest.param("POST", "/key/update", {"key": EXISTING, "spend": 1e16}, "spend", id="spend-huge"),
        pytest.param("POST", "/key/update", {"key": EXISTING, "spend": -1}, "spend", id="spend-negative"),
        pytest.param("POST", "/key/update", {"key": "sk-\ud800", "rpm_limit": 1}, "key", id="update-surrogate"),
        pytest.param("POST", "/key/block", {"key": "sk-a\x00b"}, "key", id="block-nul"),
        pytest.param("POST", "/key/unblock", {"key": ["sk-x"]}, "key", id="unblock-list"),
        pytest.param("POST", "/key/delete", {"keys": [EXISTING] * 101}, "keys", id="delete-too-many"),
        pytest.param("POST", "/key/delete", {"keys": [EXISTING, "sk-\ud800"]}, "keys", id="delete-surrogate"),
        pytest.param("POST", "/key/generate", {"team_id": "\ud800" * 100}, "team_id", id="unsupported-field"),
        pytest.param("GET", "/key/info", {"key": "sk-" + "a" * 2000}, "key", id="info-key-too-long"),
        pytest.param("GET", "/key/list", {"page": "10000000000"}, "page", id="page-huge"),
        pytest.param("GET", "/key/list", {"page": "1_0"}, "page", id="page-underscore"),
        pytest.param("GET", "/key/list", {"size": "101"}, "size", id="size-huge"),
        pytest.param("GET", "/key/list", {"key_alias": "a\x00"}, "key_alias", id="list-alias-nul"),
        pytest.param("GET", "/spend/logs", {"limit": "10001"}, "limit", id="limit-huge"),
        pytest.param("GET", "/spend/logs", {"api_key": "sk-\x00"}, "api_key", id="api-key-nul"),
        pytest.param("GET", "/spend/logs", {"end_date": "10000-01-01"}, "end_date", id="year-10000"),
        pytest.param(
            "GET", REPORT, {"start_date": "9999-12-31", "end_date": "10000-01-01"}, "end_date", id="report-10000"
        ),
        pytest.param(
            "GET", REPORT, {"start_date": "0001-01-01", "end_date": "9999-12-31"}, "end_date", id="report-long"
        ),
        pytest.param(
            "GET",
            REPORT,
            {"start_date": "2026-01-01", "end_date": "2026-01-01", "group_by": "customer"},
            "group_by",
            id="report-customer",
        ),  # fmt: skip
    ],
)
def test_every_operation_names_the_bad_field(
    api: FlaskClient, method: str, path: str, fields: dict[str, Any], param: str
) -> None:
    before = everything(api)
    response = send(api, method, path, fields)
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == param
    assert everything(api) == before


def test_bodies_too_deep_or_too_big_are_4xx(api: FlaskClient) -> None:
    deep_body = "[" * 30_000 + "]" * 30_000  # json.loads gives up with RecursionError (was a 500)
    response = api.post("/key/generate", data=deep_body, headers={**ADMIN, "Content-Type": "application/json"})
    assert response.status_code == 400 and error_of(response)["type"] == "bad_request_error"
    big = json.dumps({"metadata": {"a": "x" * MAX_BODY_BYTES}})
    response = api.post("/key/generate", data=big, headers={**ADMIN, "Content-Type": "application/json"})
    assert response.status_code == 413 and error_of(response)["type"] == "bad_request_error"


def test_the_bounds_themselves_are_accepted(api: FlaskClient) -> None:
    fields = {"duration": "36500d", "max_budget": 1e15, "rpm_limit": 2**31 - 1, "key_alias": "é" * 255,
              "allowed_routes": ["/" + "a" * 1023] * 100, "metadata": deep(15), "tpm_limit": 2**31 - 1,
              "budget_duration": "36500d"}  # fmt: skip
    made = send(api, "POST", "/key/generate", fields)
    assert made.status_code == 200, made.text
    assert made.json["rpm_limit"] == made.json["tpm_limit"] == 2**31 - 1
    assert made.json["expires"].startswith(("2126-", "2127-")) and made.json["budget_reset_at"][:4] in ("2126", "2127")
    updated = send(api, "POST", "/key/update", {"key": made.json["key"], "spend": 1e15, "duration": "1200mo",
                                                "budget_duration": "0001200mo"})  # fmt: skip
    assert updated.status_code == 200, updated.text
    assert updated.json["budget_duration"] == "1200mo"  # stored as it is meant
    report = send(api, "GET", "/global/spend/report", {"start_date": "9999-01-01", "end_date": "9999-12-31"})
    assert report.status_code == 200 and report.json == []  # 365 days, up to the last a date holds
    assert everything(api)["total_count"] == 2


def test_spend_logs_up_to_the_last_day_a_date_holds(api: FlaskClient) -> None:
    """end_date counts its whole day: the day after 9999-12-31 overflowed a date (was a 500)."""
    store = api.application.extensions["passthru.key_store"].open()
    store.keys.record([SpendEntry("00000000-0000-7000-8000-000000000001", "ab" * 32, "/v1/rerank", 200, 0.5,
                                  253402300000.0 - 10, 0.1)])  # fmt: skip  # 9999-12-31T23:46:30Z
    response = send(api, "GET", "/spend/logs", {"start_date": "9999-12-31", "end_date": "9999-12-31"})
    assert response.status_code == 200, response.text
    assert [entry["spend"] for entry in response.json] == [0.5]


def test_a_stored_expiry_no_date_can_hold_still_lists(api: FlaskClient) -> None:
    """A key made before durations were bounded (its expiry past year 9999) no longer breaks /key/list."""
    store = api.application.extensions["passthru.key_store"].open()
    store.keys.create(NewKey(token="cd" * 32, key_name="sk-...old1", duration=99999999999 * 7 * 86400.0))
    shown = {key["token"]: key for key in everything(api)["keys"]}
    assert shown["cd" * 32]["expires"] == "9999-12-31T23:59:59.999999+00:00"


# --- any value in any field of any operation --------------------------------------------------------------------

OPERATIONS = {
    ("POST", "/key/generate"): ("key", "key_alias", "duration", "max_budget", "rpm_limit", "allowed_routes",
                                "metadata", "models", "tpm_limit", "budget_duration"),
    ("POST", "/key/update"): ("key", "key_alias", "duration", "max_budget", "spend", "rpm_limit", "allowed_routes",
                              "metadata", "blocked", "team_id", "tpm_limit", "budget_duration"),
    ("POST", "/key/delete"): ("keys",),
    ("POST", "/key/block"): ("key",),
    ("POST", "/key/unblock"): ("key",),
    ("GET", "/key/info"): ("key",),
    ("GET", "/key/list"): ("page", "size", "key_alias", "return_full_object"),
    ("GET", "/spend/logs"): ("key", "api_key", "start_date", "end_date", "limit"),
    ("GET", "/global/spend/report"): ("start_date", "end_date", "group_by"),
}  # fmt: skip

ZONES = [None, UTC, timezone(timedelta(hours=14)), timezone(-timedelta(hours=14))]
# Strings that look almost right are where the edge cases are: random text rarely spells a duration or a date.
ALMOST = st.one_of(
    st.builds("{}{}".format, st.integers(-1, 10**25), st.sampled_from(["s", "m", "h", "d", "w", "mo", ""])),
    st.dates().map(str),
    st.datetimes(timezones=st.sampled_from(ZONES)).map(lambda moment: moment.isoformat()),
    st.sampled_from([EXISTING, "sk-", "sk-\x00", "\ud800", "a\udfff", "9999-12-31", "0001-01-01", "NaN", "1e400",
                     "-0", "/v1/rerank", "true", "existing"]),
    st.text(min_size=200, max_size=2000),
    st.text(st.characters(codec="utf-8"), max_size=20).map(lambda s: "sk-" + s),
)  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**30, max_value=2**80) | st.integers(max_value=-1),
    st.sampled_from([10**400, 2**31 - 1, 2**31, 2**63, 1e15, 1e23, 5e-324]),
    st.floats(),  # NaN and the infinities included
    st.text(max_size=30),
    ALMOST,
)
VALUES = st.one_of(
    SCALARS,
    st.recursive(
        SCALARS,
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
        max_leaves=12,
    ),
)


UNITS = st.sampled_from(["s", "m", "h", "d", "w", "mo", "", "x"])
DIGITS = st.integers(-1, 10**25).map(str) | st.text("0123456789_ -+e", max_size=30)
EDGES = st.sampled_from(["9999-12-31", "0001-01-01", "10000-01-01", "9999-12-31T23:59:59-14:00", "2026-02-30"])
DATES = EDGES | st.dates().map(str) | st.datetimes(timezones=st.sampled_from(ZONES)).map(lambda m: m.isoformat())
# Per field, values that are almost right: random JSON rarely spells a duration, a date or a page number.
NEAR: dict[str, st.SearchStrategy[Any]] = {
    "duration": st.sampled_from(["99999999999w", "36501d", "9" * 30 + "s", "1h\n"])
    | st.builds("{}{}".format, st.integers(-1, 10**25), UNITS),
    "max_budget": st.floats() | st.integers(min_value=10**14),
    "spend": st.floats() | st.integers(min_value=10**14),
    "rpm_limit": st.integers(min_value=2**30) | st.floats(),
    "tpm_limit": st.integers(min_value=2**30) | st.floats(),
    "budget_duration": st.sampled_from(["0s", "0mo", "36501d", "1201mo", "1mo\n", "1200mo", "29d"])
    | st.builds("{}{}".format, st.integers(-1, 10**25), UNITS),
    "group_by": st.sampled_from(["api_key", "route", "model", "team", "customer", ""]),
    "key_alias": st.text(st.characters(codec="utf-8"), min_size=200, max_size=300) | st.sampled_from(["a\x00", ""]),
    "allowed_routes": st.lists(st.text(max_size=5).map(lambda text: "/" + text), max_size=120),
    "metadata": st.recursive(st.floats() | st.text(max_size=600), lambda inner: st.dictionaries(st.text(max_size=3),
                                                                                                inner, max_size=3)),
    "key": st.sampled_from([EXISTING, "sk-\x00zzzzzzzzz", "sk-" + "a" * 201])
    | st.text(max_size=80).map("sk-{}".format),
    "keys": st.lists(st.sampled_from([EXISTING, "sk-\ud800", "f" * 64, 1]), max_size=120),
    "page": DIGITS,
    "size": DIGITS,
    "limit": DIGITS,
    "start_date": DATES,
    "end_date": DATES,
}  # fmt: skip


def fields_of(operation: tuple[str, str]) -> st.SearchStrategy[dict[str, Any]]:
    """Any subset of the operation's fields, each with any JSON value or an almost right one."""
    return st.fixed_dictionaries(
        {}, optional={name: VALUES | NEAR[name] if name in NEAR else VALUES for name in OPERATIONS[operation]}
    )


# One run per operation, so each gets its share of examples. Derandomized: CI runs the same examples every time, and
# no example database is kept between runs.
@pytest.mark.parametrize("operation", sorted(OPERATIONS), ids=lambda operation: operation[1].strip("/"))
@settings(max_examples=75, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(data=st.data())
def test_no_value_of_any_field_gets_a_5xx(api: FlaskClient, operation: tuple[str, str], data: st.DataObject) -> None:
    """The fields together, then each alone (the first bad field would hide the others). The store is shared by the
    examples (the health check would say so): what one writes, the next reads."""
    method, path = operation
    fields = data.draw(fields_of(operation))
    alone = [{name: value, **({"key": EXISTING} if path == "/key/update" and name != "key" else {})}
             for name, value in fields.items()]  # fmt: skip
    for sent in (fields, *alone):
        response = send(api, method, path, sent)
        assert response.status_code < 500, (sent, response.status_code, response.text)
        assert response.mimetype == "application/json"
        if response.status_code >= 400:
            error_of(response)
    everything(api)
    assert send(api, "GET", "/spend/logs", {}).status_code == 200
