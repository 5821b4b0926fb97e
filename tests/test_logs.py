"""Request ids and log lines: the id's round trip, the access line, JSON logs, and the redaction of secrets."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from conftest import Gunicorn
from upstream import Answer, Upstream, wait_until

from passthru.logs import Redact, TextFormatter

Serve = Callable[..., str]
FIXTURES = Path(__file__).parent / "fixtures" / "usage"


def test_request_id_round_trip(serve: Serve, upstream: Upstream) -> None:
    base = serve([{"path": "/e", "target": f"{upstream.url}/echo"}])
    response = requests.get(f"{base}/e", headers={"x-request-id": "req-abc.123"}, timeout=10)
    assert response.headers["x-request-id"] == "req-abc.123"
    assert response.headers["x-litellm-call-id"] == "req-abc.123"
    assert upstream.requests[-1].header("x-request-id") == "req-abc.123"
    # An id that does not look like one is replaced, and the new one is used everywhere.
    response = requests.get(f"{base}/e", headers={"x-request-id": "bad id\twith spaces"}, timeout=10)
    fresh = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", fresh) and response.headers["x-litellm-call-id"] == fresh
    assert upstream.requests[-1].header("x-request-id") == fresh
    # Errors answered by passthru itself carry the id too.
    assert requests.get(f"{base}/nowhere", timeout=10).headers["x-request-id"]


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        pytest.param("a" * 128, True, id="128-characters"),
        pytest.param("a" * 129, False, id="129-characters"),
        pytest.param("AZaz09._:@/+=-", True, id="every-allowed-character"),
        pytest.param("a;b", False, id="semicolon"),
        pytest.param("a,b", False, id="comma"),
        pytest.param("\u00e9t\u00e9", False, id="non-ascii"),
        pytest.param("", False, id="empty"),
    ],
)
def test_request_id_is_kept_only_when_it_looks_like_one(
    serve: Serve, upstream: Upstream, sent: str, kept: bool
) -> None:
    """Up to 128 of A-Za-z0-9._:@/+=- (the README's bound); anything else is replaced by a new id."""
    base = serve([{"path": "/e", "target": f"{upstream.url}/echo"}])
    response = requests.get(f"{base}/e", headers={"x-request-id": sent}, timeout=10)
    used = response.headers["x-request-id"]
    if kept:
        assert used == sent
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", used), used
    assert response.headers["x-litellm-call-id"] == used
    assert upstream.requests[-1].header("x-request-id") == used


def test_upstream_request_id_is_kept_under_its_own_name(serve: Serve, upstream: Upstream) -> None:
    base = serve([{"path": "/own", "target": f"{upstream.url}/headers?x-request-id=upstream-id-42"},
                  {"path": "/same", "target": f"{upstream.url}/headers?x-request-id=mine"},
                  {"path": "/none", "target": f"{upstream.url}/headers"}])  # fmt: skip
    response = requests.get(f"{base}/own", headers={"x-request-id": "mine"}, timeout=10)
    assert upstream.requests[-1].header("x-request-id") == "mine"
    assert response.headers["x-request-id"] == response.headers["x-litellm-call-id"] == "mine"
    assert response.headers["x-upstream-request-id"] == "upstream-id-42"
    # An upstream that echoes our id, or sends none, has nothing of its own to keep.
    for path in ("/same", "/none"):
        response = requests.get(f"{base}{path}", headers={"x-request-id": "mine"}, timeout=10)
        assert response.headers["x-request-id"] == "mine"
        assert "x-upstream-request-id" not in response.headers, path


def test_request_id_in_every_log_line_about_the_request(gunicorn: Callable[..., Gunicorn], upstream: Upstream) -> None:
    server = gunicorn([{"path": "/r", "target": f"{upstream.url}/reset?phase=headers"}])
    assert requests.get(f"{server.url}/r", headers={"x-request-id": "trace-77"}, timeout=10).status_code == 502
    # The upstream's failure is logged when it happens, the access line when the answer is done.
    assert wait_until(lambda: "GET /r 502" in server.output() and "upstream reset on /r" in server.output(), 5)
    lines = [line for line in server.output().splitlines() if "GET /r 502" in line or "upstream reset on /r" in line]
    assert len(lines) == 2
    assert all("[trace-77]" in line for line in lines), lines


def test_json_logs_parse(gunicorn: Callable[..., Gunicorn], upstream: Upstream) -> None:
    server = gunicorn([{"path": "/e", "target": f"{upstream.url}/echo"}], env={"JSON_LOGS": "true"})
    requests.get(f"{server.url}/e/x", timeout=10)  # 404
    response = requests.get(f"{server.url}/e", headers={"x-request-id": "json-1"}, timeout=10)
    assert response.status_code == 200
    assert wait_until(lambda: "json-1" in server.output(), 5)
    lines = [line for line in server.output().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line, gunicorn's own included
    access = [e for e in entries if e.get("request_id") == "json-1"]
    assert access and access[-1]["status"] == 200 and access[-1]["path"] == "/e" and access[-1]["method"] == "GET"
    assert any(e["logger"] == "gunicorn.error" for e in entries)


ACCESS = re.compile(
    r"passthru: (\S+) (\S+) (\d+|-) (\d+)B ([\d.]+)ms upstream=([\d.]+ms|-)(?: target=(\S+) attempts=(\d+))?"
    r" trace=[0-9a-f]{32}( incomplete)?$"
)


def test_access_line_gives_total_and_upstream_time(
    serve: Serve, upstream: Upstream, capsys: pytest.CaptureFixture[str]
) -> None:
    """Upstream time runs to the upstream's headers, total time to the answer's last byte."""
    base = serve([{"path": "/late", "target": f"{upstream.url}/stall?phase=headers&seconds=0.4"},
                  {"path": "/events", "target": f"{upstream.url}/sse?n=3&gap=0.3"}])  # fmt: skip
    assert requests.get(f"{base}/late", timeout=10).text == "late"
    assert requests.get(f"{base}/events", timeout=10).status_code == 200
    assert requests.get(f"{base}/nowhere", timeout=10).status_code == 404
    seen = ""

    def lines() -> dict[str, tuple[str, ...]]:
        nonlocal seen
        seen += capsys.readouterr().err
        return {match[2]: match.groups() for match in map(ACCESS.search, seen.splitlines()) if match}

    # Each line is written when the server closes the answer, just after the client has read it.
    assert wait_until(lambda: {"/late", "/events", "/nowhere"} <= lines().keys(), 5), seen
    found = lines()
    method, _, status, size, total, up, target, attempts, incomplete = found["/late"]
    assert (method, status, size, incomplete) == ("GET", "200", "4", None)
    assert (target, attempts) == (upstream.url.removeprefix("http://"), "1")  # the target's default name: its host
    assert 400 <= float(up[:-2]) <= float(total) < 3000, found["/late"]
    _, _, status, size, total, up, _, _, incomplete = found["/events"]
    assert (status, size, incomplete) == ("200", str(len("data: 0\n\n") * 3), None)
    assert float(up[:-2]) < 300 and 600 <= float(total) < 3000, found["/events"]
    _, _, status, _, _, up, target, _, _ = found["/nowhere"]
    assert (status, up, target) == ("404", "-", None)  # no upstream was called


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


def test_access_line_carries_the_calls_tokens_and_spend(
    serve: Serve, upstream: Upstream, capsys: pytest.CaptureFixture[str]
) -> None:
    upstream.answers["chat"] = Answer("application/json", (FIXTURES / "openai_chat.json").read_bytes())
    base = serve([{"path": "/chat", "target": f"{upstream.url}/answer/chat", "cost_per_request": 0.01,
                   "output_cost_per_token": 0.001}])  # fmt: skip
    assert requests.post(f"{base}/chat", data=b"{}", timeout=10).status_code == 200
    seen = ""

    def line() -> str | None:
        nonlocal seen
        seen += capsys.readouterr().err
        return next((text for text in seen.splitlines() if "POST /chat 200" in text), None)

    assert wait_until(lambda: line() is not None, 5), seen
    assert str(line()).endswith(" tokens=1117+46 spend=0.056")  # 0.01 + 46 × 0.001


def test_json_access_entry_carries_the_model_tokens_and_spend(
    gunicorn: Callable[..., Gunicorn], upstream: Upstream
) -> None:
    upstream.answers["chat"] = Answer("application/json", (FIXTURES / "openai_chat.json").read_bytes())
    route = {"path": "/chat", "target": f"{upstream.url}/answer/chat", "input_cost_per_token": 0.001}
    server = gunicorn([route], env={"JSON_LOGS": "true"})
    response = requests.post(f"{server.url}/chat", data=b"{}", headers={"x-request-id": "json-2"}, timeout=10)
    assert response.status_code == 200
    assert wait_until(lambda: "json-2" in server.output(), 5)
    entries = [json.loads(line) for line in server.output().splitlines() if line.strip()]
    (access,) = [e for e in entries if e.get("request_id") == "json-2" and "status" in e]
    assert (access["model"], access["prompt_tokens"], access["completion_tokens"]) == ("gpt-4o-2024-08-06", 1117, 46)
    assert access["spend"] == pytest.approx(1.117)
    assert (access["target"], access["attempts"]) == (upstream.url.removeprefix("http://"), 1)
