"""This worker's connection pools: the requests Session whose adapter holds one urllib3 pool per upstream host."""

from __future__ import annotations

import requests
from requests.adapters import HTTPAdapter

# Uploads are read from the caller in pieces this big (urllib3's default is 16 KiB, and gunicorn's reader copies
# its read-ahead buffer on every read: small pieces cost far more CPU than the bytes themselves, bench/).
UPLOAD_BLOCK = 1024 * 1024
POOL_SIZE = 256  # connections kept per upstream host: at least the threads of any worker we ship


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
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
