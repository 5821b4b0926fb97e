"""What an LLM answer says it used, in the shapes OpenAI, Anthropic, Gemini and Cohere send: the tokens, the model
(else the request's, from its first bytes), and the upstream's own cost header; pricing.py prices them. usage_tap.py
reads the answers as they are relayed and hands each JSON document here.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PREFIX_CAP = 4 << 10  # the request's first bytes read for its "model"
MODEL_CAP = 256  # a longer "model" is not a model name anyone prices
COUNT_CAP = 1 << 53  # a count past this is no count (and 10**4000 tokens would not even make a float price)
COST_HEADER = "x-litellm-response-cost"
# Where an answer (or one event of a stream) keeps its counts: OpenAI, Anthropic and Cohere v2 in "usage", Gemini in
# "usageMetadata", Cohere v1 in "meta". A key inside a JSON string has its quotes escaped: text that mentions usage
# does not match.
COUNTS = re.compile(rb'"(?:usage|usageMetadata|meta)"\s*:\s*\{')
COST = re.compile(r"\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?")
_DECODER = json.JSONDecoder()
_SPACE = frozenset(" \t\n\r")


@dataclass(frozen=True, slots=True)
class Usage:
    """The tokens an answer reported, normalised to OpenAI's names as LiteLLM counts them.

    Counts an answer left out are 0, not None: an embedding has no completion, and a price needs a number. An answer
    that reported no counts at all has no Usage. prompt_tokens includes Anthropic's cache tokens (LiteLLM's Anthropic
    transformation adds both), which are also given apart for whoever prices them differently. total_tokens is
    prompt + completion: each shape's own total is that sum (Gemini's counts thinking and tool-use prompts, and so
    do prompt and completion here), and Anthropic and Cohere give none.
    """

    model: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


def worth_reading(data: bytes) -> bool:
    """Whether a piece of an answer may hold counts: most events of a stream carry only text (or OpenAI's "usage":
    null) and are not worth a json.loads. An answer's model comes in the same event as its counts, so an event with a
    model alone is no loss (Anthropic's message_start, OpenAI's last chunk, each Gemini chunk, response.completed)."""
    return (b"usage" in data or b'"meta"' in data) and COUNTS.search(data) is not None


@dataclass(slots=True)
class Tally:
    """The counts and model seen so far in one answer, as reported: an event overrides what it reports again (the
    output_tokens of Anthropic's last message_delta replace message_start's), and keeps what it leaves out."""

    model: str | None = None
    input: int | None = None
    output: int | None = None
    cache_creation: int | None = None
    cache_read: int | None = None

    def read(self, answer: Any) -> None:
        """Take the counts and model from a parsed answer or event, in whichever provider's shape it has."""
        if isinstance(answer, list):  # Gemini's streamGenerateContent without alt=sse: one JSON array of answers
            for item in answer:
                if isinstance(item, dict):
                    self.read(item)
        elif isinstance(answer, dict):
            self._part(answer)
            # message_start (Anthropic), response.* (OpenAI Responses), stream-end (Cohere v1), message-end (v2)
            for name in ("message", "response", "delta"):
                inner = answer.get(name)
                if isinstance(inner, dict):
                    self._part(inner)

    def usage(self, request_model: str | None) -> Usage | None:
        """The Usage seen so far, the answer's model first; None while no count was seen."""
        if self.input is None and self.output is None:
            return None
        cache_creation, cache_read = self.cache_creation or 0, self.cache_read or 0
        prompt = (self.input or 0) + cache_creation + cache_read
        completion = self.output or 0
        return Usage(self.model or request_model, prompt, completion, prompt + completion, cache_creation, cache_read)

    def _part(self, part: dict[str, Any]) -> None:
        if self.model is None:
            model = part.get("model") or part.get("modelVersion")  # Azure's first chunk has "model": ""
            if isinstance(model, str) and len(model) <= MODEL_CAP:
                self.model = model
        usage, metadata, meta = part.get("usage"), part.get("usageMetadata"), part.get("meta")
        if isinstance(usage, dict):
            billed, tokens = usage.get("billed_units"), usage.get("tokens")
            if isinstance(billed, dict) or isinstance(tokens, dict):
                self._cohere(billed, tokens)  # v2
            else:
                self._openai_or_anthropic(usage)
        elif isinstance(metadata, dict):
            # Gemini bills thinking as output and tool-use prompts as input (its totalTokenCount counts both).
            self._count(
                _add(_int(metadata, "promptTokenCount"), _int(metadata, "toolUsePromptTokenCount")),
                _add(_int(metadata, "candidatesTokenCount"), _int(metadata, "thoughtsTokenCount")),
            )
        elif isinstance(meta, dict):
            self._cohere(meta.get("billed_units"), meta.get("tokens"))  # v1

    def _openai_or_anthropic(self, usage: dict[str, Any]) -> None:
        # OpenAI's cached tokens are part of prompt_tokens already; Anthropic's two cache counts are apart from
        # input_tokens, and usage() adds them.
        cache_creation, cache_read = _int(usage, "cache_creation_input_tokens"), _int(usage, "cache_read_input_tokens")
        if cache_creation is not None:
            self.cache_creation = cache_creation
        if cache_read is not None:
            self.cache_read = cache_read
        prompt, completion = _int(usage, "prompt_tokens"), _int(usage, "completion_tokens")
        self._count(
            _int(usage, "input_tokens") if prompt is None else prompt,  # Responses API and Anthropic: input/output
            _int(usage, "output_tokens") if completion is None else completion,
        )

    def _cohere(self, billed: Any, tokens: Any) -> None:
        """billed_units is what Cohere bills; tokens (which counts its prompt template too) only where it lacks."""
        billed = billed if isinstance(billed, dict) else {}
        tokens = tokens if isinstance(tokens, dict) else {}
        input, output = _int(billed, "input_tokens"), _int(billed, "output_tokens")
        self._count(
            _int(tokens, "input_tokens") if input is None else input,
            _int(tokens, "output_tokens") if output is None else output,
        )

    def _count(self, input: int | None, output: int | None) -> None:
        if input is not None:
            self.input = input
        if output is not None:
            self.output = output


def _int(part: dict[str, Any], key: str) -> int | None:
    value = part.get(key)
    return value if type(value) is int and 0 <= value < COUNT_CAP else None  # not a bool, a float or a negative


def _add(first: int | None, second: int | None) -> int | None:
    return first if second is None else second + (first or 0)


def model_from_prefix(prefix: bytes) -> str | None:
    """The top-level "model" of a JSON request, from its first PREFIX_CAP bytes; None rather than a guess.

    The object is walked key by key, each value read whole (so a "model" nested in a value is never taken), up to the
    top-level "model"; a prefix that ends first, inside that value or before it, gives None, as does anything not JSON.
    So does a second "model" further on: a duplicate key is read last-wins by most parsers, and which one the upstream
    reads is not ours to guess (a nested one there costs an answer we could have given, never a wrong one).
    """
    if b'"model"' not in prefix:
        return None
    text = prefix[:PREFIX_CAP].decode("utf-8", "replace")  # a character cut at the end spoils only a value cut there
    try:
        at = _skip(text, 0)
        if text[at] != "{":
            return None
        at += 1
        while True:
            at = _skip(text, at)
            if text[at] != '"':
                return None  # the object's end, or not JSON
            key, at = _DECODER.raw_decode(text, at)
            at = _skip(text, at)
            if text[at] != ":":
                return None
            value, at = _DECODER.raw_decode(text, _skip(text, at + 1))  # raises on a value the prefix cut off
            if key == "model":
                if text.find('"model"', at) >= 0 or not isinstance(value, str):
                    return None
                return value if 0 < len(value) <= MODEL_CAP else None
            at = _skip(text, at)
            if text[at] != ",":
                return None
            at += 1
    except (ValueError, IndexError, RecursionError):  # cut off, not JSON, or nested past the parser's depth
        return None


def _skip(text: str, at: int) -> int:
    """Past the JSON whitespace at `at`."""
    while text[at : at + 1] in _SPACE:
        at += 1
    return at


def response_cost(headers: Mapping[str, str]) -> float | None:
    """The cost an upstream LiteLLM put in x-litellm-response-cost; None when absent or not a finite number ≥ 0."""
    value = headers.get(COST_HEADER)
    if value is None or not COST.fullmatch(value.strip()):
        return None
    cost = float(value)
    return cost if math.isfinite(cost) else None  # "1e999" overflows to inf
