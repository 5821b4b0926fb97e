"""The WSGI entry point: `gunicorn -c deploy/gunicorn.conf.py wsgi:app`, `flask --app wsgi run`.

The config is the YAML in PASSTHRU_CONFIG_YAML when that is set, else the file PASSTHRU_CONFIG (default:
config.yaml in the working directory); see passthru.server_config.load_from_environment.
"""

import sys

from passthru import create_app
from passthru.errors import ConfigError
from passthru.server_config import load_from_environment

try:
    app = create_app(load_from_environment())
except ConfigError as exc:
    print(f"passthru: {exc}", file=sys.stderr)
    # 3 is gunicorn's "worker failed to boot": the arbiter stops instead of restarting the worker in a loop.
    raise SystemExit(3) from None
