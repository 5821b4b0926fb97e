"""tracing.py: W3C Trace Context on every call, export off — the caller's trace continued or a new one started, each
attempt's own span id upstream, the caller's tracestate relayed, passthru's span in the answer and the trace id in the
log lines; against a real upstream that records what it got."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st
from test_attempts import access_line
from upstream import Upstream, wait_until

from passthru import tracing
from passthru.tracing import Sampler, Trace, begin, parse_traceparent

Serve = Callable[..., str]
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])")


@pytest.mark.parametrize(
    ("header", "parsed"),
    [
        pytest.param(f"00-{TRACE}-{PARENT}-01", (TRACE, PARENT, True), id="sampled"),
        pytest.param(f"00-{TRACE}-{PARENT}-00", (TRACE, PARENT, False), id="not-sampled"),
        pytest.param(f"00-{TRACE}-{PARENT}-03", (TRACE, PARENT, True), id="other-flags-ignored"),
        pytest.param(f" \t00-{TRACE}-{PARENT}-01\t ", (TRACE, PARENT, True), id="optional-whitespace"),
        pytest.param(f"cc-{TRACE}-{PARENT}-01", (TRACE, PARENT, True), id="later-version"),
        pytest.param(f"cc-{TRACE}-{PARENT}-01-what-the-future-holds", (TRACE, PARENT, True), id="later-version-more"),
        pytest.param(f"cc-{TRACE}-{PARENT}-01.what", None, id="later-version-no-dash"),
        pytest.param(f"00-{TRACE}-{PARENT}-01-extra", None, id="version-00-with-more"),
        pytest.param(f"ff-{TRACE}-{PARENT}-01", None, id="version-ff"),
        pytest.param(f"00-{TRACE.upper()}-{PARENT}-01", None, id="upper-case-trace-id"),
        pytest.param(f"00-{TRACE}-{PARENT.upper()}-01", None, id="upper-case-parent-id"),
        pytest.param(f"00-{'0' * 32}-{PARENT}-01", None, id="zero-trace-id"),
        pytest.param(f"00-{TRACE}-{'0' * 16}-01", None, id="zero-parent-id"),
        pytest.param(f"00-{TRACE[:-1]}-{PARENT}-01", None, id="short-trace-id"),
        pytest.param(f"00-{TRACE}-{PARENT}0-01", None, id="long-parent-id"),
        pytest.param(f"00-{TRACE}-{PARENT}-1", None, id="short-flags"),
        pytest.param(f"00-{TRACE}-{PARENT}-0g", None, id="flags-not-hex"),
        pytest.param(f"00_{TRACE}_{PARENT}_01", None, id="wrong-separator"),
        pytest.param(f"00-{TRACE}-{PARENT}-01,00-{TRACE}-{PARENT}-01", None, id="two-headers-joined"),
        pytest.param("", None, id="empty"),
        pytest.param(None, None, id="absent"),
    ],
)
def test_traceparent_is_read_as_level_1_says(header: str | None, parsed: tuple[str, str, bool] | None) -> None:
    assert parse_traceparent(header) == parsed


@given(st.text(max_size=80))
def test_any_text_is_read_or_refused_never_an_error(text: str) -> None:
    parsed = parse_traceparent(text)
    if parsed is not None:
        trace_id, parent_id, sampled = parsed
        assert re.fullmatch(r"[0-9a-f]{32}", trace_id) and trace_id != "0" * 32
        assert re.fullmatch(r"[0-9a-f]{16}", parent_id) and parent_id != "0" * 16
        assert parse_traceparent(f"00-{trace_id}-{parent_id}-{int(sampled):02x}") == parsed


def test_new_ids_are_random_hex_and_never_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    assert re.fullmatch(r"[0-9a-f]{32}", tracing.new_trace_id())
    assert re.fullmatch(r"[0-9a-f]{16}", tracing.new_span_id())
    assert len({tracing.new_span_id() for _ in range(100)}) == 100
    monkeypatch.setattr(tracing.random, "getrandbits", lambda bits: 0)
    assert (tracing.new_trace_id(), tracing.new_span_id()) == ("0" * 31 + "1", "0" * 15 + "1")


@pytest.mark.parametrize(
    ("sampler", "trace_id", "parent", "sampled"),
    [
        pytest.param(Sampler(0.5, False), "f" * 16 + "7" + "f" * 15, None, True, id="ratio-under"),
        pytest.param(Sampler(0.5, False), "0" * 16 + "8" + "0" * 15, None, False, id="ratio-at-bound"),
        pytest.param(Sampler(0.5, False), "0" * 16 + "8" + "0" * 15, True, False, id="ratio-ignores-parent"),
        pytest.param(Sampler(1.0, False), "0" * 16 + "f" * 16, False, True, id="always-on"),
        pytest.param(Sampler(0.0, False), "0" * 31 + "1", True, False, id="always-off"),
        pytest.param(Sampler(1.0, True), TRACE, False, False, id="parent-based-unsampled-parent"),
        pytest.param(Sampler(0.0, True), TRACE, True, True, id="parent-based-sampled-parent"),
        pytest.param(Sampler(1.0, True), TRACE, None, True, id="parent-based-root"),
    ],
)
def test_sampler_decides_as_the_sdk_does(sampler: Sampler, trace_id: str, parent: bool | None, sampled: bool) -> None:
    """The ratio rule is the SDK's TraceIdRatioBased (the id's low 64 bits under ratio × 2**64), so that services
    sampling one trace by the same ratio agree."""
    assert sampler.sample(trace_id, parent) is sampled


def test_begin_without_export_passes_the_callers_flag_on_and_starts_unsampled() -> None:
    continued = begin({"HTTP_TRACEPARENT": f"00-{TRACE}-{PARENT}-01", "HTTP_TRACESTATE": "a=1"})
    assert (continued.trace_id, continued.parent_id, continued.sampled, continued.state) == (TRACE, PARENT, True, "a=1")
    assert not continued.recorded and continued.span_id not in (PARENT, "0" * 16)
    started = begin({"HTTP_TRACESTATE": "a=1"})  # a tracestate without a valid traceparent is not read
    assert (started.parent_id, started.sampled, started.state, started.recorded) == (None, False, None, False)
    sampled = begin({"HTTP_TRACEPARENT": f"00-{TRACE}-{PARENT}-00"}, Sampler(1.0, False))
    assert sampled.sampled and sampled.recorded


def test_each_attempt_has_its_own_span_id_under_passthrus() -> None:
    """The API an attempt loop calls once per attempt (issue 15: several targets, retries); the spans are kept only
    when the trace is recorded."""
    for recorded in (False, True):
        trace = Trace(TRACE, "1" * 16, PARENT, True, "vendor=x", recorded)
        sent = []
        for _ in range(3):
            headers: dict[str, str] = {}
            trace.attempt(headers, None, "/v1/x?q=1", name="primary")  # type: ignore[arg-type]
            sent.append(TRACEPARENT.fullmatch(headers["traceparent"]))
            assert headers["tracestate"] == "vendor=x"
            if len(sent) == 1:
                trace.failed(ConnectionRefusedError())
            else:
                trace.answered(200 + len(sent))
        assert {match[1] for match in sent if match} == {TRACE} and {match[3] for match in sent if match} == {"01"}
        ids = [match[2] for match in sent if match]
        assert len({*ids, trace.span_id}) == 4
        if not recorded:
            assert trace.upstream == []
            continue
        assert [span.span_id for span in trace.upstream] == ids
        assert [(span.status, span.error) for span in trace.upstream] == [(None, "ConnectionRefusedError"),
                                                                          (202, None), (203, None)]  # fmt: skip
        assert trace.upstream[0].ended is not None and trace.upstream[1].ended is None
        assert trace.upstream[0].name == "primary" and trace.upstream[0].target == "/v1/x?q=1"


# --- through passthru, to a real upstream ----------------------------------------------------------------------------


def test_a_callers_trace_is_continued(serve: Serve, upstream: Upstream) -> None:
    base = serve([{"path": "/e", "target": f"{upstream.url}/echo"}])
    response = requests.get(f"{base}/e", headers={"traceparent": f"00-{TRACE}-{PARENT}-01"}, timeout=10)
    (got,) = upstream.requests
    up = TRACEPARENT.fullmatch(got.header("traceparent") or "")
    back = TRACEPARENT.fullmatch(response.headers["traceparent"])
    assert up and back, (got.headers, response.headers)
    assert up[1] == back[1] == TRACE and up[3] == back[3] == "01"  # the caller's trace and flag
    assert len({up[2], back[2], PARENT}) == 3  # the attempt's span, passthru's span, the caller's: all apart


def test_a_trace_is_started_when_the_caller_sent_none(serve: Serve, upstream: Upstream) -> None:
    base = serve([{"path": "/e", "target": f"{upstream.url}/echo"}])
    response = requests.get(f"{base}/e", headers={"tracestate": "lost=1"}, timeout=10)
    got = upstream.requests[-1]
    up = TRACEPARENT.fullmatch(got.header("traceparent") or "")
    back = TRACEPARENT.fullmatch(response.headers["traceparent"])
    assert up and back and up[1] == back[1] and up[2] != back[2]
    assert up[3] == back[3] == "00"  # no one records this trace: export is off
    assert got.header("tracestate") is None  # nothing to go with
    again = requests.get(f"{base}/e", timeout=10)
    assert TRACEPARENT.fullmatch(again.headers["traceparent"])[1] != up[1]  # type: ignore[index]


@pytest.mark.parametrize("forward_headers", [False, True])
@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(f"00-{TRACE.upper()}-{PARENT}-01", id="upper-case"),
        pytest.param(f"00-{'0' * 32}-{PARENT}-01", id="zero-trace-id"),
        pytest.param(f"00-{TRACE}-{PARENT}-01-x", id="version-00-with-more"),
    ],
)
def test_an_invalid_traceparent_is_replaced_and_its_tracestate_dropped(
    serve: Serve, upstream: Upstream, sent: str, forward_headers: bool
) -> None:
    base = serve([{"path": "/e", "target": f"{upstream.url}/echo", "forward_headers": forward_headers}])
    requests.get(f"{base}/e", headers={"traceparent": sent, "tracestate": "vendor=1"}, timeout=10)
    got = upstream.requests[-1]
    up = TRACEPARENT.fullmatch(got.header("traceparent") or "")
    assert up and up[1] not in (TRACE, "0" * 32) and up[3] == "00"
    assert [v for k, v in got.headers if k.lower() == "traceparent"] == [got.header("traceparent")]  # once, ours
    assert got.header("tracestate") is None


@pytest.mark.parametrize("forward_headers", [False, True])
def test_tracestate_is_relayed_as_it_came(serve: Serve, upstream: Upstream, forward_headers: bool) -> None:
    base = serve([{"path": "/e", "target": f"{upstream.url}/echo", "forward_headers": forward_headers}])
    state = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    requests.get(f"{base}/e", headers={"traceparent": f"00-{TRACE}-{PARENT}-00", "tracestate": state}, timeout=10)
    got = upstream.requests[-1]
    assert [v for k, v in got.headers if k.lower() == "tracestate"] == [state]
    assert (got.header("traceparent") or "").startswith(f"00-{TRACE}-") and got.header("traceparent") != (
        f"00-{TRACE}-{PARENT}-00"
    )


def test_each_call_is_its_own_span_and_the_upstreams_traceparent_is_not_relayed(
    serve: Serve, upstream: Upstream
) -> None:
    theirs = f"00-{'a' * 32}-{'b' * 16}-01"
    base = serve([{"path": "/h", "target": f"{upstream.url}/headers?traceparent={theirs}"}])
    answers = [requests.get(f"{base}/h", headers={"traceparent": f"00-{TRACE}-{PARENT}-01"}, timeout=10)
               for _ in range(3)]  # fmt: skip
    assert all(response.headers["traceparent"] != theirs for response in answers)
    sent = [TRACEPARENT.fullmatch(got.header("traceparent") or "") for got in upstream.requests]
    back = [TRACEPARENT.fullmatch(response.headers["traceparent"]) for response in answers]
    assert {m[1] for m in sent + back if m} == {TRACE}
    assert len({m[2] for m in sent + back if m}) == 6


def test_passthrus_own_answers_carry_the_trace_too(serve: Serve, upstream: Upstream) -> None:
    base = serve([{"path": "/e", "target": f"{upstream.url}/echo"}])
    for path in ("/nowhere", "/health"):
        response = requests.get(f"{base}{path}", headers={"traceparent": f"00-{TRACE}-{PARENT}-01"}, timeout=10)
        assert (TRACEPARENT.fullmatch(response.headers["traceparent"]) or [None, None])[1] == TRACE, path


def test_the_trace_id_is_in_the_access_line(
    serve: Serve, upstream: Upstream, capsys: pytest.CaptureFixture[str]
) -> None:
    base = serve([{"path": "/e", "target": f"{upstream.url}/echo"}])
    requests.get(f"{base}/e", headers={"traceparent": f"00-{TRACE}-{PARENT}-01", "x-request-id": "rid-1"}, timeout=10)
    line = access_line(capsys, "GET /e 200")
    assert "[rid-1]" in line and f" trace={TRACE}" in line


def test_the_trace_id_is_in_every_json_line_about_the_request(
    serve: Serve, upstream: Upstream, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JSON_LOGS", "true")
    base = serve([{"path": "/r", "target": f"{upstream.url}/reset?phase=headers"}])
    headers = {"traceparent": f"00-{TRACE}-{PARENT}-01", "x-request-id": "rid-2"}
    assert requests.get(f"{base}/r", headers=headers, timeout=10).status_code == 502
    seen = ""

    def entries() -> list[dict[str, object]]:
        nonlocal seen
        seen += capsys.readouterr().err
        found = [json.loads(text) for text in seen.splitlines() if text.startswith("{")]
        return [entry for entry in found if entry.get("request_id") == "rid-2"]

    # The upstream's failure, logged when it happens, and the access line.
    assert wait_until(lambda: len(entries()) == 2, 5), seen
    assert [entry["trace_id"] for entry in entries()] == [TRACE, TRACE]
