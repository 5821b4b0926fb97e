"""The C heap's free pages handed back to the system as large bodies stream through (glibc; elsewhere a no-op).

Each ~1 MiB piece is allocated whole, then shrunk to what recv() returned; glibc's tcache keeps the small cut-off
tail in use, so a freed piece leaves a hole the next one cannot reuse: a worker grew ~3 MB per GiB relayed, without
end. malloc_trim(0) returns those holes' pages (`git show b46f6ce:bench/RESULTS.md`, "Memory across many
transfers"). It cannot shrink the top of a thread's own arena, which keeps a piece or two resident: so a worker's
threads share few arenas.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from passthru.exchange import Exchange

# Bytes relayed by this process (answers and uploads together) between two trims: ~2 ms of trimming per GiB,
# which interleaved runs could not tell from noise (64 MiB plateaued lower, 85 MB, but cost downloads a few %).
TRIM_EVERY = 256 * 1024 * 1024
# Arenas the threads of a process allocate from (glibc's default: 8 per CPU, so one per thread on most hosts). Each
# keeps its top resident, up to a few MB after large transfers. One worker after rounds of 8 transfers at once:
# 39-41 MB with 2 arenas, 44-48 with 4, 48-55 with glibc's default. Two interleaved A/Bs of single 1 GiB transfers
# against the default: uploads -13 % and +10 %, downloads -3 % and -9 % (this host's noise); small requests' CPU
# the same (`git show 9e36ef6:bench/RESULTS.md`, "Memory after the load").
ARENAS = 2
M_ARENA_MAX = -8  # mallopt's parameter, from glibc's malloc.h


def _load_glibc() -> ctypes.CDLL | None:
    """The glibc this process runs on, or None on any other C library (musl, macOS), which has nothing of the kind."""
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return None
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (ValueError, OSError, AttributeError):  # confstr name unknown to the platform; no such symbol
        return None
    return libc


_glibc = _load_glibc()
_trim: Callable[[int], int] | None = None if _glibc is None else _glibc.malloc_trim
_lock = threading.Lock()
_since_trim = 0


def record(exchange: Exchange) -> None:
    """The heap's part of a finished exchange: its bytes both ways count towards the next trim."""
    relayed(exchange.sent + exchange.received)


def relayed(size: int) -> None:
    """Count a finished transfer's bytes; trim the heap once TRIM_EVERY have passed since the last trim."""
    global _since_trim
    if _trim is None or size <= 0:
        return
    with _lock:
        _since_trim += size
        if _since_trim < TRIM_EVERY:
            return
        _since_trim = 0
    _trim(0)  # outside the lock: ctypes releases the GIL, and other threads keep counting meanwhile


def limit_arenas() -> None:
    """Let the threads this process starts from now on share ARENAS arenas (create_app, before any request)."""
    if _glibc is not None:
        _glibc.mallopt(M_ARENA_MAX, ARENAS)
