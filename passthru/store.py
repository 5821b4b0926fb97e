"""The key store of a server process, opened by the first call that needs it.

Its driver (SQLAlchemy, and Alembic when it migrates) costs a process about 25 MB and a third of a second to import,
so it loads only here, on first use: a worker that serves the master key and open routes never pays for it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from passthru.errors import KeyStoreError

if TYPE_CHECKING:
    from passthru.keys import KeyStore
    from passthru.spend import SpendWriter

log = logging.getLogger("passthru")


@dataclass(frozen=True)
class OpenedStore:
    """The store and the writer of its spend log, made together in the process that serves."""

    keys: KeyStore
    spend: SpendWriter


class LazyStore:
    """The key store at `url`, opened by the first call to `open()` in this process: a virtual key, the key API, or a
    readiness probe. Threads that ask meanwhile wait for that one opening; a failed opening is retried next call."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.Lock()
        self._opened: OpenedStore | None = None

    def open(self) -> OpenedStore:
        """The opened store; KeyStoreError (503) while it cannot be opened."""
        opened = self._opened
        if opened is not None:
            return opened
        with self._lock:
            if self._opened is None:
                self._opened = _open(self.url)
            return self._opened

    def close(self) -> None:
        """Write the queued spend entries and close the connections, if the store was ever opened (tests)."""
        with self._lock:
            if self._opened is not None:
                self._opened.spend.close()
                self._opened.keys.close()
                self._opened = None


def _open(url: str) -> OpenedStore:
    from passthru.keys import open_store
    from passthru.spend import SpendWriter

    try:
        store = open_store(url)  # migrates unless this process already did
    except KeyStoreError as exc:
        # The text names the store's host, which is for the log, not for a caller.
        log.warning("%s", exc)
        raise KeyStoreError("the key store is unavailable; try again shortly") from exc
    return OpenedStore(store, SpendWriter(store))
