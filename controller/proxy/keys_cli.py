"""`fleet keys add NAME | list | revoke ID|NAME|PREFIX | purge`: API keys in the controller's database.

Kept free of heavy imports: `ollama_fleet/cli.py` imports this module to build its parser.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

HELP = "Manage API keys for the proxy endpoints (add shows the key once; keys are stored hashed)."


DATABASE_SETTINGS = ("data_dir", "database_url")  # all the command needs to find the controller's database


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    add = sub.add_parser("add", help="Create a key and print it (the only time it is shown).")
    add.add_argument("name", help="Who or what the key is for.")
    ls = sub.add_parser("list", help="List keys (never the keys themselves).")
    ls.add_argument("--json", action="store_true", help="Print JSON.")
    rv = sub.add_parser("revoke", help="Revoke a key by id, name or shown prefix.")
    rv.add_argument("ref")
    pg = sub.add_parser("purge", help="Delete revoked keys. Keys fail closed: revoking the last key keeps the "
                                      "proxy locked; purging them when none is active opens it again.")
    for p in (add, ls, rv, pg):
        _database_flags(p)


def _database_flags(parser: argparse.ArgumentParser) -> None:
    from ollama_fleet import settings

    parser.add_argument("--config", metavar="FILE", help="TOML config file, as for `fleet controller`.")
    for name in DATABASE_SETTINGS:
        s = settings.BY_NAME[name]
        parser.add_argument(s.flag, dest=s.name, default=None, metavar=s.type.__name__.upper(),
                            help=f"{s.help} [env {s.env}]")


def run(args: argparse.Namespace) -> int:
    from ollama_fleet import settings
    from ollama_fleet.controller import db as dbm
    from ollama_fleet.controller.proxy import keys

    cfg = settings.load([settings.CONTROLLER], args)
    from ollama_fleet.controller.migrations import SchemaTooNew

    try:
        database = dbm.init_db(cfg.database_url or dbm.default_url(cfg.data_path))
    except SchemaTooNew as e:  # a clear sentence, not a traceback
        print(f"fleet keys: {e}", file=sys.stderr)
        return 1
    with database.connection_context():
        if args.keys_command == "add":
            key, row = keys.create(args.name)
            print(key)
            print(f"key {row['id']} ({row['name']}) created; store it now, it cannot be shown again",
                  file=sys.stderr)
            return 0
        if args.keys_command == "list":
            rows = keys.list_keys()
            if args.json:
                print(json.dumps(rows))
            else:
                for r in rows:
                    state = "revoked " + _when(r["revoked"]) if r["revoked"] else "active"
                    print(f"{r['id']:>4}  {r['prefix']}...  {r['name']:<24} {_when(r['created'])}  {state}")
            return 0
        if args.keys_command == "purge":
            n = keys.purge()
            left = len(keys.active())
            print(f"deleted {n} revoked key{'s' if n != 1 else ''}; "
                  + (f"{left} active: the proxy still needs a key" if left else "no keys left: the proxy is OPEN"))
            return 0
        revoked = keys.revoke(args.ref)
        if not revoked:
            print(f"fleet keys: no active key matches {args.ref!r}", file=sys.stderr)
            return 1
        for r in revoked:
            print(f"revoked key {r['id']} ({r['name']})")
        return 0


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))
