"""Usage read from answers on their way through a real passthru (pricing.py, usage_tap.py wired in forward.py): the
caller gets the upstream's bytes as they come, and the tokens, model and spend of each call are counted exactly."""

from __future__ import annotations

import gzip
import hashlib
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from test_metrics import metric, scrape
from test_usage import EXPECTED, NAMES, REQUEST_MODEL, body_of, type_of
from upstream import Answer, Upstream, wait_until

Serve = Callable[..., str]
IN, OUT = 2e-6, 8e-6  # the route's prices per input and output token
REQUEST = b'{"model": "' + REQUEST_MODEL.encode() + b'", "messages": [{"role": "user", "content": "hi"}]}'
MASTER = "sk-master-of-metering-0123"
ADMIN = {"Authorization": f"Bearer {MASTER}"}


def logged(base: str, **params: str) -> list[dict[str, Any]]:
    answer = requests.get(f"{base}/spend/logs", params=params, headers=ADMIN, timeout=10)
    assert answer.status_code == 200, answer.text
    return list(answer.json())


def give(upstream: Upstream, name: str) -> str:
    """The upstream answers /answer/<name> with the fixture file `name`; returns that path."""
    stream = not name.endswith(".json")
    upstream.answers[name] = Answer(type_of(name), body_of(name), stream=stream)
    return f"/answer/{name}"


def counted(base: str, route: str, model: str) -> tuple[float, float, float]:
    text = scrape(base)
    return (
        metric(text, "passthru_tokens_total", route=route, model=model, kind="input"),
        metric(text, "passthru_tokens_total", route=route, model=model, kind="output"),
        metric(text, "passthru_spend_total", route=route),
    )


@pytest.mark.parametrize("name", NAMES)
def test_each_answer_shape_is_relayed_byte_for_byte_and_its_tokens_and_spend_counted(
    serve: Serve, upstream: Upstream, name: str
) -> None:
    path = give(upstream, name)
    route = f"/priced/{name.replace('.', '-')}"  # a route of its own: its series start at zero
    base = serve([{"path": route, "target": f"{upstream.url}{path}", "cost_per_request": 0.5,
                   "input_cost_per_token": IN, "output_cost_per_token": OUT}], master_key=MASTER)  # fmt: skip
    answer = requests.post(f"{base}{route}", data=REQUEST, headers={"x-request-id": "shape-1"}, timeout=10)
    assert answer.status_code == 200
    assert answer.content == body_of(name)
    model, prompt, completion, total = EXPECTED[name][:4]
    spend = pytest.approx(0.5 + prompt * IN + completion * OUT)
    assert wait_until(lambda: counted(base, route, model) == (prompt, completion, spend), 5), counted(
        base, route, model
    )
    assert wait_until(lambda: len(logged(base)) == 1, 5)
    (entry,) = logged(base)
    assert (entry["request_id"], entry["api_key"], entry["model"], entry["spend"]) == ("shape-1", None, model, spend)
    assert (entry["prompt_tokens"], entry["completion_tokens"], entry["total_tokens"]) == (prompt, completion, total)


def test_model_prices_price_the_model_the_answer_names_and_a_route_price_wins(serve: Serve, upstream: Upstream) -> None:
    path = give(upstream, "openai_chat.json")  # gpt-4o-2024-08-06, 1117 prompt and 46 completion tokens
    prices = {"gpt-4o-2024-08-06": {"input_cost_per_token": 1e-6, "output_cost_per_token": 1e-5}}
    base = serve([{"path": "/by-model", "target": f"{upstream.url}{path}"},
                  {"path": "/own-output", "target": f"{upstream.url}{path}", "output_cost_per_token": 1e-3}],
                 model_prices=prices)  # fmt: skip
    for route in ("/by-model", "/own-output"):
        assert requests.post(f"{base}{route}", data=REQUEST, timeout=10).status_code == 200
    assert wait_until(lambda: counted(base, "/by-model", "gpt-4o-2024-08-06")[2] > 0, 5)
    assert counted(base, "/by-model", "gpt-4o-2024-08-06")[2] == pytest.approx(1117 * 1e-6 + 46 * 1e-5)
    # The route's output price replaces the model's; its input price is still the model's.
    assert wait_until(lambda: counted(base, "/own-output", "gpt-4o-2024-08-06")[2] > 0, 5)
    assert counted(base, "/own-output", "gpt-4o-2024-08-06")[2] == pytest.approx(1117 * 1e-6 + 46 * 1e-3)


def test_the_upstreams_response_cost_header_is_the_calls_whole_cost(serve: Serve, upstream: Upstream) -> None:
    path = give(upstream, "openai_chat.json")
    base = serve([{"path": "/costed", "target": f"{upstream.url}{path}?cost=0.0421", "cost_per_request": 1,
                   "input_cost_per_token": 1}])  # fmt: skip
    answer = requests.post(f"{base}/costed", data=REQUEST, timeout=10)
    assert answer.headers["x-litellm-response-cost"] == "0.0421"
    assert wait_until(lambda: counted(base, "/costed", "gpt-4o-2024-08-06") == (1117, 46, 0.0421), 5)


def test_a_gzip_answer_is_relayed_compressed_and_its_usage_counted(serve: Serve, upstream: Upstream) -> None:
    path = give(upstream, "anthropic_messages.json")
    base = serve([{"path": "/zipped", "target": f"{upstream.url}{path}?gzip=1", "input_cost_per_token": IN}])
    answer = requests.post(f"{base}/zipped", data=REQUEST, headers={"Accept-Encoding": "gzip"}, timeout=10,
                           stream=True)  # fmt: skip
    assert answer.headers["Content-Encoding"] == "gzip"
    relayed = answer.raw.read(decode_content=False)
    assert relayed == gzip.compress(body_of("anthropic_messages.json"), mtime=0)
    model, prompt, completion = EXPECTED["anthropic_messages.json"][:3]
    assert wait_until(lambda: counted(base, "/zipped", model) == (prompt, completion, pytest.approx(prompt * IN)), 5)


def test_stream_events_reach_the_caller_one_by_one_as_the_upstream_sends_them(serve: Serve, upstream: Upstream) -> None:
    path = give(upstream, "anthropic_messages_stream.sse")
    base = serve([{"path": "/spaced", "target": f"{upstream.url}{path}?gap=0.15"}])
    events = Answer(type_of("anthropic_messages_stream.sse"), body_of("anthropic_messages_stream.sse")).events()
    arrivals, received = [], b""
    with requests.post(f"{base}/spaced", data=REQUEST, stream=True, timeout=10) as answer:
        for chunk in answer.iter_content(chunk_size=None):
            received += chunk
            arrivals.append(time.monotonic())
    assert received == body_of("anthropic_messages_stream.sse")
    # One read per event, each about a gap after the one before: nothing was held back to be parsed first.
    assert len(arrivals) == len(events)
    assert arrivals[-1] - arrivals[0] >= 0.15 * (len(events) - 1) * 0.8


def test_a_caller_that_hangs_up_mid_stream_is_counted_for_what_it_was_sent(serve: Serve, upstream: Upstream) -> None:
    path = give(upstream, "anthropic_messages_stream.sse")  # message_start: 25 input + 1034 cache, 1 output
    base = serve([{"path": "/gone", "target": f"{upstream.url}{path}?gap=0.5", "input_cost_per_token": IN,
                   "output_cost_per_token": OUT}])  # fmt: skip
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /gone HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(REQUEST), REQUEST))  # fmt: skip
        seen = b""
        while b"message_start" not in seen:
            piece = sock.recv(65536)
            assert piece, "passthru closed before the first event"
            seen += piece
    model = "claude-3-7-sonnet-20250219"
    want = (25 + 10 + 1024, 1, pytest.approx((25 + 10 + 1024) * IN + 1 * OUT))
    assert wait_until(lambda: counted(base, "/gone", model) == want, 10), counted(base, "/gone", model)


def test_an_answer_that_is_neither_json_nor_a_stream_gets_no_tap(serve: Serve, upstream: Upstream) -> None:
    base = serve([{"path": "/bin", "target": f"{upstream.url}/bytes?size=100000", "cost_per_request": 0.25}])
    assert len(requests.get(f"{base}/bin", timeout=10).content) == 100000
    assert wait_until(lambda: counted(base, "/bin", "unknown")[2] == 0.25, 5)
    assert counted(base, "/bin", REQUEST_MODEL)[:2] == (0, 0)
    assert "passthru_tokens_total{" not in "\n".join(
        line for line in scrape(base).splitlines() if 'route="/bin"' in line
    )


def test_model_prices_are_checked_at_start_up(tmp_path: Path) -> None:
    from conftest import write_config

    from passthru.config import load_settings
    from passthru.errors import ConfigError

    bad = {"gpt-4o": {"input_cost_per_tokens": 1}}
    with pytest.raises(ConfigError, match=r"model_prices\.gpt-4o\.input_cost_per_tokens: unknown field \(did you"):
        load_settings(write_config(tmp_path, [], model_prices=bad))
    with pytest.raises(ConfigError, match=r"\[0\] \(/a\)\.output_cost_per_token: must be zero or more"):
        load_settings(write_config(tmp_path, [{"path": "/a", "target": "http://x", "output_cost_per_token": -1}]))


# --- the spend log: every call, with its usage, when there is a key store -----------------------------------------


def test_master_key_and_open_route_calls_are_logged_with_their_usage(
    database_url: str, serve: Serve, upstream: Upstream
) -> None:
    chat, stream = give(upstream, "openai_chat.json"), give(upstream, "anthropic_messages_stream.sse")
    base = serve([{"path": "/open", "target": f"{upstream.url}{chat}", "cost_per_request": 0.5,
                   "input_cost_per_token": IN, "output_cost_per_token": OUT},
                  {"path": "/keyed", "target": f"{upstream.url}{stream}", "auth": True, "output_cost_per_token": OUT}],
                 master_key=MASTER, database_url=database_url)  # fmt: skip
    open_call = requests.post(f"{base}/open", data=REQUEST, headers={"x-request-id": "open-1"}, timeout=10)
    keyed_call = requests.post(f"{base}/keyed", data=REQUEST, headers={**ADMIN, "x-request-id": "keyed-1"}, timeout=10)
    assert (open_call.status_code, keyed_call.status_code) == (200, 200)
    assert wait_until(lambda: len(logged(base)) == 2, 5)
    entries = {entry["request_id"]: entry for entry in logged(base)}
    master = hashlib.sha256(MASTER.encode()).hexdigest()
    assert {k: entries["open-1"][k] for k in ("api_key", "route", "model", "prompt_tokens", "completion_tokens",
                                              "total_tokens", "status_code")} == {
        "api_key": None, "route": "/open", "model": "gpt-4o-2024-08-06", "prompt_tokens": 1117,
        "completion_tokens": 46, "total_tokens": 1163, "status_code": 200}  # fmt: skip
    assert entries["open-1"]["spend"] == pytest.approx(0.5 + 1117 * IN + 46 * OUT)
    keyed = entries["keyed-1"]
    assert (keyed["api_key"], keyed["model"], keyed["prompt_tokens"], keyed["completion_tokens"]) == (
        master,
        "claude-3-7-sonnet-20250219",
        25 + 10 + 1024,
        15,
    )
    assert keyed["spend"] == pytest.approx(15 * OUT)
    # The report sums what the log holds.
    today = time.strftime("%Y-%m-%d", time.gmtime())
    report = requests.get(f"{base}/global/spend/report", headers=ADMIN, timeout=10,
                          params={"start_date": today, "end_date": today, "group_by": "route"}).json()  # fmt: skip
    sums = {group["route"]: group["total_spend"] for day in report for group in day["routes"]}
    assert sums == {"/open": pytest.approx(entries["open-1"]["spend"]), "/keyed": pytest.approx(keyed["spend"])}


def test_a_keys_tpm_limit_counts_the_tokens_its_answers_reported(
    database_url: str, serve: Serve, upstream: Upstream
) -> None:
    chat = give(upstream, "openai_chat.json")  # 1163 tokens
    base = serve([{"path": "/chat", "target": f"{upstream.url}{chat}", "auth": True}], master_key=MASTER,
                 database_url=database_url)  # fmt: skip
    made = requests.post(f"{base}/key/generate", json={"tpm_limit": 2000}, headers=ADMIN, timeout=10).json()
    key = {"Authorization": f"Bearer {made['key']}"}
    assert requests.post(f"{base}/chat", data=REQUEST, headers=key, timeout=10).status_code == 200
    info = lambda: requests.get(f"{base}/key/info", params={"key": made["key"]}, headers=ADMIN, timeout=10).json()  # noqa: E731
    assert wait_until(lambda: info()["info"]["total_tokens"] == 1163, 5), info()
    assert requests.post(f"{base}/chat", data=REQUEST, headers=key, timeout=10).status_code == 200  # 1163 < 2000
    assert wait_until(lambda: info()["info"]["total_tokens"] == 2326, 5)
    refused = requests.post(f"{base}/chat", data=REQUEST, headers=key, timeout=10)
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert "tpm_limit" in refused.json()["error"]["message"]


def test_without_spend_logs_keys_are_still_charged_and_nothing_is_logged(
    database_url: str, serve: Serve, upstream: Upstream
) -> None:
    chat = give(upstream, "openai_chat.json")
    base = serve([{"path": "/chat", "target": f"{upstream.url}{chat}", "auth": True, "output_cost_per_token": 0.01},
                  {"path": "/open", "target": f"{upstream.url}{chat}"}],
                 master_key=MASTER, database_url=database_url, disable_spend_logs=True)  # fmt: skip
    made = requests.post(f"{base}/key/generate", json={}, headers=ADMIN, timeout=10).json()
    for headers, path in (({"Authorization": f"Bearer {made['key']}"}, "/chat"), (ADMIN, "/chat"), ({}, "/open")):
        assert requests.post(f"{base}{path}", data=REQUEST, headers=headers, timeout=10).status_code == 200
    info = lambda: requests.get(f"{base}/key/info", params={"key": made["key"]}, headers=ADMIN, timeout=10).json()  # noqa: E731
    assert wait_until(lambda: info()["info"]["spend"] == pytest.approx(0.46), 5), info()
    assert info()["info"]["total_tokens"] == 1163
    assert logged(base) == []
