"""The floor under passthru on its own stack: a bare Flask app that forwards through urllib3's pool and nothing else.

No headers built or filtered, no route table, no key check, no metrics, no access line, no usage tap: the least a
proxy on Flask + the requests/urllib3 pool can cost per call (`gunicorn -c deploy/gunicorn.conf.py bench.floor:app`
with FLOOR_UPSTREAM=http://127.0.0.1:<port>/small). bench/run.py measures it beside the ceiling and passthru, so
how much of passthru's cost is its own and how much is the stack's is a measured figure (issue 14).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from urllib.parse import urlsplit

import urllib3
from flask import Flask, Response, request

_target = urlsplit(os.environ.get("FLOOR_UPSTREAM", "http://127.0.0.1:8080/small"))
pool = urllib3.HTTPConnectionPool(_target.hostname or "127.0.0.1", _target.port, maxsize=256)
app = Flask("floor", static_folder=None)
DROP = frozenset(("connection", "keep-alive", "transfer-encoding", "date", "server"))  # the WSGI server's to write


@app.route("/<path:path>", methods=["GET", "POST"])
def forward(path: str) -> Response:
    """The caller's body streamed upstream, the answer streamed back: as passthru does, with nothing around it."""
    length = request.content_length
    upstream = pool.urlopen(request.method, _target.path, body=request.stream if length else None,
                            headers={"Content-Type": request.content_type or "", "Content-Length": str(length or 0)},
                            retries=False, redirect=False, preload_content=False, decode_content=False,
                            release_conn=False)  # fmt: skip

    def body() -> Iterator[bytes]:
        try:
            while chunk := upstream.read1(1 << 20, decode_content=False):
                yield chunk
        finally:
            upstream.release_conn()

    headers = [(name, value) for name, value in upstream.headers.items() if name.lower() not in DROP]
    return Response(body(), status=upstream.status, headers=headers, direct_passthrough=True)
