"""The key store of a server process, opened by the first call that needs it, and migrated by the gunicorn master in
a short-lived child process.

Its driver (SQLAlchemy, and Alembic when it migrates) costs a process about 25 MB and 0.4 s to import,
so it loads only there: not in the master, whose memory every worker starts with, and in a worker only once a call
needs the store. A worker that serves the master key and open routes never pays for it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import select
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn
from urllib.parse import unquote

from passthru.errors import KeyStoreError
from passthru.keystore.leases import Leases
from passthru.keystore.records import Charge, KeyStore, Store
from passthru.keystore.spend import SpendWriter
from passthru.keystore.url import password_spans

if TYPE_CHECKING:
    from passthru.exchange import Exchange, Recorder

log = logging.getLogger("passthru")

# Set by the gunicorn master for its workers once it has migrated the store (in a child, whose memory dies with it):
# they open the store without checking its schema, so without importing Alembic.
MIGRATED_VARIABLE = "_PASSTHRU_MIGRATED"
# A migration may wait for other processes' locks (SQLite's write lock, PostgreSQL's advisory lock): not forever.
MIGRATION_TIMEOUT = 60.0
# After the store was found unreachable, calls that need it fail at once for this long; then one call at a time tries
# it again (the others still fail at once). Short: a store back up is used within a second. (guard.py too.)
COOL_OFF = 1.0
UNAVAILABLE = "the key store is unavailable; try again shortly"


@dataclass(frozen=True)
class OpenedStore:
    """The store and the writer of its spend log, made together in the process that serves."""

    keys: KeyStore
    spend: SpendWriter
    leases: Leases

    @property
    def admin(self) -> KeyStore:
        """The same store, as the /key/* API uses it (records.KeyAdmin)."""
        return self.keys


class LazyStore:
    """The key store at `url`, opened by the first call to `open()` in this process: a virtual key, the key API, or a
    readiness probe. Threads that ask meanwhile wait for that one opening.

    An opening that fails (an unreachable store, when this process must check its schema) is not waited for again:
    for COOL_OFF seconds every call fails at once, then one call at a time tries while the others fail at once. Else
    each thread would queue on the lock behind a retry that can take PostgreSQL's 5-second connect timeout.
    """

    def __init__(self, url: str, cool_off: float = COOL_OFF) -> None:
        self.url = url
        self.cool_off = cool_off
        self._lock = threading.Lock()
        self._opened: OpenedStore | None = None
        self._failed_until = 0.0  # monotonic; 0.0 while no opening has failed

    def open(self) -> OpenedStore:
        """The opened store; KeyStoreError (503) while it cannot be opened."""
        opened = self._opened
        if opened is not None:
            return opened
        failed = self._failed_until > 0.0
        if failed and time.monotonic() < self._failed_until:
            raise KeyStoreError(UNAVAILABLE)
        if not self._lock.acquire(blocking=not failed):  # after a failure: another thread is trying right now
            raise KeyStoreError(UNAVAILABLE)
        try:
            if self._opened is None:
                if time.monotonic() < self._failed_until:  # it failed while this thread waited for the lock
                    raise KeyStoreError(UNAVAILABLE)
                try:
                    self._opened = _open(self.url)
                except KeyStoreError:
                    self._failed_until = time.monotonic() + self.cool_off
                    raise
            return self._opened
        finally:
            self._lock.release()

    def close(self) -> None:
        """Write the queued spend entries and close the connections, if the store was ever opened (tests)."""
        with self._lock:
            if self._opened is not None:
                self._opened.spend.close()
                self._opened.keys.close()
                self._opened = None


def _open(url: str) -> OpenedStore:
    from passthru.keystore.engine import open_engine
    from passthru.keystore.sql import SqlKeyStore, open_store

    try:
        if os.environ.get(MIGRATED_VARIABLE) == _marker(url):
            store = SqlKeyStore(open_engine(url))  # the gunicorn master migrated it; connects on first query
        else:
            store = open_store(url)  # migrates, unless this process already did (flask run, tests)
    except KeyStoreError as exc:
        # The text names the store's host, which is for the log, not for a caller.
        log.warning("%s", exc)
        raise KeyStoreError(UNAVAILABLE) from exc
    leases = Leases(store)
    writer = SpendWriter(store, leases.unused)
    # Started now, not by the first entry: a store kept only for routes' rpm_limit has no entries, and its writer
    # still gives back the calls its leases did not use.
    writer.start()
    return OpenedStore(store, writer, leases)


def migrate_in_child(url: str, timeout: float = MIGRATION_TIMEOUT) -> None:
    """Bring the store to this version's schema in a forked child, and tell the workers forked later that it is done.

    For the gunicorn master, at start and on reload: migrating in the master itself would leave SQLAlchemy and
    Alembic in it, and so in every worker. Raises KeyStoreError with one line when the child fails or takes longer
    than `timeout` seconds (it is killed then); the workers will then check the schema themselves.
    """
    os.environ.pop(MIGRATED_VARIABLE, None)
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(reader)
        _migrate_and_exit(url, writer)
    os.close(writer)
    try:
        said = _read_all(reader, time.monotonic() + timeout)
    finally:
        os.close(reader)
    if said is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise KeyStoreError(f"migrating the key store took more than {timeout:g} s and was stopped; is another "
                            "process holding the database's lock?")  # fmt: skip
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise KeyStoreError(said.decode(errors="replace") or f"migrating the key store failed (exit status {code})")
    os.environ[MIGRATED_VARIABLE] = _marker(url)


def _migrate_and_exit(url: str, writer: int) -> NoReturn:
    """The child: migrate, write why if that failed, and exit without ever returning into the parent's code."""
    code, said = 1, ""
    try:
        # gunicorn's handlers would only queue a signal in this copy of the master: a stop must stop the child too.
        for number in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM):
            signal.signal(number, signal.SIG_DFL)
        from passthru.keystore.engine import migrate

        migrate(url)
        code = 0
    except KeyStoreError as exc:
        said = str(exc)
    except BaseException as exc:
        # Neither the traceback (the master's stderr, which passthru's log filter does not see) nor the one-line
        # reason may quote the store's password, should the error's text carry the URL.
        said = _unquoted(url, f"migrating the key store failed: {type(exc).__name__}: {exc}")
        sys.stderr.write(_unquoted(url, traceback.format_exc()))
    finally:
        try:
            os.write(writer, said.encode())
        finally:
            os._exit(code)


def _unquoted(url: str, text: str) -> str:
    """`text` without the URL's passwords (user:password@ and ?password=), as written in the URL and decoded."""
    passwords = {url[start:end] for start, end in password_spans(url) if end > start}
    for form in sorted(passwords | {unquote(p) for p in passwords}, key=len, reverse=True):
        text = text.replace(form, "***")
    return text


def _read_all(fd: int, deadline: float) -> bytes | None:
    """Everything written to the pipe until its writer exits; None if that takes past `deadline`."""
    chunks: list[bytes] = []
    poller = select.poll()  # not select.select, which cannot watch a descriptor numbered 1024 or more
    poller.register(fd, select.POLLIN)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(remaining * 1000):
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _marker(url: str) -> str:
    """What MIGRATED_VARIABLE holds for a store: a digest of its URL, which itself may carry a password."""
    return hashlib.sha256(url.encode()).hexdigest()


def spend_recorder(store: Store, master: str, logged: bool) -> Recorder:
    """The key store's part of a finished exchange: every pass-through call's spend log entry (an open route's with
    no key, the master key's under its hash `master`), and its key charged what admission did not. Queued for the
    worker's writer thread (spend.py).

    Without `logged` (general_settings.disable_spend_logs) no entry is written: a virtual key is still charged, and
    the calls no key pays for leave the store alone, so a worker that serves only those never loads it.
    """

    def charge(exchange: Exchange) -> None:
        if exchange.pricing is None:  # not a pass-through call, or refused before it was sent
            return
        if not logged and (exchange.caller is None or exchange.caller == master):
            return
        usage = exchange.usage
        store.open().spend.add(
            Charge(
                request_id=exchange.request_id,
                token=exchange.caller,
                route=exchange.route,
                status=exchange.status or 500,
                spend=exchange.spend or 0.0,
                precharged=exchange.precharged,
                seconds=exchange.seconds,
                model=exchange.model,
                prompt_tokens=None if usage is None else usage.prompt_tokens,
                completion_tokens=None if usage is None else usage.completion_tokens,
                total_tokens=None if usage is None else usage.total_tokens,
                logged=logged,
                target=exchange.target,
            )
        )

    return charge
