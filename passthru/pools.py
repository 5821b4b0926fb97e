"""This worker's connection pools: the requests Session whose adapter holds one urllib3 pool per upstream host, with
connections that tell a kept-alive connection that broke before answering (StaleConnection) from a new one."""

from __future__ import annotations

import errno

import requests
from requests.adapters import HTTPAdapter
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.response import HTTPResponse

# Uploads are read from the caller in pieces this big (urllib3's default is 16 KiB, and gunicorn's reader copies
# its read-ahead buffer on every read: small pieces cost far more CPU than the bytes themselves, bench/).
UPLOAD_BLOCK = 1024 * 1024
POOL_SIZE = 256  # connections kept per upstream host: at least the threads of any worker we ship


class StaleConnection(ConnectionResetError):
    """A kept-alive connection broke before its answer's first byte: most often the upstream closed it as idle just
    as this request went out, and never saw the request."""


class _Connection(HTTPConnection):
    """urllib3's connection, raising StaleConnection for a reset on a connection reused from the pool."""

    _opened = False  # connected for the request now being answered (connect() runs only for a new connection)

    def connect(self) -> None:
        self._opened = True
        super().connect()

    def getresponse(self) -> HTTPResponse:  # type: ignore[override]  # as urllib3 overrides http.client
        opened, self._opened = self._opened, False
        try:
            return super().getresponse()
        except ConnectionError as exc:  # reset, or closed with no status line (http.client's RemoteDisconnected)
            if not opened:
                raise StaleConnection(errno.ECONNRESET, "a kept-alive connection closed before answering") from exc
            raise


class _TLSConnection(_Connection, HTTPSConnection):
    pass


class _Pool(HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


def new_session(upstream_hosts: int) -> requests.Session:
    """The Session of one worker process: it owns the connection pools that every route sends through.

    Requests go out on the adapter's urllib3 pool, not through Session.send: even with allow_redirects=False,
    Session.send reads a 3xx answer's whole body (to prepare the next hop), and it runs the shared cookie jar,
    environment proxies and .netrc; the adapter's own send builds a Response and a cookie jar per call. The pool
    does none of that, and nothing is shared between callers but idle connections.
    """
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=max(upstream_hosts, 1), pool_maxsize=POOL_SIZE, max_retries=0)
    # Made again with the upload block size, which HTTPAdapter's constructor cannot pass (the first one is unused).
    adapter.init_poolmanager(max(upstream_hosts, 1), POOL_SIZE, blocksize=UPLOAD_BLOCK)
    adapter.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
