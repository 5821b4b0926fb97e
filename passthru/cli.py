"""The `passthru` command: serve under gunicorn with LiteLLM's flags, `check` a config like `nginx -t`, manage
virtual keys straight in the store (`keys`), migrate it (`db upgrade`)."""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication

from passthru import key_api
from passthru.config import Settings, load_settings
from passthru.db import migrate
from passthru.errors import ConfigError, PassthruError
from passthru.keys import KeyStore, open_store
from passthru.logs import configure_logging

GUNICORN_CONF = Path(__file__).resolve().parent.parent / "deploy" / "gunicorn.conf.py"


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run it; the return value is the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["check"]:
        return check(_check_parser().parse_args(args[1:]).config)
    if args[:1] == ["keys"]:
        return keys(_keys_parser().parse_args(args[1:]))
    if args[:1] == ["db"]:
        return db(_db_parser().parse_args(args[1:]))
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
        "--detailed_debug", action="store_true", help="log each forwarded call (names and sizes, values masked)"
    )
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
    print(f"{settings.source}: ok, {len(settings.endpoints)} route(s)")
    for ep in settings.endpoints:
        flags = [f"auth={str(ep.auth).lower()}", f"timeout={ep.timeout:g}s"]
        flags += [name for name in ("include_subpath", "forward_headers") if getattr(ep, name)]
        subpath = "/**" if ep.include_subpath else ""
        print(f"  {ep.path}{subpath} -> {ep.target_shown}  [{' '.join(ep.methods)}] {' '.join(flags)}")
        for name, _ in ep.headers:
            print(f"      {name}: ***")
        for name, value in ep.default_query_params:
            print(f"      ?{name}={value}")
    if settings.database_shown is not None:
        print(f"  key store: {settings.database_shown}")
    for warning in settings.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _keys_parser() -> argparse.ArgumentParser:
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", required=True, help="the config.yaml whose key store to use")
    parser = argparse.ArgumentParser(
        prog="passthru keys",
        description="Manage virtual keys directly in the store, as the /key/* API does; answers are its JSON.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    generate = sub.add_parser("generate", parents=[config], help="make a key (shown only this once)")
    generate.add_argument("--key-alias")
    generate.add_argument("--duration", help='how long it lasts: "30s", "10m", "1h", "7d" (default: for ever)')
    generate.add_argument("--max-budget", type=float)
    generate.add_argument("--rpm-limit", type=int)
    generate.add_argument("--allowed-route", action="append", dest="allowed_routes", metavar="PATH",
                          help="a route the key may call (repeat; default: all)")  # fmt: skip
    generate.add_argument("--metadata", type=_json_object, help="a JSON object kept with the key")
    generate.add_argument("--key", help="a key of your own (sk-…) instead of a generated one")
    listing = sub.add_parser("list", parents=[config], help="keys, newest first (hashed tokens and aliases)")
    listing.add_argument("--page", type=int, default=1)
    listing.add_argument("--size", type=int, default=key_api.MAX_PAGE_SIZE)
    listing.add_argument("--key-alias")
    for name, text in (("info", "a key's fields and spend"), ("block", "refuse a key everywhere"),
                       ("unblock", "accept a blocked key again")):  # fmt: skip
        sub.add_parser(name, parents=[config], help=text).add_argument("key", help="sk-… or its hashed token")
    delete = sub.add_parser("delete", parents=[config], help="delete keys (all of them, or none)")
    delete.add_argument("keys", nargs="+", metavar="key")
    return parser


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object such as '{\"team\": \"a\"}'")
    return value


def _db_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="passthru db", description="The key store's schema.")
    sub = parser.add_subparsers(dest="command", required=True)
    upgrade = sub.add_parser("upgrade", help="migrate the store to this version's schema (also done at start-up)")
    upgrade.add_argument("--config", required=True)
    return parser


def _store_settings(path: str) -> Settings:
    settings = load_settings(path)
    if settings.database_url is None:
        raise ConfigError(f"{settings.source}: virtual keys need general_settings.master_key (there is no key store)")
    configure_logging(settings.secrets, False)  # the store's warnings go through the same redaction as the server's
    return settings


def keys(args: argparse.Namespace) -> int:
    """Run one key operation on the config's store and print its JSON answer; 1 on any error."""
    try:
        settings = _store_settings(args.config)
        assert settings.database_url is not None
        store = open_store(settings.database_url)
        try:
            answer = _key_operation(args, store, settings.master_key)
        finally:
            store.close()
    except PassthruError as exc:
        print(f"passthru: {exc.message}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2))
    return 0


def _key_operation(args: argparse.Namespace, store: KeyStore, master_key: str | None) -> Any:
    """The API's own operation for the command, fed with the command line's values."""
    if args.command == "generate":
        fields = {name: value for name, value in vars(args).items()
                  if name in key_api.NEW_KEY_FIELDS and value is not None}  # fmt: skip
        return key_api.generate_key(store, fields, master_key=master_key)
    if args.command == "list":
        fields = {"page": args.page, "size": args.size, "key_alias": args.key_alias, "return_full_object": "true"}
        return key_api.list_keys(store, fields)
    if args.command == "info":
        return key_api.key_info(store, {"key": args.key})
    if args.command in ("block", "unblock"):
        return key_api.set_blocked(store, {"key": args.key}, blocked=args.command == "block")
    return key_api.delete_keys(store, {"keys": args.keys})


def db(args: argparse.Namespace) -> int:
    """`passthru db upgrade`: bring the store to the newest schema; 1 if it cannot be reached."""
    try:
        settings = _store_settings(args.config)
        assert settings.database_url is not None
        revision = migrate(settings.database_url)
    except PassthruError as exc:
        print(f"passthru: {exc.message}", file=sys.stderr)
        return 1
    print(f"{settings.database_shown}: at revision {revision}")
    return 0


def serve(args: argparse.Namespace) -> int:
    """Validate the config, then run gunicorn in-process with deploy/gunicorn.conf.py and the given flags."""
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"passthru: {exc}", file=sys.stderr)
        return 1
    # The conf's on_starting hook and any reload read the same file.
    os.environ["PASSTHRU_CONFIG"] = os.path.abspath(args.config)
    options: dict[str, Any] = {"bind": f"{args.host}:{args.port}"}
    if args.num_workers:
        options["workers"] = args.num_workers
    _Gunicorn(settings, options, args.detailed_debug).run()
    return 0


class _Gunicorn(BaseApplication):  # type: ignore[misc]
    """gunicorn run in-process: deploy/gunicorn.conf.py, then the command line's flags, then our app."""

    def __init__(self, settings: Settings, options: dict[str, Any], detailed_debug: bool) -> None:
        self.settings = settings
        self.options = options
        self.detailed_debug = detailed_debug
        super().__init__()

    def load_config(self) -> None:
        conf = runpy.run_path(str(GUNICORN_CONF))
        for name, value in {**conf, **self.options}.items():
            if name in self.cfg.settings and value is not None:
                self.cfg.set(name, value)

    def load(self) -> Any:
        from passthru import create_app

        return create_app(self.settings, detailed_debug=self.detailed_debug)
