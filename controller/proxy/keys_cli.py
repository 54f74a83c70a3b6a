"""`fleet keys add NAME [LIMITS] | limit ID|NAME|PREFIX LIMITS | list | revoke ID|NAME|PREFIX | purge`: API keys
in the controller's database, and their limits (controller/admission/limits.py).

Kept free of heavy imports: `ollama_fleet/cli.py` imports this module to build its parser (the limits module
is pure and small).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from ollama_fleet.controller.admission.limits import (
    LIMIT_NAMES,
    NONE,
    KeyLimits,
    LimitError,
    describe,
    parse_ceiling,
    parse_count,
)

HELP = "Manage API keys for the proxy endpoints (add shows the key once; keys are stored hashed)."


DATABASE_SETTINGS = ("data_dir", "database_url")  # all the command needs to find the controller's database
# KeyLimits field -> (flag, metavar, parser of the typed value, help); dest is LIMIT_DEST + field: no clash
# with a setting's name in the namespace settings.load reads.
LIMIT_FLAGS: dict[str, tuple[str, str, Callable[[str], int | str | None], str]] = {
    "max_concurrent": ("--max-concurrent", "N", parse_count,
                       "Requests of this key in flight (queued or running) at once; more get 429."),
    "rpm": ("--rpm", "N", parse_count, "Requests per minute; more get 429."),
    "tpm": ("--tpm", "N", parse_count, ("Tokens per minute (prompt + completion, as Ollama counts them when a "
                                        "request finishes); once reached, the next requests get 429.")),
    "max_priority": ("--max-priority", "TIER", parse_ceiling, ("The best priority (high, normal, low) the key's "
                                                               "requests get; a higher X-Fleet-Priority is "
                                                               "lowered to it.")),
}
LIMIT_DEST = "limit_"


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    add = sub.add_parser("add", help="Create a key and print it (the only time it is shown).")
    add.add_argument("name", help="Who or what the key is for.")
    _limit_flags(add, "No limit unless given.")
    lim = sub.add_parser("limit", help="Change a key's limits by id, name or shown prefix: only the limits given "
                                       "change; 0 or 'none' removes one.")
    lim.add_argument("ref")
    _limit_flags(lim, "0 or 'none': no limit.")
    ls = sub.add_parser("list", help="List keys (never the keys themselves).")
    ls.add_argument("--json", action="store_true", help="Print JSON.")
    rv = sub.add_parser("revoke", help="Revoke a key by id, name or shown prefix.")
    rv.add_argument("ref")
    pg = sub.add_parser("purge", help="Delete revoked keys. Keys fail closed: revoking the last key keeps the "
                                      "proxy locked; purging them when none is active opens it again.")
    for p in (add, lim, ls, rv, pg):
        _database_flags(p)


def _limit_flags(parser: argparse.ArgumentParser, note: str) -> None:
    for name, (flag, metavar, parse, help_) in LIMIT_FLAGS.items():
        parser.add_argument(flag, dest=LIMIT_DEST + name, type=_argparse_type(parse), default=argparse.SUPPRESS,
                            metavar=metavar, help=f"{help_} {note}")


def _argparse_type(parse: Callable[[str], int | str | None]) -> Callable[[str], int | str | None]:
    """argparse shows an ArgumentTypeError's message and exits 2 before anything is written."""
    def convert(text: str) -> int | str | None:
        try:
            return parse(text)
        except LimitError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


def _given_limits(args: argparse.Namespace) -> dict[str, int | str | None]:
    """The limits given on the command line (None: cleared); absent ones are not in it."""
    given = vars(args)
    return {name: given[LIMIT_DEST + name] for name in LIMIT_FLAGS if LIMIT_DEST + name in given}


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

    changes = _given_limits(args)
    if args.keys_command == "limit" and not changes:
        print("fleet keys limit: nothing to change: give " + ", ".join(f for f, *_ in LIMIT_FLAGS.values()),
              file=sys.stderr)
        return 2
    cfg = settings.load([settings.CONTROLLER], args)
    from ollama_fleet.controller.migrations import SchemaTooNew

    try:
        database = dbm.init_db(cfg.database_url or dbm.default_url(cfg.data_path))
    except SchemaTooNew as e:  # a clear sentence, not a traceback
        print(f"fleet keys: {e}", file=sys.stderr)
        return 1
    with database.connection_context():
        if args.keys_command == "add":
            key, row = keys.create(args.name, NONE.changed(changes))
            print(key)
            print(f"key {row['id']} ({row['name']}, {_limits(row)}) created; store it now, it cannot be "
                  "shown again", file=sys.stderr)
            return 0
        if args.keys_command == "limit":
            return _each(keys.set_limits(args.ref, changes), args.ref,
                         lambda r: f"key {r['id']} ({r['name']}): {_limits(r)}")
        if args.keys_command == "list":
            rows = keys.list_keys()
            if args.json:
                print(json.dumps(rows))
            else:
                for r in rows:
                    state = "revoked " + _when(r["revoked"]) if r["revoked"] else "active"
                    print(f"{r['id']:>4}  {r['prefix']}...  {r['name']:<24} {_when(r['created'])}  {state}"
                          f"  {_limits(r)}")
            return 0
        if args.keys_command == "purge":
            n = keys.purge()
            left = len(keys.active())
            print(f"deleted {n} revoked key{'s' if n != 1 else ''}; "
                  + (f"{left} active: the proxy still needs a key" if left else "no keys left: the proxy is OPEN"))
            return 0
        return _each(keys.revoke(args.ref), args.ref, lambda r: f"revoked key {r['id']} ({r['name']})")


def _each(rows: list[dict[str, Any]], ref: str, line: Callable[[dict[str, Any]], str]) -> int:
    """A line for each key acted on; exit status 1 when `ref` matched no active key."""
    if not rows:
        print(f"fleet keys: no active key matches {ref!r}", file=sys.stderr)
        return 1
    for r in rows:
        print(line(r))
    return 0


def _limits(row: dict[str, Any]) -> str:
    return describe(KeyLimits(**{name: row[name] for name in LIMIT_NAMES}))


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))
