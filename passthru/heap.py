"""The C heap's free pages handed back to the system as bodies stream through (glibc; elsewhere nothing is done).

Without this a worker's RSS grew by ~6 MB with every 1 GiB download + 1 GiB upload and never came back (60 →
245 MB after 31 pairs). Each 1 MiB piece is a bytes object that CPython allocates whole and then shrinks to what
recv() returned (BufferedReader.read1 for answers, socket.recv in gunicorn's body reader for uploads). On loopback
recv returns 16 segments, 848 bytes short of 1 MiB, and glibc keeps such a small cut-off tail in the thread's
tcache, marked in use: when the piece is freed it cannot merge past that tail, and the ~1 MiB hole it leaves is a
little too small for the next 1 MiB piece, which comes from fresh heap instead. Every hole in the grown heap was
found pinned by a tcache chunk (GLIBC_TUNABLES=glibc.malloc.tcache_count=0 kept RSS flat). malloc_trim(0) returns
the holes' pages in 0.4-0.9 ms. Trimming every TRIM_EVERY bytes, the same 21 pairs after a 32-connection load
(36 threads) ended at 94 MB, flat from the 10th pair on, where they ended at 237 MB and climbing without it.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable

# Bytes relayed by this process (answers and uploads together) between two trims: ~2 ms of trimming per GiB,
# which interleaved runs could not tell from noise (64 MiB plateaued lower, 85 MB, but cost downloads a few %).
TRIM_EVERY = 256 * 1024 * 1024


def _load_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None on any other C library (musl, macOS), which has nothing of the kind."""
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return None
        trim = ctypes.CDLL(None).malloc_trim  # the C library this process already runs on
    except (ValueError, OSError, AttributeError):  # confstr name unknown to the platform; no such symbol
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_trim = _load_trim()
_lock = threading.Lock()
_since_trim = 0


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
