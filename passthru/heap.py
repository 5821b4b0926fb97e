"""The C heap's free pages handed back to the system as large bodies stream through (glibc; elsewhere a no-op).

Each ~1 MiB piece is allocated whole, then shrunk to what recv() returned; glibc's tcache keeps the small cut-off
tail in use, so a freed piece leaves a hole the next one cannot reuse: a worker grew ~3 MB per GiB relayed, without
end. malloc_trim(0) returns those holes' pages (bench/RESULTS.md, "Memory across many transfers").
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
