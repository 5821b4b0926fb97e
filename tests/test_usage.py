"""Usage read from answers (usage.py, usage_tap.py): every provider shape in tests/fixtures/usage, fed whole and in
every split, plain, gzip and deflate; the caps, the zip bomb, a stream cut short; the request's model from its first
bytes; the cost header. Hostile bytes never raise and never grow a buffer past its cap."""

from __future__ import annotations

import gzip
import json
import math
import random
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from urllib3 import HTTPHeaderDict

from passthru import usage_tap
from passthru.pricing import Prices, Pricing
from passthru.usage import (
    COUNT_CAP,
    MODEL_CAP,
    PREFIX_CAP,
    Tally,
    Usage,
    model_from_prefix,
    response_cost,
    worth_reading,
)
from passthru.usage_tap import EVENT_CAP, JSON_CAP, PIECE, Tap, tap_for

FIXTURES = Path(__file__).parent / "fixtures" / "usage"
REQUEST_MODEL = "model-of-the-request"
TYPES = {".json": "application/json", ".sse": "text/event-stream", ".jsonl": "application/stream+json"}

# file: model, prompt, completion, total, cache creation, cache read
EXPECTED = {
    "openai_chat.json": ("gpt-4o-2024-08-06", 1117, 46, 1163, 0, 0),
    "openai_chat_stream.sse": ("gpt-4o-mini-2024-07-18", 9, 9, 18, 0, 0),
    "openai_completions.json": ("gpt-3.5-turbo-instruct", 5, 7, 12, 0, 0),
    "openai_embeddings.json": ("text-embedding-3-small", 8, 0, 8, 0, 0),
    "openai_responses.json": ("gpt-4.1-2025-04-14", 36, 87, 123, 0, 0),
    "openai_responses_stream.sse": ("gpt-4.1-2025-04-14", 37, 11, 48, 0, 0),
    # prompt_tokens = input + both cache counts, as LiteLLM's Anthropic transformation adds them
    "anthropic_messages.json": ("claude-sonnet-4-20250514", 21 + 188086, 393, 21 + 188086 + 393, 188086, 0),
    "anthropic_messages_stream.sse": ("claude-3-7-sonnet-20250219", 25 + 10 + 1024, 15, 1074, 10, 1024),
    # completion = candidates + thoughts (billed as output); total as Gemini gives it
    "gemini_generate.json": ("gemini-2.5-flash", 8, 19 + 1045, 1072, 0, 0),
    "gemini_stream.sse": ("gemini-2.0-flash", 10, 30, 40, 0, 0),
    "gemini_stream_array.json": ("gemini-1.5-flash-002", 7, 12, 19, 0, 0),
    # Cohere names no model: the request's; billed_units, not tokens
    "cohere_v1_chat.json": (REQUEST_MODEL, 31738, 35, 31773, 0, 0),
    "cohere_v1_chat_stream.jsonl": (REQUEST_MODEL, 29, 9, 38, 0, 0),
    "cohere_v2_chat.json": (REQUEST_MODEL, 5, 418, 423, 0, 0),
    "cohere_v2_chat_stream.sse": (REQUEST_MODEL, 3, 3, 6, 0, 0),
}
NAMES = sorted(EXPECTED)


def body_of(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def type_of(name: str) -> str:
    return TYPES[Path(name).suffix]


def expected(name: str) -> Usage:
    return Usage(*EXPECTED[name])


def tapped(name: str, encoding: str | None = None) -> Any:
    """A tap for an answer like this file (Any: the tests look at its buffers)."""
    tap = tap_for(type_of(name), encoding, REQUEST_MODEL)
    assert tap is not None
    return tap


def read(tap: Tap, chunks: Iterator[bytes] | list[bytes]) -> Usage | None:
    for chunk in chunks:
        tap.feed(chunk)
    return tap.usage()


def pieces(body: bytes, sizes: list[int]) -> Iterator[bytes]:
    at = 0
    for size in sizes:
        yield body[at : at + size]
        at += size
    yield body[at:]


def chunkings(body: bytes, seed: int, count: int = 20) -> Iterator[list[bytes]]:
    """The whole body, 1-byte chunks, and `count` random chunkings (sizes 1 to 64), the same each run."""
    yield [body]
    yield [body[i : i + 1] for i in range(len(body))]
    rng = random.Random(seed)
    for _ in range(count):
        sizes, left = [], len(body)
        while left > 0:
            sizes.append(min(rng.randint(1, 64), left))
            left -= sizes[-1]
        yield list(pieces(body, sizes))


def test_every_fixture_is_expected() -> None:
    assert sorted(p.name for p in FIXTURES.iterdir() if p.suffix in TYPES) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_usage_from_each_shape_whole_and_in_every_split(name: str) -> None:
    body = body_of(name)
    assert read(tapped(name), [body]) == expected(name)
    for at in range(len(body) + 1):  # every split into two
        assert read(tapped(name), [body[:at], body[at:]]) == expected(name), at
    for n, chunks in enumerate(chunkings(body, seed=len(body))):
        assert read(tapped(name), chunks) == expected(name), n


def deflate(body: bytes, wbits: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    return packer.compress(body) + packer.flush()


ENCODINGS = [
    pytest.param("gzip", gzip.compress, id="gzip"),
    pytest.param("x-gzip", gzip.compress, id="x-gzip"),
    pytest.param("deflate", lambda body: deflate(body, zlib.MAX_WBITS), id="deflate-zlib"),
    pytest.param("deflate", lambda body: deflate(body, -zlib.MAX_WBITS), id="deflate-raw"),
    pytest.param("GZIP ", gzip.compress, id="gzip-spelled-loosely"),
]


@pytest.mark.parametrize("name", [name for name in NAMES if not name.endswith(".json")])
def test_usage_from_streams_one_event_a_chunk(name: str) -> None:
    separator = b"\r\n\r\n" if name.startswith("gemini") else b"\n" if name.endswith(".jsonl") else b"\n\n"
    events = [event + separator for event in body_of(name).split(separator)[:-1]]
    assert b"".join(events) == body_of(name)
    assert read(tapped(name), events) == expected(name)
    huge = b'{"usage": {"input_tokens": 1000000}, "image": "' + b"A" * EVENT_CAP + b'"}'
    huge = (huge if name.endswith(".jsonl") else b"data: " + huge) + separator
    tap = tapped(name)
    assert read(tap, [*events, huge]) == expected(name)  # one whole event over the cap: not read
    assert tap.lost is not None


@pytest.mark.parametrize(("encoding", "compress"), ENCODINGS)
@pytest.mark.parametrize("name", NAMES)
def test_usage_from_compressed_answers(name: str, encoding: str, compress: Any) -> None:
    packed = compress(body_of(name))
    for n, chunks in enumerate(chunkings(packed, seed=len(packed), count=5)):
        assert read(tapped(name, encoding), chunks) == expected(name), n


@pytest.mark.parametrize(
    ("line_end", "name"),
    [
        pytest.param(b"\r\n", "anthropic_messages_stream.sse", id="crlf"),
        pytest.param(b"\r", "anthropic_messages_stream.sse", id="cr"),
        pytest.param(b"\r\n", "cohere_v1_chat_stream.jsonl", id="crlf-lines"),
        pytest.param(b"\n", "gemini_stream.sse", id="gemini-crlf-made-lf"),
    ],
)
def test_any_sse_line_end_in_every_split(line_end: bytes, name: str) -> None:
    body = body_of(name).replace(b"\r\n", b"\n").replace(b"\n", line_end)
    for at in range(len(body) + 1):  # a \r\n split between two chunks is one line end, not two
        assert read(tapped(name), [body[:at], body[at:]]) == expected(name), at


def test_a_line_end_split_between_chunks_is_one_line_end() -> None:
    event = b'data: {"type": "message_delta",\r\ndata: "usage": {"output_tokens": 15}}\r\n\r\n'
    for at in range(len(event) + 1):  # a \r at one chunk's end and a \n at the next one's start: no blank line
        assert read(tapped("x.sse"), [event[:at], event[at:]]) == Usage(REQUEST_MODEL, 0, 15, 15), at


def test_the_last_json_line_needs_no_newline() -> None:
    name = "cohere_v1_chat_stream.jsonl"
    assert read(tapped(name), [body_of(name).rstrip(b"\n")]) == expected(name)


def test_an_sse_event_spread_over_data_lines_is_joined() -> None:
    event = b'event: message_delta\ndata: {"type": "message_delta",\ndata:  "usage": {"output_tokens": 15}}\n\n'
    assert read(tapped("x.sse"), [b": a comment\n\n", b"retry: 10\n\n", event]) == Usage(REQUEST_MODEL, 0, 15, 15)
    assert read(tapped("x.sse"), [b'data:{"usage": {"output_tokens": 2}}\n\n']) == Usage(REQUEST_MODEL, 0, 2, 2)


# --- a stream cut short: what was seen is charged ----------------------------------------------------------------


def test_a_stream_cut_after_message_start_gives_its_input_tokens() -> None:
    body = body_of("anthropic_messages_stream.sse")
    end = body.index(b"\n\n") + 2  # the end of message_start
    tap = tapped("anthropic_messages_stream.sse")
    tap.feed(body[:end])
    assert tap.usage() == Usage("claude-3-7-sonnet-20250219", 25 + 10 + 1024, 1, 1060, 10, 1024)
    tap.feed(body[end : body.index(b"message_delta") + 40])  # and in the middle of message_delta: still message_start's
    assert tap.usage() == Usage("claude-3-7-sonnet-20250219", 25 + 10 + 1024, 1, 1060, 10, 1024)
    tap.feed(body[body.index(b"message_delta") + 40 :])
    assert tap.usage() == expected("anthropic_messages_stream.sse")


def test_usage_may_be_asked_at_every_byte() -> None:
    name = "anthropic_messages_stream.sse"
    body, tap = body_of(name), tapped(name)
    for i in range(len(body)):
        tap.feed(body[i : i + 1])
        tap.usage()
    assert tap.usage() == expected(name)


def test_a_half_read_last_line_counts_only_while_it_may_be_whole() -> None:
    tap = tapped("x.jsonl")
    tap.feed(b'{"usage": {"input_tokens": 5}}')
    assert tap.usage() == Usage(REQUEST_MODEL, 5, 0, 5)  # the caller hung up here: it counts
    tap.feed(b" and more: not JSON after all\n")
    assert tap.usage() is None


def test_no_usage_before_any_count_and_none_in_a_stream_without_one() -> None:
    tap = tapped("x.sse")
    assert tap.usage() is None
    chat = body_of("openai_chat_stream.sse")
    without = chat[: chat.index(b'data: {"id"', len(chat) - 600)] + b"data: [DONE]\n\n"  # no include_usage
    assert b'"usage":{' not in without
    assert read(tap, [without]) is None


def test_a_json_answer_cut_short_has_no_usage() -> None:
    body = body_of("openai_chat.json")
    assert read(tapped("x.json"), [body[:-10]]) is None


def test_a_json_answer_is_parsed_again_only_when_more_came() -> None:
    tap = tap_for("application/json", None, None)
    assert tap is not None
    body = body_of("openai_embeddings.json")
    tap.feed(body[:100])
    assert tap.usage() is None
    tap.feed(body[100:])
    assert tap.usage() == tap.usage() == expected("openai_embeddings.json")


# --- which answers get a tap --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "Application/JSON", "application/problem+json",
     "text/event-stream", "text/event-stream;charset=UTF-8", "application/x-ndjson", "application/stream+json",
     "application/jsonl"],
)  # fmt: skip
def test_json_and_event_streams_get_a_tap(content_type: str) -> None:
    assert tap_for(content_type, None, None) is not None
    assert tap_for(content_type, "identity", None) is not None


@pytest.mark.parametrize(
    "content_type",
    [None, "", "application/octet-stream", "text/html", "text/plain", "image/png", "multipart/form-data; boundary=x",
     "application/jsonx", "audio/mpeg"],
)  # fmt: skip
def test_other_answers_get_no_tap(content_type: str | None) -> None:
    assert tap_for(content_type, None, "m") is None


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "gzip, br", "gzip, gzip", "x-unknown"])
def test_encodings_the_standard_library_cannot_undo_get_no_tap(encoding: str) -> None:
    assert tap_for("application/json", encoding, "m") is None


# --- caps: memory stays bounded, and the loss is told --------------------------------------------------------------


def test_a_json_answer_over_the_cap_has_no_usage_and_says_so() -> None:
    filler = json.dumps({"data": "x" * JSON_CAP, "model": "m", "usage": {"prompt_tokens": 1}}).encode()
    tap = tapped("x.json")
    assert tap.lost is None
    for at in range(0, len(filler), 65536):
        tap.feed(filler[at : at + 65536])
    assert tap.usage() is None
    assert tap.lost is not None and str(JSON_CAP) in tap.lost
    assert tap.chunks == []


def test_a_json_answer_at_the_cap_is_read() -> None:
    usage = b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}, "pad": "'
    body = usage + b"x" * (JSON_CAP - len(usage) - 2) + b'"}'
    assert len(body) == JSON_CAP
    tap = tapped("x.json")
    assert read(tap, [body]) == Usage(REQUEST_MODEL, 1, 2, 3)
    assert tap.lost is None


@pytest.mark.parametrize("chunk", [1000, 65536, 1 << 20], ids=["1000", "64k", "whole"])
@pytest.mark.parametrize("name", ["anthropic_messages_stream.sse", "cohere_v1_chat_stream.jsonl"])
def test_an_event_over_the_cap_is_skipped_and_the_counts_after_it_are_read(name: str, chunk: int) -> None:
    body = body_of(name)
    separator = b"\n" if name.endswith(".jsonl") else b"\n\n"
    # Counts the skipped event would have given, were it read: Anthropic's message_delta gives no input of its own.
    huge = b'{"usage": {"input_tokens": 1000000}, "image": "' + b"A" * EVENT_CAP + b'"}'
    if separator == b"\n\n":
        huge = b"data: " + huge
    stream = body + huge + separator if name.endswith(".jsonl") else huge + separator + body
    tap = tapped(name)
    held = 0
    for at in range(0, len(stream), chunk):
        tap.feed(stream[at : at + chunk])
        held = max(held, len(tap.buffer))
    assert held <= EVENT_CAP
    assert tap.usage() == expected(name)  # not the skipped event's million
    assert tap.lost is not None and str(EVENT_CAP) in tap.lost


def test_the_end_of_a_skipped_event_may_be_split_between_chunks() -> None:
    name = "anthropic_messages_stream.sse"
    huge = b'data: {"usage": {"input_tokens": 1000000}, "image": "' + b"A" * EVENT_CAP + b'"}'
    tap = tapped(name)
    assert read(tap, [huge + b"\n", b"\n" + body_of(name)]) == expected(name)


def test_an_event_at_the_cap_is_read() -> None:
    head = b'data: {"usage": {"prompt_tokens": 7}, "pad": "'
    event = head + b"x" * (EVENT_CAP - len(head) - 2) + b'"}'
    assert len(event) == EVENT_CAP
    tap = tapped("x.sse")
    for at in range(0, len(event), 4096):
        tap.feed(event[at : at + 4096])
    tap.feed(b"\n\n")
    assert tap.usage() == Usage(REQUEST_MODEL, 7, 0, 7)
    assert tap.lost is None


class Recorder:
    """Stands in for the inner tap of a compressed answer: records the size of each decompressed piece."""

    lost: str | None = None

    def __init__(self) -> None:
        self.largest = 0
        self.total = 0

    def feed(self, chunk: bytes) -> None:
        self.largest = max(self.largest, len(chunk))
        self.total += len(chunk)

    def usage(self) -> Usage | None:
        return None


def bomb(size: int, before: bytes = b"", after: bytes = b"") -> bytes:
    """A gzip stream that inflates to `before`, `size` bytes of "x", then `after`; made a MiB at a time."""
    packer = zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    block = b"x" * (1 << 20)
    parts = [packer.compress(before)] + [packer.compress(block) for _ in range(size >> 20)]
    return b"".join(parts) + packer.compress(after) + packer.flush()


def test_a_zip_bomb_is_decompressed_a_piece_at_a_time() -> None:
    packed = bomb(64 << 20)
    assert len(packed) < (1 << 20)  # 64 MiB in well under one
    tap = tapped("x.sse", "gzip")
    recorder = tap.inner = Recorder()
    for at in range(0, len(packed), 16384):
        tap.feed(packed[at : at + 16384])
        assert len(tap.inflater.unconsumed_tail) <= 16384
    assert recorder.largest == PIECE
    assert recorder.total == 64 << 20


def test_a_zip_bomb_json_answer_stops_being_decompressed_at_the_cap() -> None:
    packed = bomb(64 << 20, before=b'{"a": "')
    tap = tapped("x.json", "gzip")
    for at in range(0, len(packed), 16384):
        tap.feed(packed[at : at + 16384])
    assert tap.inner.chunks == [] and JSON_CAP < tap.inner.size <= JSON_CAP + PIECE  # it stopped just past the cap
    assert not tap.inflater.eof  # and decompressed nothing more
    assert tap.usage() is None and tap.lost is not None


def test_a_zip_bomb_event_stream_stays_within_its_cap_and_reads_the_counts_after() -> None:
    packed = bomb(32 << 20, before=b"data: ", after=b'\n\ndata: {"usage": {"input_tokens": 5, "output_tokens": 6}}\n\n')
    tap = tapped("x.sse", "gzip")
    for at in range(0, len(packed), 16384):
        tap.feed(packed[at : at + 16384])
        assert len(tap.inner.buffer) <= EVENT_CAP
    assert tap.usage() == Usage(REQUEST_MODEL, 5, 6, 11)
    assert tap.lost is not None and str(EVENT_CAP) in tap.lost


def test_a_zip_bomb_stream_stops_being_decompressed_past_the_inflate_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bounded memory alone would let a small bomb cost seconds of CPU: past INFLATE_CAP the tap stops reading."""
    monkeypatch.setattr(usage_tap, "INFLATE_CAP", 4 << 20)
    packed = bomb(16 << 20, before=b"data: ", after=b'\n\ndata: {"usage": {"input_tokens": 5}}\n\n')
    tap = tapped("x.sse", "gzip")
    recorder = tap.inner = Recorder()
    for at in range(0, len(packed), 16384):
        tap.feed(packed[at : at + 16384])
    assert recorder.total <= 4 << 20 and not tap.inflater.eof
    assert tap.usage() is None and tap.lost == f"an answer that decompresses to over {4 << 20} bytes"


def test_bytes_after_the_gzip_end_are_not_kept() -> None:
    tap = tapped("x.json", "gzip")
    tap.feed(gzip.compress(body_of("openai_chat.json")))
    for _ in range(100):
        tap.feed(b"trailing garbage " * 1000)
    assert tap.inflater.unused_data == b""
    assert tap.usage() == expected("openai_chat.json")


def test_an_answer_that_does_not_decompress_has_no_usage_and_says_so() -> None:
    tap = tapped("openai_chat.json", "gzip")
    tap.feed(b"this is not gzip at all" + body_of("openai_chat.json"))
    assert tap.usage() is None
    assert tap.lost is not None and "decompress" in tap.lost


# --- the counts of one answer -------------------------------------------------------------------------------------


def tally_of(*answers: Any) -> Usage | None:
    tally = Tally()
    for answer in answers:
        tally.read(answer)
    return tally.usage(REQUEST_MODEL)


def test_a_later_event_overrides_what_it_reports_and_keeps_the_rest() -> None:
    first = {"message": {"usage": {"input_tokens": 10, "cache_read_input_tokens": 4, "output_tokens": 1}}}
    later = {"usage": {"output_tokens": 5}}
    assert tally_of(first, later) == Usage(REQUEST_MODEL, 14, 5, 19, 0, 4)
    assert tally_of(first, later, {"usage": {"cache_read_input_tokens": 0}}) == Usage(REQUEST_MODEL, 10, 5, 15)


def test_gemini_tool_use_prompts_count_as_prompt() -> None:
    metadata = {"promptTokenCount": 10, "toolUsePromptTokenCount": 7, "candidatesTokenCount": 3, "totalTokenCount": 20}
    assert tally_of({"usageMetadata": metadata}) == Usage(REQUEST_MODEL, 17, 3, 20)


@pytest.mark.parametrize(
    "counts",
    [{"prompt_tokens": True}, {"prompt_tokens": -1}, {"prompt_tokens": 1.5}, {"prompt_tokens": "7"},
     {"prompt_tokens": None}, {"prompt_tokens": [1]}, {"prompt_tokens": 1 << 53}, {"prompt_tokens": 10**4000}],
)  # fmt: skip
def test_counts_that_are_not_whole_numbers_are_not_counts(counts: dict[str, Any]) -> None:
    assert tally_of({"usage": counts}) is None


def test_a_model_that_is_empty_or_not_a_name_is_not_taken() -> None:
    assert tally_of({"model": "", "usage": {"prompt_tokens": 1}}) == Usage(REQUEST_MODEL, 1, 0, 1)  # Azure's first
    assert tally_of(
        {"model": "", "choices": []}, {"model": "gpt-4o", "usage": {}}, {"usage": {"prompt_tokens": 1}}
    ) == (Usage("gpt-4o", 1, 0, 1))
    assert tally_of({"model": "m" * (MODEL_CAP + 1), "usage": {"prompt_tokens": 1}}) == Usage(REQUEST_MODEL, 1, 0, 1)
    assert tally_of({"model": {"id": "m"}, "usage": {"prompt_tokens": 1}}) == Usage(REQUEST_MODEL, 1, 0, 1)
    assert tally_of({"model": "first"}, {"model": "second", "usage": {"prompt_tokens": 1}}) == Usage("first", 1, 0, 1)


def test_cohere_tokens_count_where_billed_units_lack() -> None:
    assert tally_of({"meta": {"tokens": {"input_tokens": 9, "output_tokens": 4}}}) == Usage(REQUEST_MODEL, 9, 4, 13)
    both = {"usage": {"billed_units": {"input_tokens": 2}, "tokens": {"input_tokens": 9, "output_tokens": 4}}}
    assert tally_of(both) == Usage(REQUEST_MODEL, 2, 4, 6)


def test_only_events_that_may_hold_counts_are_parsed() -> None:
    escaped = json.dumps({"delta": {"text": 'say "usage": {"prompt_tokens": 5}'}}).encode()
    assert b'\\"usage\\": {' in escaped
    assert not worth_reading(escaped)  # text that mentions usage
    assert not worth_reading(b'{"choices": [{"delta": {"content": "Hi"}}], "usage":null}')  # include_usage's chunks
    assert not worth_reading(b'{"type": "content_block_delta", "delta": {"text": "the meta of it"}}')
    for counts in (b'"usage":{', b'"usage" : {', b'"usageMetadata": {', b'"meta":{'):
        assert worth_reading(b'{"x": 1, ' + counts + b'"y": 2}}')


def test_json_nested_past_the_parsers_depth_is_no_usage() -> None:
    deep = b'{"usage": {"prompt_tokens": 1}, "x": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    assert read(tapped("x.json"), [deep]) is None
    assert read(tapped("x.sse"), [b"data: " + deep + b"\n\n"]) is None


# --- hostile bytes -----------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from([("x.json", None), ("x.sse", None), ("x.jsonl", None), ("x.sse", "gzip"),
                          ("x.json", "deflate")]),
    chunks=st.lists(st.binary(max_size=200) | st.sampled_from([b"\r", b"\n", b"\r\n", b"data: ", b'{"usage":{']),
                    max_size=40),
)  # fmt: skip
def test_any_bytes_never_raise(kind: tuple[str, str | None], chunks: list[bytes]) -> None:
    tap = tap_for(TYPES[Path(kind[0]).suffix], kind[1], None)
    assert tap is not None
    for chunk in chunks:
        tap.feed(chunk)
        tap.usage()


# --- the request's model --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "model"),
    [
        pytest.param(b'{"model": "gpt-4o", "messages": []}', "gpt-4o", id="first"),
        pytest.param(b' \n{\t"model" :\r\n"gpt-4o" }', "gpt-4o", id="whitespace"),
        pytest.param(b'{"messages": [{"role": "user", "content": "hi", "model": "nested"}], "model": "top"}', "top",
                     id="nested-one-skipped"),
        pytest.param(b'{"metadata": {"model": "nested"}, "stream": true}', None, id="only-nested"),
        pytest.param(b'{"prompt": "\\"model\\": \\"evil\\"", "model": "real"}', "real", id="in-a-string"),
        pytest.param(b'{"base_model": "base", "model": "real"}', "real", id="a-key-ending-in-model"),
        pytest.param(b'{"model": "cheap", "stream": true, "model": "dear"}', None, id="a-duplicate-key"),
        pytest.param(b'{"model": "m", "messages": [{"content": "x"}], "metadata": {"model": "n"}}', None,
                     id="nested-after-the-model-too"),
        pytest.param(b'{"model": "m", "messages": [{"content": "say \\"model\\""}]}', "m", id="mentioned-after"),
        pytest.param(b'{"model": "gpt-4', None, id="cut-in-the-value"),
        pytest.param(b'{"model": "gpt-4o"', "gpt-4o", id="cut-after-the-value"),
        pytest.param(b'{"messages": [{"role": "user", "content": "a long prompt', None, id="cut-before"),
        pytest.param(b'{"model": "\xc3\xa9t\xc3', None, id="cut-in-a-character"),
        pytest.param(b'{"model": "a\\"b\\u00e9"}', 'a"b\u00e9', id="escapes"),
        pytest.param(b'{"model": 5}', None, id="not-a-string"),
        pytest.param(b'{"model": ""}', None, id="empty"),
        pytest.param(b'{"model": "' + b"m" * (MODEL_CAP + 1) + b'"}', None, id="too-long"),
        pytest.param(b'[{"model": "x"}]', None, id="an-array"),
        pytest.param(b'{"model" "x"}', None, id="no-colon"),
        pytest.param(b'{"a": 1 "model": "x"}', None, id="no-comma"),
        pytest.param(b'model=x&"model"', None, id="a-form"),
        pytest.param(b"", None, id="empty-body"),
        pytest.param(b'{"a": ' + b"[" * 3000 + b"]" * 3000 + b', "model": "x"}', None, id="nested-too-deep"),
    ],
)  # fmt: skip
def test_model_from_prefix(prefix: bytes, model: str | None) -> None:
    assert model_from_prefix(prefix) == model


def test_model_past_the_prefix_cap_is_not_read() -> None:
    before = b'{"messages": [{"role": "user", "content": "' + b"x" * PREFIX_CAP + b'"}], '
    assert model_from_prefix(before + b'"model": "m"}') is None
    assert model_from_prefix(b'{"model": "m", "messages": [{"content": "' + b"x" * PREFIX_CAP + b'"}]}') == "m"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["model", "a", "b", "m"]), inner,
                                                                   max_size=4),
    max_leaves=12,
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(
    answer=st.dictionaries(st.sampled_from(["model", "messages", "modelx", "x_model", "x"]), JSON_VALUES, max_size=5),
    cut=st.integers(min_value=0, max_value=2000),
    indent=st.sampled_from([None, 1]),
)
def test_model_from_prefix_is_the_top_level_model_or_none(answer: dict[str, Any], cut: int, indent: int | None) -> None:
    body = json.dumps(answer, indent=indent, ensure_ascii=False).encode()
    model = answer.get("model")
    found = model_from_prefix(body[:cut])
    assert found is None or found == model  # never a wrong answer
    whole = isinstance(model, str) and 0 < len(model) <= MODEL_CAP and len(body) <= PREFIX_CAP
    if whole and body.count(b'"model"') == 1:  # a nested "model" after the top-level one gives None
        assert model_from_prefix(body) == model


# --- the cost header and the price ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "cost"),
    [("0.0123", 0.0123), ("0", 0.0), (" 0.5 ", 0.5), ("1e-5", 1e-5), (".5", 0.5), ("5.", 5.0), ("2E+1", 20.0),
     ("nan", None), ("NaN", None), ("inf", None), ("Infinity", None), ("1e999", None), ("-1", None), ("-0", None),
     ("", None), ("abc", None), ("1_000", None), ("0x10", None), ("1,5", None), ("$1", None)],
)  # fmt: skip
def test_response_cost(value: str, cost: float | None) -> None:
    assert response_cost({"x-litellm-response-cost": value}) == cost


def test_response_cost_header_name_in_any_case_and_absent() -> None:
    assert response_cost(HTTPHeaderDict({"X-LiteLLM-Response-Cost": "0.25"})) == 0.25
    assert response_cost(HTTPHeaderDict({"content-type": "application/json"})) is None


def test_the_largest_counts_still_make_a_price() -> None:
    body = (
        b'{"usage": {"input_tokens": 9007199254740991, "cache_read_input_tokens": 9007199254740991, "output_tokens": '
    )
    usage = read(tapped("x.json"), [body + b"9" * 4000 + b"}}"])  # a count 4,000 digits long is no count
    assert usage == Usage(REQUEST_MODEL, 2 * (COUNT_CAP - 1), 0, 2 * (COUNT_CAP - 1), 0, COUNT_CAP - 1)
    assert math.isfinite(Pricing(1.0, Prices(1e-6, 1e-6), {}).cost(usage, None))
