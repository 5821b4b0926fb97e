"""The admin page over HTTP, without a browser (tests/test_ui_browser.py has one): the session and its expiry, CSRF,
the login limit, the security headers, escaping, and that its figures are the store's."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from conftest import free_port
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from upstream import Upstream

from passthru.auth import digest
from passthru.keystore.records import SpendEntry
from passthru.ui import SECURITY_HEADERS
from passthru.ui.session import secret_of

MASTER = "ui-test-master-key-0123456789"  # not sk- shaped: the log's key pattern would not mask it by itself
ADMIN = {"Authorization": f"Bearer {MASTER}"}
XSS = "<img src=x onerror=alert(1)>"
Serve = Callable[..., str]


class Page:
    """A browser-like client of the admin page: one cookie jar, no redirects followed unless asked."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = requests.Session()

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.http.get(self.url + path, allow_redirects=False, timeout=10, **kw)

    def post(self, path: str, data: dict[str, Any] | None = None, **kw: Any) -> requests.Response:
        return self.http.post(self.url + path, data=data or {}, allow_redirects=False, timeout=10, **kw)

    def login(self, key: str = MASTER, **kw: Any) -> requests.Response:
        return self.post("/ui/login", {"key": key}, **kw)

    def csrf(self, path: str = "/ui/keys") -> str:
        found = re.search(r'name="csrf" value="([0-9a-f]{64})"', self.get(path).text)
        assert found, "no CSRF token on the page"
        return found.group(1)


def routes(upstream: Upstream) -> list[dict[str, Any]]:
    return [{"path": "/v1/rerank", "target": f"{upstream.url}/v1/rerank", "auth": True, "cost_per_request": 0.25},
            {"path": "/x&y'z", "target": f"{upstream.url}/echo"}]  # fmt: skip


@pytest.fixture
def url(serve: Serve, upstream: Upstream) -> str:
    return serve(routes(upstream), master_key=MASTER)


def make_key(url: str, **fields: Any) -> dict[str, Any]:
    made = requests.post(f"{url}/key/generate", json=fields, headers=ADMIN, timeout=10)
    assert made.status_code == 200, made.text
    return made.json()  # type: ignore[no-any-return]


def info(url: str, token: str) -> dict[str, Any] | None:
    answer = requests.get(f"{url}/key/info", params={"key": token}, headers=ADMIN, timeout=10)
    return answer.json()["info"] if answer.status_code == 200 else None


def test_pages_need_a_session_and_the_login_gives_a_strict_http_only_cookie(url: str) -> None:
    page = Page(url)
    for path in ("/ui", "/ui/keys", "/ui/usage", "/ui/routes", "/ui/logs"):
        answer = page.get(path)
        assert (answer.status_code, answer.headers["Location"]) == (303, "/ui/login"), path
    assert page.post("/ui/keys/new", {"key_alias": "x"}).status_code == 403
    assert page.post("/ui/logout").status_code == 403
    answer = page.login()
    assert (answer.status_code, answer.headers["Location"]) == (303, "/ui/keys")
    cookie = answer.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui;" in cookie and "Max-Age=43200" in cookie
    assert "Secure" not in cookie  # plain HTTP from a client that is not a trusted front
    assert page.get("/ui/keys").status_code == 200
    assert page.post("/ui/logout", {"csrf": page.csrf()}).status_code == 303
    assert page.get("/ui/keys").status_code == 303


def test_the_cookie_is_secure_when_a_trusted_front_says_https(url: str, serve: Serve, upstream: Upstream,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    https = {"X-Forwarded-Proto": "https"}
    assert "; Secure" in Page(url).login(headers=https).headers["Set-Cookie"]  # 127.0.0.1 is trusted by default
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "10.1.2.3")
    untrusted = serve(routes(upstream), master_key=MASTER)
    assert "Secure" not in Page(untrusted).login(headers=https).headers["Set-Cookie"]


def test_a_virtual_key_cannot_log_in(url: str) -> None:
    key = make_key(url, key_alias="not-an-admin")["key"]
    answer = Page(url).login(key)
    assert answer.status_code == 401 and "Set-Cookie" not in answer.headers
    assert "That is not the master key." in answer.text


class Lines(logging.Handler):
    """passthru's log records as their messages, one each (the server's threads share stderr, where lines of two
    threads can interleave)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines = Lines()
    logging.getLogger("passthru").addHandler(lines)
    try:
        yield lines.lines
    finally:
        logging.getLogger("passthru").removeHandler(lines)


def test_failed_logins_are_limited_per_client_and_logged_without_the_key(url: str, log_lines: list[str]) -> None:
    page = Page(url)
    one, other = {"X-Forwarded-For": "203.0.113.5"}, {"X-Forwarded-For": "203.0.113.6"}  # from a trusted front
    for attempt in range(10):
        assert page.login(f"guess-number-{attempt}", headers=one).status_code == 401
    refused = page.login(headers=one)
    assert refused.status_code == 429 and "Set-Cookie" not in refused.headers  # even the right key, for a minute
    assert page.login(headers=other).status_code == 303  # another address is not held back
    logged = "\n".join(log_lines)
    assert logged.count("admin page: failed login from 203.0.113.5") == 10
    assert "login refused for 203.0.113.5" in logged
    assert "guess-number" not in logged and MASTER not in logged


def test_every_state_change_needs_this_sessions_csrf_token(url: str) -> None:
    token = make_key(url, key_alias="kept", rpm_limit=5)["token"]
    page, other = Page(url), Page(url)
    page.login(), other.login()
    foreign = other.csrf()
    for path, data in [(f"/ui/keys/{token}/block", {}), (f"/ui/keys/{token}/delete", {}),
                       (f"/ui/keys/{token}", {"key_alias": "changed", "rpm_limit": "7"}),
                       ("/ui/keys/new", {"key_alias": "made"})]:  # fmt: skip
        for csrf in (None, "", foreign, "0" * 64):
            sent = data if csrf is None else {**data, "csrf": csrf}
            answer = page.post(path, sent)
            assert answer.status_code == 403, (path, csrf)
            assert "nothing was changed" in answer.text
    kept = info(url, token)
    assert kept is not None and (kept["blocked"], kept["key_alias"], kept["rpm_limit"]) == (False, "kept", 5)
    listed = requests.get(f"{url}/key/list", headers=ADMIN, timeout=10).json()
    assert listed["total_count"] == 1
    assert page.post(f"/ui/keys/{token}/block", {"csrf": page.csrf()}).status_code == 303
    assert info(url, token)["blocked"] is True  # type: ignore[index]


def test_get_never_changes_anything(url: str) -> None:
    token = make_key(url, key_alias="stays")["token"]
    page = Page(url)
    page.login()
    for path in (f"/ui/keys/{token}/block", f"/ui/keys/{token}/unblock", "/ui/logout"):
        assert page.get(path).status_code == 405, path
    assert "Delete the key stays?" in page.get(f"/ui/keys/{token}/delete").text
    assert page.get(f"/ui/keys/{token}", params={"key_alias": "changed", "rpm_limit": "1"}).status_code == 200
    assert info(url, token)["key_alias"] == "stays"  # type: ignore[index]


def _cookie(master: str, age: float) -> str:
    """A session cookie minted `age` seconds ago (negative: in the future), signed as the page signs them."""

    class Then(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time() - age)

    return URLSafeTimedSerializer(secret_of(master), salt="session", signer=Then).dumps({"n": "x" * 24})


@pytest.mark.parametrize(
    ("master", "age", "admitted"),
    [
        pytest.param(MASTER, 3600 - 60, True, id="within-the-hour"),
        pytest.param(MASTER, 3600 + 5, False, id="past-the-hour"),
        pytest.param(MASTER, -120, False, id="from-the-future"),
        pytest.param("the-previous-master-key", 60, False, id="another-master-key"),
    ],
)
def test_a_session_lasts_its_setting_from_the_login(serve: Serve, upstream: Upstream, monkeypatch: pytest.MonkeyPatch,
                                                    master: str, age: float, admitted: bool) -> None:  # fmt: skip
    monkeypatch.setenv("PASSTHRU_UI_SESSION", "1h")
    page = Page(serve(routes(upstream), master_key=MASTER))
    page.http.cookies.set("passthru_ui", _cookie(master, age), path="/ui")
    assert page.get("/ui/keys").status_code == (200 if admitted else 303)
    assert "Max-Age=3600" in page.login().headers["Set-Cookie"]


def test_security_headers_on_every_kind_of_answer(url: str) -> None:
    page = Page(url)
    answers = [page.get("/ui/login"), page.get("/ui/keys"), page.get("/ui/static/ui.css"), page.login("wrong")]
    page.login()
    answers += [page.get("/ui/keys"), page.get("/ui/keys/" + "0" * 64), page.post("/ui/keys/new", {"csrf": "x"})]
    for answer in answers:
        assert {name: answer.headers.get(name) for name in SECURITY_HEADERS} == SECURITY_HEADERS, answer.url
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["Referrer-Policy"] == "no-referrer"
        policy = answer.headers["Content-Security-Policy"]
        assert "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy and "script-src 'self'" in policy
    assert answers[4].headers["Cache-Control"] == "no-store"
    assert answers[5].status_code == 404 and "There is no such key" in answers[5].text


def test_every_user_string_is_escaped_wherever_it_is_shown(url: str) -> None:
    made = make_key(url, key_alias=XSS, metadata={"note": XSS})
    call = requests.post(f"{url}/v1/rerank", json={}, headers={"Authorization": f"Bearer {made['key']}"}, timeout=10)
    assert call.status_code == 200
    page = Page(url)
    page.login()
    entry = _wait_for_entries(page, 1)[0]
    shown = [page.get(path).text for path in (
        "/ui/keys", f"/ui/keys?alias={XSS}", f"/ui/keys/{made['token']}", f"/ui/keys/{made['token']}/delete",
        "/ui/usage", "/ui/logs", f"/ui/logs/{entry}", f"/ui/logs?key={XSS}", "/ui/routes")]  # fmt: skip
    for text in shown:
        assert XSS not in text and "<img" not in text
    for text in shown[:8]:
        assert "&lt;img src=x onerror=alert(1)&gt;" in text
    assert "/x&amp;y&#39;z" in shown[-1] and "/x&y'z" not in shown[-1]  # a route's path


def _wait_for_entries(page: Page, count: int, **params: str) -> list[str]:
    """The entry ids the logs page links to, once it lists `count` (the spend log is written within ~0.1 s)."""
    deadline = time.monotonic() + 10
    while True:
        found = re.findall(r'href="/ui/logs/([0-9a-f-]{36})"', page.get("/ui/logs", params=params).text)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_keys_made_edited_and_deleted_through_the_forms(url: str) -> None:
    page = Page(url)
    page.login()
    bad = page.post("/ui/keys/new", {"csrf": page.csrf(), "key_alias": "a", "rpm_limit": "many"})
    assert bad.status_code == 400 and "rpm_limit must be a whole number" in bad.text and 'value="many"' in bad.text
    made = page.post("/ui/keys/new", {"csrf": page.csrf(), "key_alias": "team-a", "max_budget": "2.5",
                                      "budget_duration": "1mo", "route": "/v1/rerank", "other_routes": "/v2/*\n",
                                      "metadata": '{"team": "a"}'})  # fmt: skip
    key = re.search(r'id="new-key" value="(sk-[^"]+)"', made.text).group(1)  # type: ignore[union-attr]
    token = digest(key).hex()
    stored = info(url, token)
    assert stored is not None and stored["allowed_routes"] == ["/v1/rerank", "/v2/*"]
    assert (stored["max_budget"], stored["budget_duration"], stored["metadata"]) == (2.5, "1mo", {"team": "a"})
    reset_at = stored["budget_reset_at"]
    assert key not in page.get("/ui/keys").text and key not in page.get(f"/ui/keys/{token}").text
    form = {"csrf": page.csrf(), "key_alias": "team-a", "max_budget": "", "budget_duration": "1mo", "rpm_limit": "60",
            "route": "/v1/rerank", "other_routes": "/v2/*", "metadata": '{"team": "a"}'}  # fmt: skip
    saved = page.post(f"/ui/keys/{token}", form)
    assert (saved.status_code, saved.headers["Location"]) == (303, f"/ui/keys/{token}?saved=1")
    stored = info(url, token)
    assert stored is not None and (stored["max_budget"], stored["rpm_limit"]) == (None, 60)
    assert stored["budget_reset_at"] == reset_at  # an unchanged budget_duration does not restart its period
    assert page.post(f"/ui/keys/{token}/delete", {"csrf": page.csrf()}).status_code == 303
    assert info(url, token) is None


def test_the_key_table_pages_and_filters_by_part_of_the_alias(url: str) -> None:
    for n in range(55):
        make_key(url, key_alias=f"svc-{n:02d}" if n % 5 else f"Batch-{n:02d}")
    page = Page(url)
    page.login()
    first, second = page.get("/ui/keys").text, page.get("/ui/keys?page=2").text
    assert "55 keys" in first and "Page 1 of 2" in first and first.count("<tr") == 51
    assert second.count("<tr") == 6 and "svc-01" in second and "svc-54" in first  # newest first
    batch = page.get("/ui/keys?alias=batch").text
    assert "11 keys" in batch and "svc-" not in batch
    assert "0 keys" in page.get("/ui/keys?alias=%25").text  # a % is a character, not a wildcard


def test_usage_totals_equal_the_spend_logs_and_logs_filter(url: str, upstream: Upstream) -> None:
    made = make_key(url, key_alias="payer")
    virtual = {"Authorization": f"Bearer {made['key']}"}
    for headers in (virtual, virtual, ADMIN):
        assert requests.post(f"{url}/v1/rerank", json={}, headers=headers, timeout=10).status_code == 200
    assert requests.get(f"{url}/x&y'z", timeout=10).status_code == 200
    assert requests.post(f"{url}/v1/rerank", json={}, timeout=10).status_code == 401  # refused: not logged
    page = Page(url)
    page.login()
    assert len(_wait_for_entries(page, 4)) == 4
    logs = requests.get(f"{url}/spend/logs", headers=ADMIN, timeout=10).json()
    usage = page.get("/ui/usage").text
    summary = re.search(r"<strong>([0-9.,]+)</strong> spent in\s+<strong>([0-9,]+)</strong> calls", usage)
    assert summary is not None
    assert (float(summary.group(1)), int(summary.group(2))) == (sum(e["spend"] for e in logs), len(logs)) == (0.75, 4)
    assert re.search(r"payer</a></th>\s*<td>0.5</td><td>2</td>", usage)
    assert re.search(r"master key</th>\s*<td>0.25</td><td>1</td>", usage)
    assert "<code>/x&amp;y&#39;z</code></th><td>0</td><td>1</td>" in usage  # by route
    assert "<code>/v1/rerank</code></th><td>0.75</td><td>3</td>" in usage
    assert len(_wait_for_entries(page, 2, key="payer")) == 2
    assert len(_wait_for_entries(page, 2, key=made["key"])) == 2
    assert len(_wait_for_entries(page, 1, route="/x&y'z")) == 1
    assert len(_wait_for_entries(page, 4, status="200")) == 4 and not _wait_for_entries(page, 0, status="401")
    assert "no key has that alias" in page.get("/ui/logs?key=nobody").text
    assert page.get("/ui/logs?status=abc").status_code == 400
    empty = page.get("/ui/usage?start=2001-01-01&end=2001-01-31").text
    assert "<strong>0</strong> spent in" in empty


def test_routes_show_target_names_never_urls_or_header_values(serve: Serve, upstream: Upstream,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("UPSTREAM_TOKEN", "query-secret-1234")
    monkeypatch.setenv("HEADER_SECRET", "header-secret-5678")
    url = serve([{"path": "/v1/x", "target": f"{upstream.url}/deep/path?token=os.environ/UPSTREAM_TOKEN",
                  "headers": {"X-Api-Key": "os.environ/HEADER_SECRET"}, "auth": True}], master_key=MASTER)  # fmt: skip
    page = Page(url)
    page.login()
    for _ in range(3):
        requests.post(f"{url}/v1/x", headers=ADMIN, timeout=10)
    shown = page.get("/ui/routes").text
    assert f"<code>{upstream.url.split('//')[1]}</code>" in shown
    assert "query-secret" not in shown and "header-secret" not in shown and "/deep/path" not in shown
    assert "Calls since start</dt><dd>3" in shown


def test_routes_list_each_target_by_name_with_its_state(serve: Serve, upstream: Upstream) -> None:
    refusing = f"http://127.0.0.1:{free_port()}"  # nothing listens: each attempt there is refused
    url = serve([{"path": "/multi", "allowed_fails": 1, "cooldown_time": 60, "targets": [
        {"url": f"{refusing}/x", "name": "gone-away"}, {"url": f"{upstream.url}/echo", "name": "healthy"}]}],
        master_key=MASTER)  # fmt: skip
    page = Page(url)
    page.login()
    assert requests.post(f"{url}/multi", timeout=10).status_code == 200  # whichever went first, one answered
    assert requests.post(f"{url}/multi", timeout=10).status_code == 200
    shown = page.get("/ui/routes").text
    assert "<code>gone-away</code> — cooling down, " in shown and "<code>healthy</code> — ok" in shown
    assert refusing.split("//")[1] not in shown


def test_the_store_reads_behind_the_pages(store: Any) -> None:
    """On both backends: alias filters, names of many keys, entries by route, status and id, totals over a range."""
    from passthru.keystore.records import NewKey

    for alias in ("Alpha_1", "alpha%2", "beta"):
        store.create(NewKey(token=digest(alias).hex(), key_name="sk-...xxxx", key_alias=alias))
    assert sorted(i.key_alias for i in store.page(1, 10, alias_contains="ALPHA")[0]) == ["Alpha_1", "alpha%2"]
    assert [i.key_alias for i in store.page(1, 10, alias_contains="a%")[0]] == ["alpha%2"]
    assert [i.key_alias for i in store.page(1, 10, alias_contains="a_")[0]] == ["Alpha_1"]
    assert {i.key_alias for i in store.find_many([digest("beta").hex(), "f" * 64])} == {"beta"}
    now = time.time()
    entries = [SpendEntry(f"0190a000-0000-7000-8000-00000000000{n}", "a" * 64 if n % 2 else None, f"/r{n % 3}",
                          200 if n < 4 else 500, 0.5 if n % 2 else 0.25, now - 100 + n, 0.1,
                          model="m" if n % 2 else None) for n in range(6)]  # fmt: skip
    store.record(entries)
    assert [e.request_id[-1] for e in store.spend_logs(None, None, None, 10, route="/r1")] == ["4", "1"]
    assert [e.request_id[-1] for e in store.spend_logs(None, None, None, 10, status=500)] == ["5", "4"]
    assert [e.request_id[-1] for e in store.spend_logs("a" * 64, None, None, 10, status=200)] == ["3", "1"]
    assert store.spend_entry(entries[2].request_id) == entries[2]
    assert store.spend_entry("0190a000-0000-7000-8000-999999999999") is None
    totals = store.spend_totals("api_key", now - 200, now, 10)
    assert [(t.group, t.spend, t.calls) for t in totals] == [("a" * 64, 1.5, 3), (None, 0.75, 3)]
    assert [(t.group, t.calls) for t in store.spend_totals("model", now - 200, now, 1)] == [("m", 3)]
