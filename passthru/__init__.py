"""passthru: LiteLLM-compatible pass-through endpoints as a plain WSGI app.

Importing the package loads nothing else: the `passthru` command must set up prometheus_client's multiprocess
directory before the app's modules import it. `create_app` is loaded on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from passthru.app import create_app

        return create_app
    raise AttributeError(f"module 'passthru' has no attribute {name!r}")
