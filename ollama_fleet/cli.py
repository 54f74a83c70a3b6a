"""`fleet`: the one command. `fleet up` (trial: broker + controller + local agent), `fleet controller`,
`fleet agent`, `fleet broker passwd`, `fleet settings`. What the long-running ones start is in
ollama_fleet/launcher.py; each command imports its own code when it runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ollama_fleet import __version__
from ollama_fleet import settings
from ollama_fleet import log as flog
from ollama_fleet.settings import AGENT, CONTROLLER, ConfigError

# light: argparse only; the database layer is imported when `fleet keys` runs
from ollama_fleet.controller.proxy import keys_cli

# Subcommands that other modules add (e.g. `fleet keys`), name -> (help, configure(parser), run(args))
EXTRA_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}
EXTRA_COMMANDS["keys"] = (keys_cli.HELP, keys_cli.configure, keys_cli.run)


def _service_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("service_args", nargs=argparse.REMAINDER, help="`install [--user U] [--unit-dir D]` or `print`")


def _service_run(args: argparse.Namespace) -> int:
    from ollama_fleet.agent.service_install import main as service_main

    return service_main(args.service_args)


EXTRA_COMMANDS["agent-service"] = ("Install the agent as a systemd service (restart on failure).",
                                   _service_args, _service_run)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fleet", description="ollama-fleet: one endpoint and one dashboard "
                                "for a fleet of machines running Ollama, coordinated over MQTT.")
    p.add_argument("--version", action="version", version=f"ollama-fleet {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_: str, scopes: tuple[str, ...]) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--version", action="version", version=f"ollama-fleet {__version__}")
        settings.add_arguments(sp, scopes)
        return sp

    command("up", "Single-host trial: a loopback broker (unless --mqtt-url), the controller and an agent "
            "for the local Ollama.", (CONTROLLER, AGENT))
    command("controller", "Run the controller (HTTP API, proxy, dashboard, MQTT ingest).", (CONTROLLER,))
    command("agent", "Run an agent next to one Ollama.", (AGENT,))
    b = sub.add_parser("broker", help="Broker helpers: manage Mosquitto credentials.")
    b.add_argument("--version", action="version", version=f"ollama-fleet {__version__}")
    b.add_argument("broker_args", nargs=argparse.REMAINDER,
                   help="`passwd add USER [--password P|--password-stdin] [--file PATH]` or `passwd remove USER`")
    s = sub.add_parser("settings", help="Print every setting (as a Markdown table with --markdown).")
    s.add_argument("--markdown", action="store_true")
    s.add_argument("--version", action="version", version=f"ollama-fleet {__version__}")
    for name, (help_, configure, _) in EXTRA_COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--version", action="version", version=f"ollama-fleet {__version__}")
        configure(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "settings":
            if args.markdown:
                print(settings.markdown_table())
            else:
                cfg = settings.load([CONTROLLER, AGENT])
                for k, v in cfg.as_dict().items():
                    if k == "data_dir":  # the path actually used, not the empty "use the default"
                        v = str(cfg.data_path)
                    print(f"{k} = {v!r}  ({cfg.source(k)})")
            return 0
        if args.command == "broker":
            from ollama_fleet.broker.passwd import main as passwd_main

            rest = list(args.broker_args)
            if not rest or rest[0] != "passwd":
                print("usage: fleet broker passwd {add,remove} ...", file=sys.stderr)
                return 2
            return passwd_main(rest[1:])
        if args.command in EXTRA_COMMANDS:
            return EXTRA_COMMANDS[args.command][2](args)
        scopes = {"up": (CONTROLLER, AGENT), "controller": (CONTROLLER,), "agent": (AGENT,)}[args.command]
        cfg = settings.load(scopes, args)
        flog.setup(cfg.log_level, cfg.log_format)
        from ollama_fleet import launcher

        if args.command == "agent":
            return launcher.run_agent(cfg)
        return launcher.run_controller(cfg, local_agent=args.command == "up" and cfg.local_agent)
    except ConfigError as e:
        print(f"fleet: configuration error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
