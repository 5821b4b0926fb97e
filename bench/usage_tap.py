"""The usage tap's CPU per answer, by hand: `.venv/bin/python bench/usage_tap.py`.

Issue 16's target: reading the usage of a ~1 KB OpenAI JSON answer costs at most 5 % of a call's CPU (~700 µs, so
well under 35 µs); a non-JSON download gets no tap at all. Each row times the whole of one answer's tap: tap_for, every
feed() and usage(), with process CPU time (best of 7 repeats, each a loop of thousands of answers).
"""

from __future__ import annotations

import gzip
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from passthru.usage import model_from_prefix  # noqa: E402
from passthru.usage_tap import tap_for  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "usage"


def chat_stream(events: int) -> list[bytes]:
    """An OpenAI chat stream with include_usage, one event a chunk as it arrives: `events` events in all."""
    base = {"id": "chatcmpl-7ZZ9a8BCdXJDyB5pSWvnOnfMEVPsz", "object": "chat.completion.chunk", "created": 1719353436,
            "model": "gpt-4o-mini-2024-07-18", "system_fingerprint": "fp_ce0793330f"}  # fmt: skip
    chunks = []
    for n in range(events - 2):
        delta = {"index": 0, "delta": {"content": f" word{n}"}, "logprobs": None, "finish_reason": None}
        chunks.append(dict(base, choices=[delta], usage=None))
    chunks.append(dict(base, choices=[], usage={"prompt_tokens": 9, "completion_tokens": 18, "total_tokens": 27}))
    return [b"data: " + json.dumps(c, separators=(",", ":")).encode() + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]


def tap_once(content_type: str, encoding: str | None, chunks: list[bytes]) -> Callable[[], object]:
    def run() -> object:
        tap = tap_for(content_type, encoding, "gpt-4o")
        assert tap is not None
        for chunk in chunks:
            tap.feed(chunk)
        return tap.usage()

    assert run() is not None
    return run


def cpu_us(run: Callable[[], object], loops: int) -> float:
    best = float("inf")
    for _ in range(7):
        started = time.process_time()
        for _ in range(loops):
            run()
        best = min(best, time.process_time() - started)
    return best / loops * 1e6


def main() -> None:
    chat = (FIXTURES / "openai_chat.json").read_bytes()
    stream = chat_stream(20)
    anthropic = [event + b"\n\n" for event in (FIXTURES / "anthropic_messages_stream.sse").read_bytes().split(b"\n\n")]
    request = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 2000}]}).encode()

    def no_tap() -> object:
        return tap_for("application/octet-stream", None, "gpt-4o")

    rows = [
        (f"OpenAI chat JSON, {len(chat)} B, one chunk", tap_once("application/json", None, [chat]), 20000),
        (f"the same, gzip ({len(gzip.compress(chat))} B)", tap_once("application/json", "gzip", [gzip.compress(chat)]),
         20000),
        (f"OpenAI chat SSE, 20 events ({sum(map(len, stream))} B), one a chunk",
         tap_once("text/event-stream", None, stream), 5000),
        (f"Anthropic SSE fixture, 8 events ({sum(map(len, anthropic))} B), one a chunk",
         tap_once("text/event-stream", None, anthropic), 5000),
        ("non-JSON answer: tap_for gives None", no_tap, 200000),
        (f"model_from_prefix, {len(request)} B request, model first", lambda: model_from_prefix(request[:4096]), 50000),
    ]  # fmt: skip
    print("| answer | CPU per answer |")
    print("|---|---:|")
    for name, run, loops in rows:
        print(f"| {name} | {cpu_us(run, loops):.2f} µs |")


if __name__ == "__main__":
    main()
