"""The `passthru` command: serve under gunicorn with LiteLLM's flags, `check` a config like `nginx -t`, manage
virtual keys straight in the store (`keys`), migrate it (`db upgrade`).

Only the config is imported up front: serving must set prometheus_client's multiprocess directory (in
deploy/gunicorn.conf.py) before anything imports the app's modules, which import it.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication

from passthru.config import load_settings
from passthru.errors import ConfigError

GUNICORN_CONF = Path(__file__).resolve().parent.parent / "deploy" / "gunicorn.conf.py"


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run it; the return value is the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["check"]:
        return check(_check_parser().parse_args(args[1:]).config)
    if args[:1] in (["keys"], ["db"]):
        from passthru.key_cli import db_main, keys_main

        return (keys_main if args[0] == "keys" else db_main)(args[1:])
    return serve(_serve_parser().parse_args(args))


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="passthru",
        description="Serve LiteLLM pass-through endpoints from a config.yaml. "
        "`passthru check --config F` only validates the file; `passthru keys …` manages virtual keys; "
        "`passthru db upgrade --config F` migrates the key store.",
    )
    parser.add_argument("--config", required=True, help="LiteLLM config.yaml with general_settings")
    parser.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"), help="address to bind (0.0.0.0)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "4000")), help="port ($PORT or 4000)")
    parser.add_argument("--num_workers", type=int, help="worker processes (default: deploy/gunicorn.conf.py)")
    parser.add_argument(
        "--detailed_debug",
        action="store_true",
        help="log each forwarded call (names and sizes, values masked)",
    )
    parser.add_argument("--json_logs", action="store_true", help="one JSON object per log line (or JSON_LOGS=true)")
    return parser


def _check_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="passthru check", description="Validate a config and list its routes.")
    parser.add_argument("--config", required=True)
    return parser


def check(path: str) -> int:
    """Validate the config and print the routes it would serve, header values masked; 0 if it is valid."""
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        print(f"passthru: {exc}", file=sys.stderr)
        return 1
    from passthru.logs import Redact

    mask = Redact(settings.secrets).mask  # values from the environment are shown as ***
    print(f"{settings.source}: ok, {len(settings.endpoints)} route(s)")
    for ep in settings.endpoints:
        flags = [f"auth={str(ep.auth).lower()}", f"timeout={ep.timeout:g}s"]
        flags += [f"{name}={value}" for name, value in vars(ep.limits).items() if value is not None]
        flags += [name for name in ("include_subpath", "forward_headers") if getattr(ep, name)]
        if ep.retries.num_retries:
            flags.append(f"num_retries={ep.retries.num_retries}")
        subpath = "/**" if ep.include_subpath else ""
        several = len(ep.targets) > 1
        where = f"{len(ep.targets)} targets" if several else ep.targets[0].url_shown
        print(f"  {ep.path}{subpath} -> {where}  [{' '.join(ep.methods)}] {' '.join(flags)}")
        for target in ep.targets:
            indent = "      "
            if several:
                print(f"{indent}{target.name}: {target.url_shown}  order={target.order} weight={target.weight:g}")
                indent += "    "
            for name, _ in target.headers:
                print(f"{indent}{name}: ***")
        for name, value in ep.default_query_params:
            print(f"      ?{name}={mask(value)}")
    if settings.database_shown is not None:
        print(f"  key store: {settings.database_shown}")
    if settings.otel is not None:  # from the config or the OTEL_* variables of this shell
        print(f"  traces: exported to {settings.otel.endpoint_shown}")
    for warning in settings.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def serve(args: argparse.Namespace) -> int:
    """Validate the config, then run gunicorn in-process with deploy/gunicorn.conf.py and the given flags."""
    try:
        load_settings(args.config)  # the same check gunicorn's on_starting makes, with a clean exit status
    except ConfigError as exc:
        print(f"passthru: {exc}", file=sys.stderr)
        return 1
    # The conf's on_starting hook and any reload read the same file; --config wins over a YAML variable.
    os.environ["PASSTHRU_CONFIG"] = os.path.abspath(args.config)
    os.environ.pop("PASSTHRU_CONFIG_YAML", None)
    if args.json_logs:
        os.environ["JSON_LOGS"] = "true"
    options: dict[str, Any] = {"bind": f"{args.host}:{args.port}"}
    if args.num_workers:
        options["workers"] = args.num_workers
    _Gunicorn(options, args.detailed_debug).run()
    return 0


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    """gunicorn run in-process: deploy/gunicorn.conf.py, then the command line's flags, then our app."""

    def __init__(self, options: dict[str, Any], detailed_debug: bool) -> None:
        self.options = options
        self.detailed_debug = detailed_debug
        super().__init__()

    def load_config(self) -> None:
        conf = runpy.run_path(str(GUNICORN_CONF))
        for name, value in {**conf, **self.options}.items():
            if name in self.cfg.settings and value is not None:
                self.cfg.set(name, value)

    def load(self) -> Any:
        from passthru.app import create_app
        from passthru.server_config import load_from_environment

        # What the master accepted last (at start, or at a reload with kill -HUP).
        return create_app(load_from_environment(), detailed_debug=self.detailed_debug)
