"""`passthru keys …` and `passthru db upgrade`: virtual keys managed straight in the store, for admins without curl.

Each command runs the /key/* API's own function on the config's store and prints its JSON answer.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from passthru import key_api, key_fields
from passthru.config import Settings, load_settings
from passthru.errors import ConfigError, PassthruError
from passthru.keystore.engine import migrate
from passthru.keystore.records import KeyAdmin
from passthru.keystore.sql import open_store
from passthru.logs import configure_logging
from passthru.server_config import read_server_settings


def keys_main(argv: list[str]) -> int:
    """`passthru keys generate|list|info|block|unblock|delete --config F …`"""
    return keys(_keys_parser().parse_args(argv))


def db_main(argv: list[str]) -> int:
    """`passthru db upgrade --config F`"""
    return db(_db_parser().parse_args(argv))


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
    generate.add_argument("--tpm-limit", type=int, help="tokens a minute, counted as answers end")
    generate.add_argument("--max-parallel-requests", type=int, help="calls in flight at once, on each host")
    generate.add_argument("--budget-duration", help='spend goes back to 0 every "30d", "1mo" (a calendar month), …')
    generate.add_argument("--allowed-route", action="append", dest="allowed_routes", metavar="PATH",
                          help="a route the key may call (repeat; default: all)")  # fmt: skip
    generate.add_argument("--metadata", type=_json_object, help="a JSON object kept with the key")
    generate.add_argument("--key", help="a key of your own (sk-…) instead of a generated one")
    listing = sub.add_parser("list", parents=[config], help="keys, newest first (hashed tokens and aliases)")
    listing.add_argument("--page", type=int, default=1)
    listing.add_argument("--size", type=int, default=key_fields.MAX_PAGE_SIZE)
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
        raise argparse.ArgumentTypeError('must be a JSON object such as \'{"team": "a"}\'')
    return value


def _db_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="passthru db", description="The key store's schema.")
    sub = parser.add_subparsers(dest="command", required=True)
    upgrade = sub.add_parser("upgrade", help="migrate the store to this version's schema (also done at start-up)")
    upgrade.add_argument("--config", required=True)
    return parser


def _store_settings(path: str, *, keys: bool) -> Settings:
    settings = load_settings(path)
    # A store kept only for routes' rpm_limit counts has no use for keys: no route would take them.
    if settings.database_url is None or (keys and settings.master_key is None):
        raise ConfigError(f"{settings.source}: virtual keys need general_settings.master_key (there is no key store)")
    configure_logging(
        settings.secrets, False, read_server_settings().json_logs
    )  # the store's warnings go through the same redaction as the server's
    return settings


def keys(args: argparse.Namespace) -> int:
    """Run one key operation on the config's store and print its JSON answer; 1 on any error."""
    try:
        settings = _store_settings(args.config, keys=True)
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


def _key_operation(args: argparse.Namespace, store: KeyAdmin, master_key: str | None) -> Any:
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
        settings = _store_settings(args.config, keys=False)
        assert settings.database_url is not None
        revision = migrate(settings.database_url)
    except PassthruError as exc:
        print(f"passthru: {exc.message}", file=sys.stderr)
        return 1
    print(f"{settings.database_shown}: at revision {revision}")
    return 0
