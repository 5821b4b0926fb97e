"""The WSGI entry point: `gunicorn -c deploy/gunicorn.conf.py wsgi:app`, `flask --app wsgi run`.

The config path comes from PASSTHRU_CONFIG (default: config.yaml in the working directory).
"""

import sys

from passthru import create_app
from passthru.errors import ConfigError, KeyStoreError

try:
    app = create_app()
except (ConfigError, KeyStoreError) as exc:
    print(f"passthru: {exc}", file=sys.stderr)
    # 3 is gunicorn's "worker failed to boot": the arbiter stops instead of restarting the worker in a loop.
    raise SystemExit(3) from None
