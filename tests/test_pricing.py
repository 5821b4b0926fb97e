"""pricing.py: what a call costs, and `meter`, which reads a finished call's usage, model and spend once."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest

from passthru.exchange import Exchange
from passthru.pricing import Prices, Pricing, meter
from passthru.tracing import begin
from passthru.usage import Usage
from passthru.usage_tap import tap_for

MODELS = {"m": Prices(input=1.0, output=10.0), "half": Prices(input=2.0)}


@pytest.mark.parametrize(
    ("own", "usage", "cost"),
    [
        (Prices(), None, 0.5),  # no usage seen: cost_per_request
        (Prices(), Usage("m", 3, 2, 5), 0.5 + 3 * 1.0 + 2 * 10.0),  # the model's prices
        (Prices(), Usage("unpriced", 3, 2, 5), 0.5),  # a model nobody priced costs its tokens nothing
        (Prices(), Usage(None, 3, 2, 5), 0.5),
        (Prices(output=100.0), Usage("m", 3, 2, 5), 0.5 + 3 * 1.0 + 2 * 100.0),  # field by field
        (Prices(input=0.0), Usage("m", 3, 2, 5), 0.5 + 2 * 10.0),  # a route's explicit 0 wins too
        (Prices(), Usage("half", 3, 2, 5), 0.5 + 3 * 2.0),  # the model leaves output unpriced
    ],
)
def test_cost_is_cost_per_request_plus_tokens_at_the_route_or_model_prices(
    own: Prices, usage: Usage | None, cost: float
) -> None:
    assert Pricing(0.5, own, MODELS).cost(usage, None) == pytest.approx(cost)


def test_the_upstreams_response_cost_replaces_every_price() -> None:
    assert Pricing(0.5, Prices(1.0, 1.0), MODELS).cost(Usage("m", 3, 2, 5), 0.125) == 0.125
    assert Pricing(0.5, Prices(), {}).cost(None, 0.0) == 0.0


@dataclass
class Body:
    received: int
    head: bytes


def finished(answer: bytes, content_type: str = "application/json", head: bytes = b"") -> Exchange:
    exchange = Exchange("POST", "/r", "id", 0.0, begin({}), route="/r", pricing=Pricing(0.0, Prices(1.0, 2.0), {}))
    exchange.body = Body(len(head), head)
    exchange.tap = tap_for(content_type, None, None)
    if exchange.tap is not None:
        exchange.tap.feed(answer)
    meter(exchange)
    return exchange


def test_meter_takes_the_answers_model_and_leaves_the_request_unread() -> None:
    answer = b'{"model": "from-answer", "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}'
    exchange = finished(answer, head=b'{"model": "from-request"}')
    assert (exchange.model, exchange.usage, exchange.spend) == ("from-answer", Usage("from-answer", 1, 2, 3), 5.0)


def test_meter_names_the_requests_model_when_the_answer_does_not() -> None:
    answer = b'{"meta": {"billed_units": {"input_tokens": 4, "output_tokens": 1}}}'  # Cohere v1 names no model
    exchange = finished(answer, head=b'{"model": "command-r", "message": "hi"}')
    assert (exchange.model, exchange.usage, exchange.spend) == ("command-r", Usage("command-r", 4, 1, 5), 6.0)
    bytes_only = finished(b"binary", content_type="application/octet-stream", head=b'{"model": "m"}')
    assert (bytes_only.model, bytes_only.usage, bytes_only.spend) == ("m", None, 0.0)


def test_meter_logs_once_when_the_answers_usage_was_lost(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = logging.getLogger("passthru")
    monkeypatch.setattr(log, "propagate", False)  # as configure_logging leaves it: only pytest's handler, once
    log.addHandler(caplog.handler)
    try:
        exchange = finished(b'{"usage": ' + b" " * (2 << 20) + b"}")
    finally:
        log.removeHandler(caplog.handler)
    assert exchange.usage is None and exchange.spend == 0.0
    assert [r.getMessage() for r in caplog.records] == [
        f"usage of this /r answer is unknown: {exchange.tap.lost if exchange.tap else ''}"
    ]


def test_a_call_that_is_not_a_pass_through_call_is_not_metered() -> None:
    exchange = Exchange("GET", "/health", "id", 0.0, begin({}))
    meter(exchange)
    assert (exchange.usage, exchange.spend, exchange.model) == (None, None, None)
