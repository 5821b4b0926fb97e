"""How long a request head may take to arrive ($PASSTHRU_HEADER_TIMEOUT): read once by each gunicorn worker.

Standard library only: the gevent worker's module imports it in the gunicorn master, before gevent patches anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# Seconds a request head may take to arrive whole: from the connection's accept for its first request, and from
# the first byte of each later one on a kept-alive connection (until that byte, gunicorn's `keepalive` bounds the
# wait; gevent workers count that wait in, see gevent_worker.py). Past it the connection is closed.
HEADER_TIMEOUT_VARIABLE = "PASSTHRU_HEADER_TIMEOUT"
DEFAULT_HEADER_TIMEOUT = 5.0


def header_timeout(environ: Mapping[str, str]) -> float:
    """$PASSTHRU_HEADER_TIMEOUT in seconds (DEFAULT_HEADER_TIMEOUT when unset or blank); ValueError if not valid."""
    text = environ.get(HEADER_TIMEOUT_VARIABLE, "").strip()
    if not text:
        return DEFAULT_HEADER_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= 3600:  # NaN fails too
        raise ValueError(f"${HEADER_TIMEOUT_VARIABLE} must be a number of seconds above 0, up to 3600, not {text!r}")
    return seconds
