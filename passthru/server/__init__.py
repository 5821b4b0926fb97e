"""Serving mechanics, apart from the request path: gunicorn's worker classes (worker.py, gevent_worker.py), the
request-head deadline they enforce (heads.py), and the C heap kept small as large bodies pass (heap.py)."""
