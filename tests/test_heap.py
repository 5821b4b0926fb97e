"""The C heap's trim and arena limit (glibc; a no-op elsewhere)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from passthru.server import heap


def test_heap_trimmed_once_per_trim_every_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(heap, "_trim", lambda pad: calls.append(pad) or 1)
    monkeypatch.setattr(heap, "_since_trim", 0)
    heap.relayed(heap.TRIM_EVERY - 1)
    assert calls == []
    heap.relayed(1)  # the transfer that crosses the mark trims, and the count starts again
    assert calls == [0]
    heap.relayed(heap.TRIM_EVERY // 2)
    heap.relayed(0)
    assert calls == [0]


def test_heap_trim_is_a_no_op_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    def unknown(name: str) -> str:
        raise ValueError(f"unrecognized configuration name: {name}")

    monkeypatch.setattr(heap.os, "confstr", unknown)
    assert heap._load_glibc() is None
    monkeypatch.setattr(heap, "_glibc", None)
    monkeypatch.setattr(heap, "_trim", None)
    heap.relayed(heap.TRIM_EVERY * 2)  # nothing to call, nothing raised
    heap.limit_arenas()


ARENA_PROBE = """
import ctypes, sys, threading
from passthru.server import heap
if sys.argv[1] == "limit":
    heap.limit_arenas()
ready, done = threading.Barrier(7), threading.Event()
def allocate():
    piece = bytearray(300_000)  # above pymalloc's sizes: from this thread's arena
    ready.wait(10)
    done.wait(10)
threads = [threading.Thread(target=allocate) for _ in range(6)]
for thread in threads:
    thread.start()
ready.wait(10)  # every thread holds its piece at once
ctypes.CDLL(None).malloc_stats()  # one "Arena N:" section per arena, to stderr
done.set()
"""


@pytest.mark.skipif(heap._glibc is None, reason="glibc's arenas only")
def test_threads_share_the_limited_arenas() -> None:
    """Each arena keeps a piece or two of large transfers resident: threads of their own multiplied that."""
    counts = {}
    for mode in ("limit", "default"):
        done = subprocess.run([sys.executable, "-c", ARENA_PROBE, mode], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        counts[mode] = done.stderr.count("Arena ")
    assert counts["limit"] == heap.ARENAS
    assert counts["default"] > heap.ARENAS  # the probe can tell: without the limit, more threads, more arenas
