"""What a call costs: its route's cost_per_request plus its tokens at per-token prices, or what the upstream says.

Prices have LiteLLM's names: `input_cost_per_token` and `output_cost_per_token` on a route, and per model under
`general_settings.model_prices` for routes that serve many models. A route's own price wins over its model's, field
by field. An upstream's `x-litellm-response-cost` header (LiteLLM's convention for any target) is the call's whole
cost. Read at start-up (config.py), applied when an answer ends (`meter`, the recorder the others read).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from passthru.config_fields import FieldReader, kind
from passthru.usage import Usage, model_from_prefix

if TYPE_CHECKING:
    from passthru.exchange import Exchange

log = logging.getLogger("passthru")

PRICE_FIELDS = ("input_cost_per_token", "output_cost_per_token")
# Models a config may price: enough for every model a provider lists, few enough to keep metrics' series bounded.
MAX_MODELS = 1000


@dataclass(frozen=True)
class Prices:
    """Per-token prices; None where this level does not say (the next level, or 0, applies)."""

    input: float | None = None  # per prompt token
    output: float | None = None  # per completion token


NO_PRICES = Prices()


def read_prices(reader: FieldReader, entry: Mapping[str, Any], where: str) -> Prices:
    """A route's or a model's input_cost_per_token and output_cost_per_token (each zero or more, optional)."""
    values = [reader.number(entry[name], f"{where}.{name}") if entry.get(name) is not None else None
              for name in PRICE_FIELDS]  # fmt: skip
    return Prices(*values)


def read_model_prices(reader: FieldReader, value: Any) -> Mapping[str, Prices]:
    """general_settings.model_prices: {model name: {input_cost_per_token, output_cost_per_token}}."""
    where = "general_settings.model_prices"
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise reader.error(where, f"must be a mapping of model names to prices, not {kind(value)}")
    if len(value) > MAX_MODELS:
        raise reader.error(where, f"prices {len(value)} models; at most {MAX_MODELS}")
    prices = {}
    for model, entry in value.items():
        if not isinstance(model, str) or not model:
            raise reader.error(where, f"has a model name that is not a string: {model!r}")
        field = f"{where}.{model}"
        if not isinstance(entry, dict):
            raise reader.error(field, f"must be a mapping with {' and '.join(PRICE_FIELDS)}, not {kind(entry)}")
        reader.known(entry, PRICE_FIELDS, field)
        prices[model] = read_prices(reader, entry, field)
    return prices


@dataclass(frozen=True)
class Pricing:
    """A route's prices, bound at start-up: what one of its calls costs once its answer has ended."""

    cost_per_request: float
    own: Prices
    models: Mapping[str, Prices]

    def cost(self, usage: Usage | None, response_cost: float | None) -> float:
        """The upstream's response cost when it sent one; else cost_per_request plus the tokens seen, priced."""
        if response_cost is not None:
            return response_cost
        if usage is None:
            return self.cost_per_request
        model = self.models.get(usage.model, NO_PRICES) if usage.model else NO_PRICES
        input_price = self.own.input if self.own.input is not None else model.input or 0.0
        output_price = self.own.output if self.own.output is not None else model.output or 0.0
        return (
            self.cost_per_request
            + (usage.prompt_tokens or 0) * input_price
            + (usage.completion_tokens or 0) * output_price
        )


def meter(exchange: Exchange) -> None:
    """The usage, model and spend of a finished pass-through call, for the recorders after this one (metrics, the
    spend log, the access line): what the tap read of the answer, priced by the route's prices.

    The model is the answer's, else the one the request's first bytes name (read only now, and only then).
    """
    pricing = exchange.pricing
    if pricing is None:
        return
    tap = exchange.tap
    usage = tap.usage() if tap is not None else None
    if tap is not None and tap.lost is not None:
        log.warning("usage of this %s answer is unknown: %s", exchange.route, tap.lost)
    model = usage.model if usage is not None else None
    if model is None and exchange.body is not None and exchange.body.head:
        model = model_from_prefix(exchange.body.head)
        if usage is not None and model is not None:
            usage = replace(usage, model=model)
    exchange.model = model
    exchange.usage = usage
    exchange.spend = pricing.cost(usage, exchange.response_cost)
