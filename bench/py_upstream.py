"""tests/rig/upstream.py's fake upstream in a process of its own (SSE with real gaps), for bench/run.py.

Prints its port on one line, then serves until its stdin closes or it is killed. Its own process, so the
benchmark client never shares a GIL with it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "rig"))

import upstream  # noqa: E402  (tests/rig/ is not a package)

# socketserver listens with a backlog of 5: hundreds of streams opened at once would wait out SYN retries.
upstream._Server.request_queue_size = 4096


def main() -> None:
    """Start, say the port, serve until the parent goes away."""
    up = upstream.start_upstream()
    print(up.port, flush=True)
    try:
        sys.stdin.read()
    finally:
        up.stop()


if __name__ == "__main__":
    main()
