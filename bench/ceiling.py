"""The ceiling for passthru's throughput: a bare Flask app answering every request with the upstream's body.

Served under the same deploy/gunicorn.conf.py as passthru (`gunicorn -c deploy/gunicorn.conf.py bench.ceiling:app`
from the repo root), it costs what gunicorn + Flask cost with no forwarding at all.
"""

from __future__ import annotations

from flask import Flask, Response, request

# ~300 bytes of JSON, the same answer nginx's `return 200` gives in bench/nginx.conf.template (run.py checks it).
BODY = (
    b'{"id":"bench-0001","object":"list","model":"rerank-english-v3.0","results":['
    b'{"index":2,"relevance_score":0.999071},{"index":4,"relevance_score":0.7867867},'
    b'{"index":0,"relevance_score":0.32713068}],"meta":{"api_version":{"version":"1"},'
    b'"billed_units":{"search_units":1}},"note":"passthru bench fixed answer"}'
)

app = Flask("ceiling", static_folder=None)


@app.route("/", defaults={"path": ""}, methods=["GET", "POST"])
@app.route("/<path:path>", methods=["GET", "POST"])
def answer(path: str) -> Response:
    """Read the body as a proxy must (so the request is fully consumed), answer with the fixed JSON."""
    request.get_data()
    return Response(BODY, content_type="application/json")
